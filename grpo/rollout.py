"""Group sampling: each prompt's `training_sample_per_prompt` responses, from transformers generation.

A `RolloutBatch` keeps every sample as token ids (the prompt's and the response's) plus the decoded
final answer (`content`) and any thinking text (`reasoning_content`), split the way the chat
templates write them: Qwen3's `<think>...</think>`, GPT-OSS harmony's `analysis` and `final` channels.
`response_length` counts every generated token, thinking included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from grpo.models import chat_template_kwargs


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    contents: list[str] = field(default_factory=list)
    reasoning: list[str | None] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)  # hit inference_max_tokens without an end token
    group: list[int] = field(default_factory=list)  # index of the prompt within the step
    sample: list[int] = field(default_factory=list)  # index of the response within its group

    def __len__(self) -> int:
        return len(self.response_ids)


def encode_prompt(tokenizer, messages: list[dict], *, reasoning_effort: str = "low", tools=None) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                         **chat_template_kwargs(reasoning_effort))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_token_ids(tokenizer, model=None) -> list[int]:
    ids = set()
    gen_cfg = getattr(model, "generation_config", None)
    for src in (getattr(gen_cfg, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return sorted(ids)


_HARMONY_FINAL = re.compile(r"<\|channel\|>final<\|message\|>(.*?)(?:<\|return\|>|<\|end\|>|<\|call\|>|$)", re.S)
_HARMONY_ANALYSIS = re.compile(r"<\|channel\|>analysis<\|message\|>(.*?)(?:<\|end\|>|$)", re.S)
_THINK = re.compile(r"^\s*<think>(.*?)(?:</think>|$)", re.S)


def split_reasoning(text: str, special_tokens: list[str]) -> tuple[str, str | None]:
    """(content, reasoning_content) of one decoded response (decoded with special tokens kept)."""
    reasoning = None
    if "<|channel|>" in text:
        analysis = _HARMONY_ANALYSIS.findall(text)
        final = _HARMONY_FINAL.findall(text)
        reasoning = "\n".join(a.strip() for a in analysis) or None
        text = final[-1] if final else ("" if analysis else text)
    else:
        m = _THINK.match(text)
        if m:
            reasoning = m.group(1).strip() or None
            text = text[m.end():]
    for tok in special_tokens:
        text = text.replace(tok, "")
    return text.strip(), reasoning


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
             top_p: float = 1.0, batch_size: int = 64, ignore_eos: bool = False) -> RolloutBatch:
    """Sample `n` responses for each prompt (ids). Sampling is from the full tempered distribution
    (top_k off), so that the trainer's log-probs describe exactly the distribution sampled from."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ends = end_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    gen_cfg = GenerationConfig(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else 0,
        eos_token_id=None if ignore_eos else ends, pad_token_id=pad, num_return_sequences=n,
    )
    specials = [t for t in tokenizer.all_special_tokens if t]
    out = RolloutBatch()
    was_training = model.training
    model.eval()
    per_call = max(1, batch_size // n)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        ids, mask = _left_pad(chunk, pad)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        new = seqs[:, ids.shape[1]:].tolist()
        for row, toks in enumerate(new):
            g = start + row // n
            resp, hit_end = [], False
            for t in toks:
                resp.append(t)
                if not ignore_eos and t in ends:
                    hit_end = True
                    break
            if not resp:
                resp = [ends[0]]
                hit_end = True
            content, reasoning = split_reasoning(tokenizer.decode(resp, skip_special_tokens=False), specials)
            out.prompt_ids.append(chunk[row // n])
            out.response_ids.append(resp)
            out.contents.append(content)
            out.reasoning.append(reasoning)
            out.truncated.append(not hit_end)
            out.group.append(g)
            out.sample.append(row % n)
    if was_training:
        model.train()
    return out


@dataclass
class PackedBatch:
    """Right-padded prompt+response sequences; `response_mask[i, t]` says whether token t+1 of row i
    is a response token, i.e. it is aligned with the model's next-token predictions at position t."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    response_mask: torch.Tensor  # [N, L-1], float

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx) -> "PackedBatch":
        """Rows `idx`, trimmed to the longest of them (no compute spent on padding beyond it)."""
        width = int(self.attention_mask[idx].sum(dim=1).max())
        return PackedBatch(self.input_ids[idx, :width], self.attention_mask[idx, :width], self.response_mask[idx, :width - 1])


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> PackedBatch:
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    n = len(prompt_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    resp = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :len(p) + len(r)] = 1
        resp[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
    return PackedBatch(ids, attn, resp)
