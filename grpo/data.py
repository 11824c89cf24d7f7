"""Bedrock RFT training data: read, validate and write JSONL (GSM8K conversion: grpo.gsm8k).

The rules are those of BEDROCK_RFT.md section 1. Every problem in a file is reported (not only the
first) as ``FILE:LINE: field: message``; nothing a user can put in a file raises a traceback.

Choices where the spec is silent (one place, with the reason):

- ``id``: a non-empty string or an integer (not a bool); integers are kept as their decimal string,
  so ``3`` and ``"3"`` are the same id and collide. A record without an id gets the derived id
  ``line-<LINE>`` (its 1-based line number in the file). An explicit id equal to another record's
  derived id is reported, so every record's id is unique.
- UTF-8 byte order mark on line 1: accepted with a warning (Windows editors add it invisibly);
  anywhere else it is an error.
- Blank lines (empty or whitespace only) are errors naming the line: Bedrock's parser is not
  published and a strict reading keeps an upload from failing remotely. The newline ending the last
  line is fine.
- ``tools: null`` reads as no tools; ``NaN``/``Infinity`` are rejected (not standard JSON), and so is a
  lone surrogate escape (``"\\ud800"``): valid JSON, but not Unicode text a tokenizer can encode.
- Only regular files are read (a FIFO or ``/dev/zero`` would block or grow without end), and a line longer
  than ``MAX_LINE_BYTES`` is a problem without being read whole.
- Contents and string references that are only whitespace count as empty.
- Any top-level field other than messages/reference_answer/id/tools is metadata, kept as it is
  (a field literally named ``metadata`` becomes ``metadata["metadata"]``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from grpo.errors import UserError
from grpo.jsonl import MAX_SHOWN, capped, json_kind, open_lines, parse_line

MIN_RECORDS = 100
MAX_RECORDS = 20_000
MAX_KEPT_PROBLEMS = 1_000  # problems kept in a report (all are counted): validating any file takes bounded memory
MAX_DISTINCT = 10_000  # distinct message shapes / metadata fields a summary counts by name (the rest: "(other)")
ROLES = ("system", "user", "assistant")
KNOWN_FIELDS = ("messages", "reference_answer", "id", "tools")
GSM8K_SUFFIX = " Let's think step by step and output the final answer after '####'."


@dataclass(frozen=True)
class Problem:
    """One finding; ``line`` is None for a file-level finding (e.g. the record count)."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}"


@dataclass(frozen=True)
class Record:
    """One valid prompt. ``id`` is the record's own id as a string, or ``line-<LINE>`` if absent."""

    line: int
    id: str
    messages: list[dict]
    reference_answer: str | dict
    metadata: dict
    tools: list | None = None

    def to_json_dict(self) -> dict:
        """The record as a JSONL object (id always written; metadata back at top level)."""
        out: dict[str, Any] = {"id": self.id, "messages": self.messages,
                               "reference_answer": self.reference_answer}
        if self.tools is not None:
            out["tools"] = self.tools
        out.update(self.metadata)
        return out


