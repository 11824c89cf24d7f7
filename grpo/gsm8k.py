"""GSM8K -> Bedrock RFT records: the spec's prompt suffix, the `#### <n>` reference answer, from a local
parquet/JSONL file or the hub's `openai/gsm8k` (with the `datasets` extra)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from grpo.data import GSM8K_SUFFIX, write_jsonl
from grpo.errors import UserError
from grpo.jsonl import capped, json_kind, open_lines, parse_line


def gsm8k_to_records(rows: Iterable[Any], tag: str = "train", source: str = "gsm8k",
                     start_line: int = 1) -> list[dict]:
    """GSM8K rows {"question", "answer"} -> Bedrock records (dicts), ids ``gsm8k-<tag>-<index>``
    (0-based position, so stable across runs). ``source`` and row numbers (from ``start_line``)
    name malformed rows in the UserError, which lists every bad row (capped)."""
    out, bad = [], []
    for i, row in enumerate(rows):
        where, errs = f"{source}:{start_line + i}", []
        if not isinstance(row, Mapping):
            bad.append(f"{where}: row: expected an object with question and answer, got {json_kind(row)}")
            continue
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            errs.append("question: " + ("missing" if "question" not in row else "is empty"
                        if isinstance(q, str) else f"expected a string, got {json_kind(q)}"))
        final = a.rsplit("####", 1)[1].strip() if isinstance(a, str) and "####" in a else ""
        if not isinstance(a, str):
            errs.append("answer: " + ("missing" if "answer" not in row
                                      else f"expected a string, got {json_kind(a)}"))
        elif not final or "\n" in final:
            errs.append("answer: the last line must be '#### <answer>'")
        if errs:
            bad += [f"{where}: {e}" for e in errs]
            continue
        out.append({"id": f"gsm8k-{tag}-{i}",
                    "messages": [{"role": "user", "content": q.strip() + GSM8K_SUFFIX}],
                    "reference_answer": f"#### {final}"})
    if bad:
        raise UserError(f"malformed GSM8K rows in {source}:\n" + "\n".join(capped(bad)))
    return out


def read_gsm8k_file(path: str | os.PathLike) -> list[Any]:
    """Parse a local GSM8K JSONL file (one object per line); UserError naming FILE:LINE on bad JSON."""
    rows, bad = [], []
    for lineno, raw in enumerate(open_lines(Path(path)), start=1):
        obj, err, _ = parse_line(raw, lineno) if raw.strip() else (None, ("line", "blank line"), 0)
        if err:
            bad.append(f"{path}:{lineno}: {err[0]}: {err[1]}")
        rows.append(obj)
    if bad:
        raise UserError(f"{path} is not GSM8K JSONL:\n" + "\n".join(capped(bad)))
    return rows


def load_gsm8k_hub(hub_id: str, split: str = "train", config: str = "main") -> list[Any]:
    """Rows of a hub dataset (e.g. ``openai/gsm8k``) through the optional ``datasets`` package."""
    try:
        import datasets  # optional: pip install datasets
    except ImportError:
        raise UserError(f"loading {hub_id} from the hub needs the `datasets` package: "
                        "pip install datasets (or pip install 'grpo[datasets]'), or pass a local "
                        "GSM8K JSONL file, e.g. --input /path/to/gsm8k/train.jsonl") from None
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # network, auth, unknown split: all user-fixable, say which
        raise UserError(f"could not load {hub_id} ({config}, split {split}) from the hub: {e}; "
                        "offline? pass a local GSM8K JSONL file with --input") from None
    return [dict(r) for r in ds]


def convert_gsm8k(source: str | os.PathLike, out_path: str | os.PathLike, split: str = "train",
                  limit: int | None = None, config: str = "main") -> int:
    """GSM8K (a local JSONL file, a directory holding ``<split>.jsonl``, or a hub id) -> Bedrock
    JSONL at ``out_path``, written atomically. Ids use the file stem (local) or split (hub)."""
    p = Path(source)
    if p.is_dir() and (p / f"{split}.jsonl").is_file():
        p = p / f"{split}.jsonl"
    if p.exists():
        rows, tag, name = read_gsm8k_file(p), p.stem, str(p)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).endswith((".jsonl", ".json")):
        rows, tag, name = load_gsm8k_hub(str(source), split, config), split, f"{source}[{split}]"
    else:
        raise UserError(f"{source}: no such file (give a GSM8K JSONL file or a hub id like openai/gsm8k)")
    if limit is not None:
        rows = rows[:limit]
    return write_jsonl(out_path, gsm8k_to_records(rows, tag=tag, source=name))
