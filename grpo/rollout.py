"""Group sampling: each prompt's `training_sample_per_prompt` responses, from transformers generation.

A `RolloutBatch` keeps every sample as token ids (the prompt's and the response's) plus the decoded
final answer (`content`) and any thinking text (`reasoning_content`), split the way the chat
templates write them: Qwen3's `<think>...</think>`, GPT-OSS harmony's `analysis` and `final` channels.
`response_length` counts every generated token, thinking included.
"""

from __future__ import annotations

import contextlib
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

    def add(self, tokenizer, prompt: list[int], response: list[int], *, truncated: bool, group: int, sample: int,
            specials: list[str]) -> None:
        """One sampled response: decoded with special tokens kept, then split into (content, reasoning)."""
        content, reasoning = split_reasoning(tokenizer.decode(response, skip_special_tokens=False), specials)
        self.prompt_ids.append(prompt)
        self.response_ids.append(response)
        self.contents.append(content)
        self.reasoning.append(reasoning)
        self.truncated.append(truncated)
        self.group.append(group)
        self.sample.append(sample)


def special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens, stripped from a response's text after the reasoning split."""
    return [t for t in tokenizer.all_special_tokens if t]


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


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def cache_kwarg(model) -> str:
    """The forward keyword that takes a KV cache: `cache` in transformers 5.2x, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward returned (either name), or None."""
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


#: Decoder families whose cached forward (a KV cache plus explicit position ids) equals the plain forward of the
#: whole sequence; the group's prompt is then run once (here, and in grpo.actor's log-probs).
PREFIX_SHARING_TYPES = {"qwen3", "qwen2", "llama"}


def shares_prefix(model) -> bool:
    """Whether `model` (peft-wrapped or not) is a full-attention decoder of PREFIX_SHARING_TYPES."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None:
        return False
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "model_type", None) not in PREFIX_SHARING_TYPES:
        return False
    return all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or []))


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper: drop the least likely tokens whose total probability is <= 1 - top_p."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    drop[..., -1:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _sample_shared_prefix(model, chunk: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                          top_p: float, ends: list[int], pad: int, ignore_eos: bool, device) -> list[list[int]]:
    """`n` samples of each prompt in `chunk` (rows grouped by prompt), token lists of max_new_tokens (pad after
    an end token). One prefill per prompt; its KV cache is repeated n times; then one token per step for
    every row, drawn from softmax(logits / temperature) in float32 (top-p filtered if top_p < 1), as
    transformers' sampling does. Finished rows get `pad` until every row is finished."""
    kw = cache_kwarg(model)
    ids, mask = left_pad(chunk, pad)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = cache_of(out)
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    next_pos = mask.sum(dim=1, keepdim=True)
    rows = mask.shape[0]
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    end_ids = torch.tensor(ends, device=device)
    one = torch.ones((rows, 1), dtype=mask.dtype, device=device)
    for step in range(max_new_tokens):
        probs = _top_p_filter(logits.float() / temperature, top_p).softmax(dim=-1)
        nxt = torch.multinomial(probs, 1).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens[:, step] = nxt
        if not ignore_eos:
            done |= torch.isin(nxt, end_ids)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, one], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    logits_to_keep=1, **{kw: cache})
        next_pos = next_pos + 1
        logits = out.logits[:, -1]
    return tokens.tolist()


#: Largest total size of merged weight copies `merged_lora` makes (bytes); above it the adapter path runs.
MERGE_LIMIT_BYTES = 1 << 30


@contextlib.contextmanager
def merged_lora(model):
    """Decode with each LoRA Linear's weight merged out of place (W + scale * B @ A), so a decode step is one
    matmul per layer instead of three (on CPU the adapter's small ops cost as much as the base's). Only for
    float32 weights, where the merged product equals the adapter path to float32 rounding (the sampled
    distribution is the policy's); the originals are put back untouched (no subtract-to-unmerge drift),
    tied weights included. Anything else (half precision, quantized or non-Linear bases, a disabled or
    multiple active adapters, copies over MERGE_LIMIT_BYTES) runs the adapter path unchanged."""
    plan = _merge_plan(model)
    if not plan:
        yield
        return
    saved = []
    try:
        for mod, name, delta in plan:
            base = mod.base_layer
            saved.append((mod, base.weight))
            base.weight = torch.nn.Parameter(base.weight.detach() + delta, requires_grad=False)
            mod.merged_adapters.append(name)
        yield
    finally:
        for mod, weight in saved:
            mod.base_layer.weight = weight
            mod.merged_adapters.clear()


def _merge_plan(model):
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return []
    mods = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "merged_adapters")]
    if not mods:
        return []
    plan, total = [], 0
    for m in mods:
        active = [a for a in m.active_adapters if a in m.lora_A]
        if (not isinstance(m, LoraLinear) or type(m.base_layer) is not torch.nn.Linear or m.disable_adapters
                or m.merged_adapters or len(active) != 1 or m.base_layer.weight.dtype != torch.float32
                or getattr(m, "use_dora", {}).get(active[0], False) or m.fan_in_fan_out):
            return []
        a = active[0]
        with torch.no_grad():
            delta = (m.lora_B[a].weight @ m.lora_A[a].weight) * m.scaling[a]
        total += delta.numel() * delta.element_size()
        if total > MERGE_LIMIT_BYTES:
            return []
        plan.append((m, a, delta))
    return plan


#: Sequences (prompts x samples) per decode call of `generate`; grpo.plan sizes the KV cache from it.
GEN_BATCH = 64


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
             top_p: float = 1.0, batch_size: int = GEN_BATCH, ignore_eos: bool = False) -> RolloutBatch:
    """Sample `n` responses for each prompt (ids). Sampling is from the full tempered distribution
    (top_k off), so that the trainer's log-probs describe exactly the distribution sampled from.

    Decoders for which `shares_prefix` holds (Qwen3, Qwen2, Llama: full attention, a plain KV cache) run
    each prompt's prefill once for its whole group and decode with their own loop
    (`_sample_shared_prefix`); others go through transformers' `generate` with `num_return_sequences`,
    which prefills every copy of the prompt. `ignore_eos`: every response is `max_new_tokens` long (end
    tokens may be sampled and do not stop it), for benchmarks at equal work."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ends = end_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    gen_cfg = GenerationConfig(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else 0,
        eos_token_id=None if ignore_eos else ends, pad_token_id=pad, num_return_sequences=n,
    )
    specials = special_tokens(tokenizer)
    out = RolloutBatch()
    was_training = model.training
    model.eval()
    per_call = max(1, batch_size // n)
    shared = shares_prefix(model)
    try:
        # The LoRA merge (shared-prefix decoders) once for the whole call: the weights do not change within it.
        with merged_lora(model) if shared else contextlib.nullcontext():
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start:start + per_call]
                if shared:
                    new = _sample_shared_prefix(model, chunk, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                                top_p=top_p, ends=ends, pad=pad, ignore_eos=ignore_eos, device=device)
                else:
                    ids, mask = left_pad(chunk, pad)
                    seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
                    new = seqs[:, ids.shape[1]:].tolist()
                for row, toks in enumerate(new):
                    resp, hit_end = [], False
                    for t in toks:
                        resp.append(t)
                        if not ignore_eos and t in ends:
                            hit_end = True
                            break
                    if not resp:
                        resp = [ends[0]]
                        hit_end = True
                    out.add(tokenizer, chunk[row // n], resp, truncated=not hit_end, group=start + row // n,
                            sample=row % n, specials=specials)
    finally:
        model.train(was_training)
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
