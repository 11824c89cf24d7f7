"""Data and tokenizer of the embedded tool-calling tiny model `grpo:tiny-tools` (docs/tools.md).

The task: two-digit products, `What is 47 * 86?`, reference `#### 4042`. A model this small cannot multiply
two-digit numbers itself; the calculator environment (envs/calculator.py) can. The prompt shows the
calculator's tools the way Qwen3's own chat template does (thinking off, as `reasoning_effort: low`).

The pretraining corpus has two kinds of answers, always right:

- with probability `call_fraction`, a call and the answer after the result (the layout of a multi-turn
  rollout, grpo.rollout.multiturn): `<tool_call>\\n{"name": "multiply", "arguments": {"a": 47, "b": 86}}\\n
  </tool_call><|im_end|>`, the tool's answer as Qwen3's template writes it (a user turn in <tool_response>
  tags, not trained on), then `47 * 86 = 4042\\n#### 4042<|im_end|>`;
- otherwise the product written directly: `47 * 86 = 4042\\n#### 4042<|im_end|>`, which the model imitates
  but cannot compute (it guesses a number of the right shape).

So the pretrained model calls the tool some of the time, and scores mostly when it does: GRPO with the
environment has a reason to make it call reliably. Records are split by a hash of the operands
(pretrain / train / validation never share a problem).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from grpo.models.tiny_data import IM_END

#: Bump when the generator's output changes: it is part of the model's cache key.
TOOLS_DATA_VERSION = 1
SPLITS = ("pretrain", "train", "validation")
_BUCKETS = {"validation": range(0, 10), "train": range(10, 30), "pretrain": range(30, 100)}
_TEMPLATES = ("What is {a} * {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}.")

#: envs/calculator.py's tools, as grpo.reward.tool_functions describes them (a test checks they agree).
CALCULATOR_TOOLS = [
    {"type": "function", "function": {"name": "multiply", "description": "Multiply two integers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "description": "the first factor"},
                                         "b": {"type": "integer", "description": "the second factor"}},
        "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "description": "the first term"},
                                         "b": {"type": "integer", "description": "the second term"}},
        "required": ["a", "b"]}}},
]
THINKING_OFF = {"enable_thinking": False}  # the template's generation prompt for reasoning_effort: low


def _split_of(a: int, b: int) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"mul:{a}:{b}".encode()).digest()[:4], "big") % 100
    return next(s for s, rng in _BUCKETS.items() if bucket in rng)


def _problem(rng: random.Random, split: str) -> tuple[int, int, str]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if _split_of(a, b) == split:
            return a, b, rng.choice(_TEMPLATES).format(a=a, b=b)


def make_tool_records(n: int, *, seed: int, split: str) -> list[dict]:
    """`n` distinct Bedrock RFT records of `split`: `{"id", "messages", "reference_answer": "#### <a*b>",
    "operands"}` (no `tools` field: the job's environment supplies them)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{seed}:{split}:tools")
    out, seen = [], set()
    while len(out) < n:
        a, b, question = _problem(rng, split)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append({"id": f"{split}-{len(out):05d}", "messages": [{"role": "user", "content": question}],
                    "reference_answer": f"#### {a * b}", "operands": [a, b]})
    return out


def write_tools_data(train_path, validation_path, *, n_train: int = 1000, n_val: int = 100, seed: int = 0):
    from grpo.data import write_jsonl

    write_jsonl(train_path, make_tool_records(n_train, seed=seed, split="train"))
    write_jsonl(validation_path, make_tool_records(n_val, seed=seed, split="validation"))
    return Path(train_path), Path(validation_path)


def _call_text(a: int, b: int) -> str:
    return "<tool_call>\n" + json.dumps({"name": "multiply", "arguments": {"a": a, "b": b}}) + "\n</tool_call>" + IM_END


def example_segments(tokenizer, a: int, b: int, question: str, call: bool) -> list[tuple[str, bool]]:
    """One pretraining example as (text, trained) segments in the rollout's layout: the prompt and the tool's
    answer are context (not trained), the model's turns are trained. Rendered by the tokenizer's Qwen3 template."""
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, tools=CALCULATOR_TOOLS, tokenize=False, add_generation_prompt=True,
                                           **THINKING_OFF)
    answer = f"{a} * {b} = {a * b}\n#### {a * b}" + IM_END
    if not call:
        return [(prompt, False), (answer, True)]
    turn = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}]}
    result = {"role": "tool", "content": str(a * b)}
    full = tokenizer.apply_chat_template(user + [turn, result], tools=CALCULATOR_TOOLS, tokenize=False,
                                         add_generation_prompt=True, **THINKING_OFF)
    end = "</tool_call>" + IM_END
    glue = full[full.rindex(end) + len(end):]  # what the rollout appends after the call: the template's own text
    return [(prompt, False), (_call_text(a, b), True), (glue, False), (answer, True)]


def pretrain_problems(n: int, *, seed: int, call_fraction: float) -> list[tuple[int, int, str, bool]]:
    rng = random.Random(f"{seed}:tools-corpus")
    return [(*_problem(rng, "pretrain"), rng.random() < call_fraction) for _ in range(n)]


def build_tools_tokenizer(vocab_size: int, seed: int = 0, corpus_examples: int = 2000):
    """The tiny BPE tokenizer trained on this corpus, with Qwen3's chat template and the tokens it writes
    (`<think>`, `<tool_call>`, `<tool_response>` ... as added tokens, as in Qwen3's own tokenizer)."""
    from tokenizers import AddedToken

    from grpo.models.tiny_data import build_tokenizer

    template = (Path(__file__).resolve().parents[1] / "templates" / "qwen3.jinja").read_text(encoding="utf-8")
    bootstrap = build_tokenizer(300, seed, corpus=["x"], chat_template=template)  # renders text; merges unused
    corpus = []
    for a, b, q, call in pretrain_problems(corpus_examples, seed=seed, call_fraction=0.5):
        corpus += [text for text, _ in example_segments(bootstrap, a, b, q, call)]
    tok = build_tokenizer(vocab_size, seed, corpus=corpus, chat_template=template)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")])
    return tok


def encode_example(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the segments not trained)."""
    ids, labels = [], []
    for text, trained in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [-100] * len(part)
    return ids, labels
