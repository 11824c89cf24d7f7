"""A dataset people already have -> Bedrock RFT records: `grpo data convert`.

Sources, read through the optional `datasets` package (`pip install 'grpo[datasets]'`), nothing from the network:

- a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (`--split` picks one of a dict's);
- a `.parquet`, `.csv`, `.json` or `.jsonl` file (JSON: one object per line, or one array of objects).

Mapping, per row: the `--prompt-column` becomes the user message (a string), or is the conversation itself
when it holds a list of `{role, content}` messages (a chat-format column); `--system TEXT` puts a system
message first (a conversation that has one already is an error, not a silent second one). The
`--answer-column` becomes `reference_answer`: a string as it is, a number as its decimal text (3 -> "3"; 3.0 -> "3", since a CSV column with an empty cell reads as floats), an
object as it is (Bedrock allows one); anything else (null, NaN from an empty CSV cell, a list) is a problem of that row. `--id-column` gives ids (else
`<source stem>-<row index>`, 0-based; `<source stem>-<split>-<row index>` for a split), `--keep COLUMN` carries a column along as a metadata field.

Every problem is reported at once, as `SOURCE:row N: column: message` (rows counted from 1 in the source's
order), then the output is checked with `grpo data validate`'s rules
(grpo.data.validate_file), its problems mapped back to the source row. Nothing is written unless every row
converts and the result is valid; the file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo.data import ROLES, validate_file, write_jsonl
from grpo.errors import UserError
from grpo.jsonl import capped, json_kind

FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


@dataclass
class ColumnMap:
    """How a row becomes a record (the command's options)."""

    prompt_column: str = "prompt"
    answer_column: str = "answer"
    system: str | None = None
    id_column: str | None = None
    keep: list[str] = field(default_factory=list)


@dataclass
class Converted:
    """What `convert_dataset` did: records written, the source's rows and columns, and warnings."""

    records: int
    rows: int
    columns: list[str]
    split: str | None
    warnings: list[str] = field(default_factory=list)


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("grpo data convert reads datasets through the `datasets` package: pip install "
                        "'grpo[datasets]' (or pip install datasets)") from None
    return datasets


def load_rows(source: str | os.PathLike, split: str | None = None) -> tuple[list[dict], list[str], str | None]:
    """(rows as dicts, column names, split used) of a local dataset directory or file; UserError otherwise."""
    p = Path(source)
    if not p.exists():
        raise UserError(f"{source}: no such file or directory (give a save_to_disk directory, or a .parquet, "
                        ".csv, .json or .jsonl file)")
    datasets = _require_datasets()
    datasets.disable_progress_bars()
    if p.is_dir():
        if not ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            raise UserError(f"{source}: a directory, but not one written by save_to_disk (no dataset_info.json "
                            "or dataset_dict.json); give the data file itself")
        try:
            ds = datasets.load_from_disk(str(p), keep_in_memory=True)
        except Exception as e:  # noqa: BLE001 - a damaged directory: say which, no traceback
            raise UserError(f"{source}: cannot read it as a saved dataset: {e}") from None
        return _pick_split(ds, source, split)
    kind = FORMATS.get(p.suffix.lower())
    if kind is None:
        raise UserError(f"{source}: unknown format {p.suffix or '(no extension)'}; give a .parquet, .csv, .json or "
                        ".jsonl file, or a save_to_disk directory")
    if split is not None:
        raise UserError(f"--split {split}: {source} is one file, which has no splits; leave --split out")
    with tempfile.TemporaryDirectory(prefix="grpo-convert-") as cache:  # no copy left in the user's HF cache
        try:
            ds = datasets.load_dataset(kind, data_files=str(p), split="train", cache_dir=cache)
        except Exception as e:  # noqa: BLE001 - malformed CSV/JSON, an unreadable parquet file
            raise UserError(f"{source}: cannot read it as {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return [dict(r) for r in ds], list(ds.column_names), None


def _pick_split(ds, source, split: str | None):
    if hasattr(ds, "keys"):  # a DatasetDict
        names = list(ds.keys())
        chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if chosen is None:
            raise UserError(f"{source}: a dataset with splits {', '.join(names)}; choose one with --split")
        if chosen not in names:
            raise UserError(f"--split {chosen}: {source} has splits {', '.join(names)}")
        ds = ds[chosen]
        return [dict(r) for r in ds], list(ds.column_names), chosen
    if split not in (None, "train"):
        raise UserError(f"--split {split}: {source} holds one dataset, not a dict of splits; leave --split out")
    return [dict(r) for r in ds], list(ds.column_names), None


def _text(value: Any) -> str | None:
    """A number as its decimal text; a string as it is; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):  # NaN: an empty CSV cell; not an answer
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return None


def row_to_record(row: Mapping, index: int, m: ColumnMap, id_prefix: str) -> tuple[dict | None, list[tuple[str, str]]]:
    """One source row -> (record dict, []) or (None, [(column, message), ...])."""
    problems: list[tuple[str, str]] = []
    prompt = row.get(m.prompt_column)
    messages: list[dict] = []
    if isinstance(prompt, str):
        if not prompt.strip():
            problems.append((m.prompt_column, "is empty"))
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, Mapping) for x in prompt):
        messages = [{"role": x.get("role"), "content": x.get("content")} for x in prompt]
        bad = [i for i, x in enumerate(messages) if x["role"] not in ROLES or not isinstance(x["content"], str)]
        if bad:
            problems.append((f"{m.prompt_column}[{bad[0]}]",
                             "expected {role: system|user|assistant, content: text} in a chat-format column"))
        if m.system is not None and messages and messages[0]["role"] == "system":
            problems.append((m.prompt_column, "already starts with a system message; leave --system out"))
    else:
        problems.append((m.prompt_column, "is null" if prompt is None else
                         f"expected text (or a list of chat messages), got {json_kind(prompt)}"))
    if m.system is not None:
        messages = [{"role": "system", "content": m.system}, *messages]
    answer = row.get(m.answer_column)
    reference: Any = _text(answer)
    if reference is None and isinstance(answer, Mapping):
        reference = dict(answer)
    if reference is None:
        problems.append((m.answer_column, "is null" if answer is None else
                         f"expected text, a number or an object, got {json_kind(answer)}"))
    if m.id_column is not None:
        rid = _text(row.get(m.id_column))
        if rid is None or not rid.strip():
            problems.append((m.id_column, "is empty" if rid is not None else
                             f"expected text or an integer, got {json_kind(row.get(m.id_column))}"))
    else:
        rid = f"{id_prefix}-{index}"
    for col in m.keep:
        try:
            json.dumps(row.get(col), allow_nan=False)
        except (TypeError, ValueError):
            problems.append((col, f"a {type(row.get(col)).__name__} value is not JSON; leave it out of --keep"))
    if problems:
        return None, problems
    out = {"id": rid, "messages": messages, "reference_answer": reference}
    for col in m.keep:
        out[col] = row.get(col)
    return out, []


def convert_dataset(source: str | os.PathLike, out_path: str | os.PathLike, mapping: ColumnMap, *,
                    split: str | None = None, limit: int | None = None) -> Converted:
    """Read `source`, map every row, validate the result with Bedrock's rules, write `out_path` atomically.
    UserError listing every problem (SOURCE:row N: column: message) when anything does not convert."""
    rows, columns, used = load_rows(source, split)
    name = str(source)
    needed = [("--prompt-column", mapping.prompt_column), ("--answer-column", mapping.answer_column)]
    needed += [("--id-column", mapping.id_column)] if mapping.id_column else []
    needed += [("--keep", c) for c in mapping.keep]
    missing = [f"{flag} {col}" for flag, col in needed if col not in columns]
    if missing:
        raise UserError(f"{name}: no column {', '.join(repr(m.split(' ', 1)[1]) for m in missing)} "
                        f"({', '.join(missing)}); its columns: {', '.join(columns) or 'none'}")
    if limit is not None:
        rows = rows[:limit]
    records, problems = [], []
    prefix = "-".join(filter(None, (Path(source).stem or "row", used)))
    for i, row in enumerate(rows):
        rec, found = row_to_record(row, i, mapping, prefix)
        problems += [f"{name}:row {i + 1}: {col}: {msg}" for col, msg in found]
        if rec is not None:
            records.append(rec)
    if problems:
        raise UserError(f"{name}: rows that do not convert:\n" + "\n".join(capped(problems)))
    out = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="grpo-convert-") as tmp:
        draft = Path(tmp) / "draft.jsonl"
        try:
            write_jsonl(draft, records)
        except UserError as e:  # a value JSON cannot hold (a lone surrogate, bytes)
            raise UserError(f"{name}: {e}") from None
        rep = validate_file(draft, allow_small=True)
        if rep.problems:  # every row converted, so the draft's line N is the source's row N
            lines = [f"{name}:row {p.line}: {p.field}: {p.message}" if p.line else f"{name}: {p.field}: {p.message}"
                     for p in rep.problems]
            raise UserError(f"{name}: the converted records break Bedrock's rules:\n" + "\n".join(capped(lines)))
    warnings = [w.message for w in rep.warnings if w.field != "records"]  # the count: the command says it
    write_jsonl(out, records)
    return Converted(records=len(records), rows=len(rows), columns=columns, split=used, warnings=warnings)

