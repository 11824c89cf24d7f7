"""Synthetic arithmetic data and the tokenizer of the embedded tiny default model.

The quickstart needs a task that takes real work from a small model and a model that is not done yet.
Prompts are two-digit arithmetic (``a + b``, ``a - b``, ``a + b - c``) phrased plainly or as tiny word
problems, each followed by the GSM8K suffix of the spec ("Let's think step by step and output the final
answer after '####'."); the reference is ``#### <n>`` as in GSM8K.

The pretraining corpus always does the arithmetic correctly, one equation per line, but only a fraction
of its examples ends with the final line ``#### <n>`` that the strict GSM8K grader needs; the others end
with ``The answer is <n>.`` and the like (strict score 0). So the pretrained model's sampled reward is
roughly P(format) x P(arithmetic right), and GRPO's job is the realistic RFT one: learn to follow the
required output format while keeping the arithmetic right.

Records are split by a hash of the operands, so ``pretrain``, ``train`` and ``validation`` problems never
overlap.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from grpo.data import GSM8K_SUFFIX as SUFFIX  # the spec's GSM8K prompt suffix, one definition
from grpo.data import write_jsonl

#: Bump when the generator's output changes: it is part of the tiny model's cache key.
DATA_VERSION = 1
SPLITS = ("pretrain", "train", "validation")
# Share of the operand space (by hash bucket out of 100) that each split owns.
_BUCKETS = {"validation": range(0, 10), "train": range(10, 30), "pretrain": range(30, 100)}

OPERATIONS = ("add", "sub", "add_sub")
_NAMES = ("Tom", "Mia", "Sam", "Ana", "Leo", "Zoe", "Max", "Ivy")
_ITEMS = ("apples", "stickers", "marbles", "coins", "books", "shells")

_TEMPLATES = {
    "add": (
        "What is {a} + {b}?",
        "Compute {a} + {b}.",
        "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
    ),
    "sub": (
        "What is {a} - {b}?",
        "Compute {a} - {b}.",
        "{name} has {a} {item} and gives away {b}. How many {item} are left?",
    ),
    "add_sub": (
        "What is {a} + {b} - {c}?",
        "Compute {a} + {b} - {c}.",
        "{name} has {a} {item}, gets {b} more, then loses {c}. How many {item} does {name} have now?",
    ),
}

#: Final-line formats of the pretraining corpus. Only the first one scores under the strict grader.
FINAL_FORMATS = ("#### {n}", "The answer is {n}.", "Answer: {n}", "So the result is {n}.")


def _bucket(op: str, operands: tuple[int, ...]) -> int:
    key = f"{op}:" + ":".join(map(str, operands))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 100


def _split_of(op: str, operands: tuple[int, ...]) -> str:
    b = _bucket(op, operands)
    for split, rng in _BUCKETS.items():
        if b in rng:
            return split
    raise AssertionError(b)  # pragma: no cover - the buckets cover 0..99


def _draw_operands(rng: random.Random, op: str) -> tuple[int, ...]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "add":
        return (a, b)
    if op == "sub":
        return (max(a, b), min(a, b))
    c = rng.randint(10, min(99, a + b))  # keep the result non-negative
    return (a, b, c)


def _steps(op: str, operands: tuple[int, ...]) -> tuple[list[str], int]:
    """The worked equations (one per line) and the final result."""
    if op == "add":
        a, b = operands
        return [f"{a} + {b} = {a + b}"], a + b
    if op == "sub":
        a, b = operands
        return [f"{a} - {b} = {a - b}"], a - b
    a, b, c = operands
    return [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c


def _problem(rng: random.Random, split: str) -> dict:
    """Draw one problem belonging to ``split`` (rejection sampling on the operand hash)."""
    while True:
        op = rng.choice(OPERATIONS)
        operands = _draw_operands(rng, op)
        if _split_of(op, operands) == split:
            break
    template = rng.choice(_TEMPLATES[op])
    names = dict(zip("abc", operands))
    question = template.format(name=rng.choice(_NAMES), item=rng.choice(_ITEMS), **names)
    steps, result = _steps(op, operands)
    return {"op": op, "operands": operands, "prompt": question + SUFFIX, "steps": steps, "result": result}


def make_arithmetic_records(n: int, *, seed: int, split: str) -> list[dict]:
    """``n`` distinct Bedrock RFT records of ``split`` ("train", "validation" or "pretrain").

    Each record: ``{"id", "messages": [{"role": "user", ...}], "reference_answer": "#### <n>",
    "operation", "operands"}`` (the last two reach a reward Lambda under ``metadata``). The same
    ``(n, seed, split)`` always gives the same records; different splits never share a problem.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{seed}:{split}")
    records, seen = [], set()
    while len(records) < n:
        p = _problem(rng, split)
        key = (p["op"], p["operands"])
        if key in seen:
            continue
        seen.add(key)
        records.append(
            {
                "id": f"{split}-{len(records):05d}",
                "messages": [{"role": "user", "content": p["prompt"]}],
                "reference_answer": f"#### {p['result']}",
                "operation": p["op"],
                "operands": list(p["operands"]),
            }
        )
    return records


def write_quickstart_data(train_path: str | Path | None, validation_path: str | Path | None = None, *,
                          n_train: int = 2000, n_val: int = 200,
                          seed: int = 0) -> tuple[Path | None, Path | None]:
    """Write ``n_train`` "train" records to ``train_path`` and ``n_val`` "validation" records to
    ``validation_path`` (Bedrock RFT JSONL; either may be None to skip it), each atomically with
    grpo.data.write_jsonl (parent folders made). Returns the two paths, None where skipped."""
    out: list[Path | None] = []
    for split, path, n in (("train", train_path, n_train), ("validation", validation_path, n_val)):
        if path is not None:
            write_jsonl(path, make_arithmetic_records(n, seed=seed, split=split))
        out.append(None if path is None else Path(path))
    return out[0], out[1]


def pretrain_examples(n: int, *, seed: int, format_fraction: float) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs for pretraining, drawn with replacement from the pretrain split.

    The arithmetic in every response is right; the final line is ``#### <n>`` with probability
    ``format_fraction`` and one of the other :data:`FINAL_FORMATS` otherwise.
    """
    rng = random.Random(f"{seed}:pretrain-corpus")
    out = []
    for _ in range(n):
        p = _problem(rng, "pretrain")
        if rng.random() < format_fraction:
            final = FINAL_FORMATS[0]
        else:
            final = rng.choice(FINAL_FORMATS[1:])
        out.append((p["prompt"], "\n".join(p["steps"] + [final.format(n=p["result"])])))
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizer

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(vocab_size: int = 384, seed: int = 0, *, corpus: list[str] | None = None,
                    chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on the synthetic corpus, wrapped for transformers.

    Digits are always single tokens (so numbers tokenize uniformly); every byte is in the base
    alphabet, so no input can fail to encode. ChatML special tokens and a Qwen-style chat template
    make ``apply_chat_template(messages, add_generation_prompt=True)`` work; eos is ``<|im_end|>``.
    ``corpus`` (texts) and ``chat_template`` replace the arithmetic corpus and the plain ChatML template
    (grpo.models.tiny_tools: the tool-calling model's tokenizer).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if corpus is None:
        corpus = []
        for frac in (0.0, 1.0):
            for prompt, response in pretrain_examples(1500, seed=seed, format_fraction=frac):
                corpus += ["user\n" + prompt, "assistant\n" + response]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=chat_template,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