@dataclass
class ValidationReport:
    """What ``validate_file`` found. ``records`` holds the records that passed every rule."""

    path: str
    problems: list[Problem] = field(default_factory=list)  # the first MAX_KEPT_PROBLEMS (problem_count: all)
    warnings: list[Problem] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.problem_count and not self.problems

    def add(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_KEPT_PROBLEMS or problem.line is None:  # file-level ones are always kept
            self.problems.append(problem)

    def problem_lines(self, limit: int = MAX_SHOWN) -> list[str]:
        """The problems as lines, the first ``limit`` then "... and N more", then the count line."""
        w = len(self.warnings)
        tail = f" in {self.path}" + (f" ({w} warning{'s' * (w != 1)})" if w else "")
        return capped([str(p) for p in self.problems[:limit]], tail, limit, total=self.problem_count)














def _check_messages(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list):
        return [("messages", f"expected a non-empty list of messages, got {json_kind(messages)}")]
    if not messages:
        return [("messages", "is empty; need at least one user message")]
    out, users = [], 0
    for i, m in enumerate(messages):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            out.append((f, f"expected an object with role and content, got {json_kind(m)}"))
            continue
        role = m.get("role")
        if "role" not in m:
            out.append((f"{f}.role", "missing"))
        elif role not in ROLES:
            shown = json.dumps(role)[:60] if isinstance(role, str) else json_kind(role)
            out.append((f"{f}.role", f"{shown} is not one of system, user, assistant"))
        elif role == "system" and i > 0:
            out.append((f"{f}.role", "a system message is only allowed first"))
        users += role == "user"
        content = m.get("content")
        if "content" not in m:
            out.append((f"{f}.content", "missing"))
        elif not isinstance(content, str):
            out.append((f"{f}.content", f"expected a non-empty string, got {json_kind(content)}"))
        elif not content.strip():
            out.append((f"{f}.content", "is empty"))
    if not users:
        out.append(("messages", "no user message; need at least one"))
    return out


def _check_reference(obj: dict) -> list[tuple[str, str]]:
    if "reference_answer" not in obj:
        return [("reference_answer", "missing; give a non-empty string or object")]
    ref = obj["reference_answer"]
    if isinstance(ref, str):
        return [] if ref.strip() else [("reference_answer", "is an empty string")]
    if isinstance(ref, dict):
        return [] if ref else [("reference_answer", "is an empty object")]
    return [("reference_answer", f"expected a non-empty string or object, got {json_kind(ref)}")]


def _check_id(obj: dict) -> list[tuple[str, str]]:
    if "id" not in obj:
        return []
    v = obj["id"]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        return [("id", f"expected a non-empty string (or an integer), got {json_kind(v)}")]
    if isinstance(v, str) and not v.strip():
        return [("id", "is empty")]
    return []


def _check_tools(tools: Any) -> list[tuple[str, str]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        return [("tools", f"expected a list of function definitions, got {json_kind(tools)}")]
    out, seen = [], {}
    for i, t in enumerate(tools):
        f = f"tools[{i}]"
        if not isinstance(t, dict):
            out.append((f, f"expected an object, got {json_kind(t)}"))
            continue
        if t.get("type") != "function":
            out.append((f"{f}.type", f"expected \"function\", got {json.dumps(t.get('type'))[:60]}"))
        fn = t.get("function")
        if not isinstance(fn, dict):
            out.append((f"{f}.function", "missing" if "function" not in t
                        else f"expected an object, got {json_kind(fn)}"))
            continue
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            out.append((f"{f}.function.name", f"expected a non-empty string, got {json_kind(name)}"
                        if not isinstance(name, str) else "is empty"))
        elif name in seen:
            out.append((f"{f}.function.name", f"duplicate tool name {json.dumps(name)} "
                                              f"(also tools[{seen[name]}])"))
        elif not _FUNCTION_NAME.match(name):
            out.append((f"{f}.function.name", f"{json.dumps(name)[:70]} must be 1-64 letters, digits, _ or - "
                                              "(OpenAI's rule for function names)"))
        else:
            seen[name] = i
        for key, typ, want in (("parameters", dict, "an object"), ("description", str, "a string"),
                               ("strict", bool, "true or false")):
            if key in fn and not isinstance(fn[key], typ):
                out.append((f"{f}.function.{key}", f"expected {want}, got {json_kind(fn[key])}"))
        params = fn.get("parameters")
        if isinstance(params, dict):
            if params.get("type", "object") != "object":
                out.append((f"{f}.function.parameters.type", f"expected \"object\" (a function takes named "
                                                              f"arguments), got {json.dumps(params.get('type'))[:60]}"))
            out += _check_schema(params, f"{f}.function.parameters")
    return out


_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_JSON_SCHEMA_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def _check_schema(schema: dict, f: str, depth: int = 0) -> list[tuple[str, str]]:
    """The JSON-schema keywords a function's parameters use (OpenAI's function calling): type, properties,
    required, enum, items, additionalProperties, anyOf. Other keywords pass unchecked."""
    out: list[tuple[str, str]] = []
    if depth > 32:
        return [(f, "nested more than 32 levels deep")]
    typ = schema.get("type")
    if typ is not None:
        types = typ if isinstance(typ, list) else [typ]
        bad = [t for t in types if t not in _JSON_SCHEMA_TYPES]
        if bad or not types:
            out.append((f"{f}.type", f"{json.dumps(typ)[:60]} is not a JSON schema type "
                                     f"({', '.join(_JSON_SCHEMA_TYPES)})"))
    props = schema.get("properties")
    if "properties" in schema and not isinstance(props, dict):
        out.append((f"{f}.properties", f"expected an object of property schemas, got {json_kind(props)}"))
        props = None
    for name, sub in (props or {}).items():
        if not isinstance(sub, dict):
            out.append((f"{f}.properties.{name}", f"expected a schema object, got {json_kind(sub)}"))
        else:
            out += _check_schema(sub, f"{f}.properties.{name}", depth + 1)
    req = schema.get("required")
    if "required" in schema:
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            out.append((f"{f}.required", f"expected a list of property names, got {json_kind(req)}"))
        elif props is not None:
            missing = [r for r in req if r not in props]
            if missing:
                out.append((f"{f}.required", f"names {', '.join(map(json.dumps, missing))[:80]}, not among its "
                                             "properties"))
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        out.append((f"{f}.enum", "is empty; list the allowed values" if schema["enum"] == []
                    else f"expected a non-empty list of the allowed values, got {json_kind(schema['enum'])}"))
    for key in ("items", "additionalProperties"):
        sub = schema.get(key)
        if key in schema and not isinstance(sub, (dict, bool)):
            out.append((f"{f}.{key}", f"expected a schema object or a boolean, got {json_kind(sub)}"))
        elif isinstance(sub, dict):
            out += _check_schema(sub, f"{f}.{key}", depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            subs = schema[key]
            if not isinstance(subs, list) or not all(isinstance(s, dict) for s in subs):
                out.append((f"{f}.{key}", f"expected a list of schema objects, got {json_kind(subs)}"))
            else:
                for i, sub in enumerate(subs):
                    out += _check_schema(sub, f"{f}.{key}[{i}]", depth + 1)
    return out




def validate_file(path: str | os.PathLike, allow_small: bool = False,
                  min_records: int = MIN_RECORDS, max_records: int = MAX_RECORDS, *,
                  keep_records: bool = True) -> ValidationReport:
    """Check every rule of spec section 1; report every problem. Raises UserError only when the
    path cannot be read at all (missing, a directory, no permission).

    The file is read line by line and memory stays bounded whatever its size: problems are all counted and
    the first MAX_KEPT_PROBLEMS kept, the summary is accumulated as it goes, and records (``keep_records``)
    and ids (for duplicates) are kept for the first ``max_records`` records only (past that the file is
    invalid anyway)."""
    name = str(path)
    rep = ValidationReport(path=name)
    add = lambda line, fld, msg: rep.add(Problem(name, line, fld, msg))  # noqa: E731
    explicit: dict[str, int] = {}  # id -> first line that uses it (for the first max_records records)
    missing_id: list[int] = []
    summary = _Summary()
    n_lines = n_blank = 0
    for lineno, raw in enumerate(open_lines(Path(path)), start=1):
        n_lines += 1
        tracked = n_lines - n_blank <= max_records  # records past Bedrock's maximum: counted, not remembered
        if not raw.strip():
            n_blank += 1
            add(lineno, "line", "blank line; remove it (one JSON object per line)")
            continue
        obj, err, had_bom = parse_line(raw, lineno)
        if had_bom and lineno == 1:
            rep.warnings.append(Problem(name, 1, "encoding", "UTF-8 byte order mark at the start "
                                        "of the file; accepted here, strip it before uploading"))
        if err:
            add(lineno, *err)
            continue
        if not isinstance(obj, dict):
            add(lineno, "record", f"expected a JSON object, got {json_kind(obj)}")
            continue
        found = (_check_messages(obj.get("messages")) if "messages" in obj
                 else [("messages", "missing; need a list with at least one user message")])
        found += _check_reference(obj) + _check_id(obj) + _check_tools(obj.get("tools"))
        for fld, msg in found:
            add(lineno, fld, msg)
        id_ok = "id" in obj and not any(f == "id" for f, _ in found)
        if id_ok:
            rid = str(obj["id"])
            if rid in explicit:
                add(lineno, "id", f"duplicate id {json.dumps(rid)[:80]} (first used on line "
                                  f"{explicit[rid]})")
            elif tracked:
                explicit[rid] = lineno
        elif "id" not in obj and tracked:
            missing_id.append(lineno)
        if not found:
            record = Record(
                line=lineno, id=str(obj["id"]) if id_ok else f"line-{lineno}",
                messages=obj["messages"], reference_answer=obj["reference_answer"],
                metadata={k: v for k, v in obj.items() if k not in KNOWN_FIELDS},
                tools=obj.get("tools"))
            summary.add(record, derived=not id_ok)
            if keep_records and tracked:
                rep.records.append(record)
    for lineno in missing_id:  # derived ids must not collide with explicit ones
        derived = f"line-{lineno}"
        if derived in explicit:
            add(explicit[derived], "id", f"\"{derived}\" is also the id derived for line {lineno}"
                                         f" (which has no id); rename one of them")
    n = n_lines - n_blank
    if n == 0:
        add(None, "records", "no records in the file")
    elif n < min_records:
        msg = f"{n} record{'s' * (n != 1)}; Bedrock needs at least {min_records}"
        if allow_small:
            rep.warnings.append(Problem(name, None, "records", msg + " (allowed by --allow-small)"))
        else:
            add(None, "records", msg + " (--allow-small accepts fewer for local prototyping)")
    elif n > max_records:
        add(None, "records", f"{n:,} records; Bedrock accepts at most {max_records:,}")
    rep.problems.sort(key=lambda p: (p.line is None, p.line or 0))
    rep.summary = summary.result(n)
    return rep


class _Summary:
    """Counts over valid records, accumulated one record at a time: roles, message shapes, reference types,
    metadata fields (each by name for the first MAX_DISTINCT names, the rest as "(other)")."""

    def __init__(self):
        self.roles: Counter = Counter()
        self.shapes: Counter = Counter()
        self.refs: Counter = Counter()
        self.meta: Counter = Counter()
        self.valid = self.derived = self.with_tools = self.chars_total = 0
        self.chars_min: int | None = None
        self.chars_max = 0

    @staticmethod
    def _count(counter: Counter, key: str) -> None:
        counter[key if key in counter or len(counter) < MAX_DISTINCT else "(other)"] += 1

    def add(self, r: Record, derived: bool) -> None:
        seq = [m["role"] for m in r.messages]
        self.roles.update(seq)
        self._count(self.shapes, ",".join(seq) if len(seq) <= 8 else ",".join(seq[:6]) + f",... ({len(seq):,} messages)")
        self.refs["string" if isinstance(r.reference_answer, str) else "object"] += 1
        for k in r.metadata:
            self._count(self.meta, k)
        chars = sum(len(m["content"]) for m in r.messages)
        self.chars_min = chars if self.chars_min is None else min(self.chars_min, chars)
        self.chars_max, self.chars_total = max(self.chars_max, chars), self.chars_total + chars
        self.valid += 1
        self.derived += derived
        self.with_tools += bool(r.tools)

    def result(self, n_records: int) -> dict:
        return {
            "records": n_records,
            "valid_records": self.valid,
            "roles": dict(self.roles), "message_shapes": dict(self.shapes.most_common()),
            "reference_types": dict(self.refs), "metadata_fields": dict(self.meta.most_common()),
            "with_tools": self.with_tools,
            "prompt_chars": ({"min": self.chars_min, "mean": round(self.chars_total / self.valid, 1),
                              "max": self.chars_max} if self.valid else {}),
            "derived_ids": self.derived,
        }


def load_records(path: str | os.PathLike, allow_small: bool = False, *,
                 min_records: int = MIN_RECORDS, max_records: int = MAX_RECORDS) -> list[Record]:
    """Read a data file for training or reward runs; UserError listing the problems if invalid."""
    rep = validate_file(path, allow_small=allow_small, min_records=min_records,
                        max_records=max_records)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if rep.problems:
        raise UserError(f"{path} is not valid Bedrock RFT data:\n" + "\n".join(rep.problem_lines()))
    return rep.records


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping | Record]) -> int:
    """Write rows (dicts or Records) as UTF-8 JSONL atomically (temp file + rename); return count."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                obj = row.to_json_dict() if isinstance(row, Record) else row
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException as e:  # leave no temp file behind, and the old file as it was
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        if isinstance(e, (TypeError, ValueError)):  # not JSON-serializable, a lone surrogate
            raise UserError(f"cannot write {path}: row {n + 1}: {e}") from None
        raise
    return n


# ---------------------------------------------------------------- GSM8K -> Bedrock RFT records







