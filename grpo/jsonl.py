"""Reading JSONL files line by line, safely: only regular files, a line over MAX_LINE_BYTES reported without
being read whole, invalid UTF-8, a byte order mark, NaN/Infinity and lone surrogates named as problems of
their line. grpo.data validates Bedrock's records with it; `grpo reward check --responses` reads with it."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any, Iterable

from grpo.errors import UserError

MAX_SHOWN = 50  # problems printed before "... and N more"


BOM = "\ufeff"


MAX_LINE_BYTES = 8 * 2**20  # a record line past this cannot travel to a Lambda (6 MiB) with its responses


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # where a lone surrogate could hide (lone_surrogate)


def capped(lines: list[str], tail: str = "", limit: int = MAX_SHOWN, total: int | None = None) -> list[str]:
    """The first ``limit`` lines, "... and N more", then "N problems<tail>" (``total``: how many there are
    when ``lines`` holds only the first of them)."""
    n = max(len(lines), total or 0)
    more = [f"... and {n - limit:,} more"] if n > limit else []
    return lines[:limit] + more + [f"{n:,} problem{'s' * (n != 1)}{tail}"]


def json_kind(value: Any) -> str:
    """JSON type name of a parsed value, for messages."""
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


class DuplicateKey(ValueError):
    """An object holding the same key twice: JSON parsers disagree on which value wins (Python's keeps the
    last; Bedrock's may keep another), so the record means different things to different readers."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
    return out


class LongLine(bytes):
    """What open_lines yields for a line over MAX_LINE_BYTES: its first bytes, and its length."""

    length: int = 0


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """The field path of the first string (or key) holding a lone UTF-16 surrogate, or None."""
    stack = [(where, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if any("\ud800" <= ch <= "\udfff" for ch in v):
                return path or "value"
        elif isinstance(v, dict):
            for k, x in v.items():
                sub = f"{path}.{k}" if path else str(k)
                if any("\ud800" <= ch <= "\udfff" for ch in str(k)):
                    return sub
                stack.append((sub, x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    return None


def parse_line(raw: bytes, lineno: int) -> tuple[Any, tuple[str, str] | None, bool]:
    """Decode and parse one line: (value, (field, message) or None, had_bom)."""
    if isinstance(raw, LongLine):
        return None, ("line", f"is {raw.length:,} bytes long, over the {MAX_LINE_BYTES // 2**20} MiB limit of one "
                              "record line"), False
    try:
        text = raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as e:
        return None, ("encoding", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1})"), False
    had_bom = text.startswith(BOM)
    if had_bom:
        if lineno != 1:
            return None, ("encoding", "UTF-8 byte order mark in the middle of the file"), True
        text = text[1:]
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        if SURROGATE_ESCAPE.search(raw):
            where = lone_surrogate(value)
            if where:
                return None, (where, "holds a lone surrogate escape (\\ud800-\\udfff without its pair): not "
                                     "Unicode text; fix or remove the character"), had_bom
        return value, None, had_bom
    except json.JSONDecodeError as e:
        ends = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated")
        hint = " (the line ends early: truncated?)" if ends else ""
        at = "" if e.msg.endswith(" at") else " at"
        return None, ("json", f"invalid JSON: {e.msg}{at} column {e.colno}{hint}"), had_bom
    except RecursionError:
        return None, ("json", "invalid JSON: nested too deeply"), had_bom
    except DuplicateKey as e:
        key = e.key if len(e.key) <= 64 else e.key[:64] + "..."
        return None, (key, "appears twice in one object; JSON readers differ on which value they keep (Bedrock's "
                           "may not keep the last): keep one"), had_bom
    except ValueError as e:  # NaN/Infinity, integers over Python's digit limit
        return None, ("json", f"invalid JSON: {e}"), had_bom


def open_lines(path: Path) -> Iterable[bytes]:
    """Yield the file's raw lines (a LongLine for one over MAX_LINE_BYTES, not read whole); a missing path,
    a directory or anything but a regular file (a FIFO, a device) is a UserError."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a directory; expected a JSONL file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise UserError(f"{path}: is {kind}; expected a regular JSONL file")
    try:
        with open(path, "rb") as f:
            while line := f.readline(MAX_LINE_BYTES + 1):
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    n = len(line)
                    while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):  # skip the rest of it
                        n += len(more)
                    long = LongLine(line[:64])
                    long.length = n + len(more.rstrip(b"\r\n"))
                    yield long
                else:
                    yield line
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
