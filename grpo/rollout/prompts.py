"""Prompts and responses as the chat templates write them: encoding a record's messages, the end tokens, and
splitting a response into its final answer (`content`) and thinking text (`reasoning_content`): Qwen3's
`<think>...</think>`, GPT-OSS harmony's `analysis` and `final` channels."""

from __future__ import annotations

import re

from grpo.rollout.tools import _THINK, render_tool_prompt


def special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens, stripped from a response's text after the reasoning split."""
    return [t for t in tokenizer.all_special_tokens if t]


def encode_prompt(tokenizer, messages: list[dict], *, reasoning_effort: str = "low", tools=None) -> list[int]:
    """The prompt's token ids; `tools` rendered by the model's template (grpo.rollout.tools: its fallback where the
    template has no tools section)."""
    text = render_tool_prompt(tokenizer, messages, tools, reasoning_effort=reasoning_effort)
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


def pad_token_id(tokenizer, model=None) -> int:
    """The id that pads packed rows: the tokenizer's pad token, else its first end token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token_ids(tokenizer, model)[0]


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
