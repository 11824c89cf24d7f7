"""Bedrock RFT data: every rule of spec section 1 on small real files, the CLI on nasty files in real
subprocesses (exit codes, no traceback), atomic writes, and the GSM8K conversion of the real data."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo.data import GSM8K_SUFFIX, Problem, Record, load_records, validate_file, write_jsonl
from grpo.errors import UserError
from grpo.gsm8k import convert_gsm8k, gsm8k_to_records

REPO = Path(__file__).resolve().parents[1]
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(),
                                 reason=f"shared GSM8K data not found at {GSM8K}")
GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}], "reference_answer": "#### 4"}


def good_lines(n: int, **extra) -> list[str]:
    return [json.dumps({**GOOD, **extra}) for _ in range(n)]


def write(tmp_path: Path, lines: list[str] | bytes, name: str = "data.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode())
    return p


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo", "data", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def with_one_bad(tmp_path: Path, bad: str | dict) -> list[str]:
    """Problems of a file whose line 1 is `bad` and whose 99 other lines are valid."""
    line = bad if isinstance(bad, str) else json.dumps(bad)
    p = write(tmp_path, [line] + good_lines(99 if line.strip() else 100))  # blank: not a record
    return [str(x) for x in validate_file(p).problems]


def msg(**over):
    return {**GOOD, **over}


CASES = [  # (line 1, the one expected "field: message")
    ("[1, 2]", "record: expected a JSON object, got list"),
    ("null", "record: expected a JSON object, got null"),
    ("42", "record: expected a JSON object, got number"),
    ('"text"', "record: expected a JSON object, got string"),
    ({"reference_answer": "x"}, "messages: missing; need a list with at least one user message"),
    (msg(messages="hi"), "messages: expected a non-empty list of messages, got string"),
    (msg(messages=[]), "messages: is empty; need at least one user message"),
    (msg(messages=[{"role": "user", "content": "q"}, "hi"]),
     "messages[1]: expected an object with role and content, got string"),
    (msg(messages=[{"content": "q"}, {"role": "user", "content": "q"}]), "messages[0].role: missing"),
    (msg(messages=[{"role": "bot", "content": "q"}, {"role": "user", "content": "q"}]),
     'messages[0].role: "bot" is not one of system, user, assistant'),
    (msg(messages=[{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]),
     "messages[1].role: a system message is only allowed first"),
    (msg(messages=[{"role": "user"}]), "messages[0].content: missing"),
    (msg(messages=[{"role": "user", "content": "  "}]), "messages[0].content: is empty"),
    (msg(messages=[{"role": "user", "content": ["q"]}]),
     "messages[0].content: expected a non-empty string, got list"),
    (msg(messages=[{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]),
     "messages: no user message; need at least one"),
    ({"messages": GOOD["messages"]}, "reference_answer: missing; give a non-empty string or object"),
    (msg(reference_answer=""), "reference_answer: is an empty string"),
    (msg(reference_answer={}), "reference_answer: is an empty object"),
    (msg(reference_answer=18), "reference_answer: expected a non-empty string or object, got number"),
    (msg(reference_answer=None), "reference_answer: expected a non-empty string or object, got null"),
    (msg(id=""), "id: is empty"),
    (msg(id=None), "id: expected a non-empty string (or an integer), got null"),
    (msg(id=True), "id: expected a non-empty string (or an integer), got boolean"),
    (msg(id=1.5), "id: expected a non-empty string (or an integer), got number"),
    (msg(tools={"a": 1}), "tools: expected a list of function definitions, got object"),
    (msg(tools=["f"]), "tools[0]: expected an object, got string"),
    (msg(tools=[{"type": "fn", "function": {"name": "f"}}]), 'tools[0].type: expected "function", got "fn"'),
    (msg(tools=[{"type": "function"}]), "tools[0].function: missing"),
    (msg(tools=[{"type": "function", "function": {"name": ""}}]), "tools[0].function.name: is empty"),
    (msg(tools=[{"type": "function", "function": {}}]),
     "tools[0].function.name: expected a non-empty string, got null"),
    (msg(tools=[{"type": "function", "function": {"name": "f"}}] * 2),
     'tools[1].function.name: duplicate tool name "f" (also tools[0])'),
    (msg(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     "tools[0].function.parameters: expected an object, got list"),
    (msg(tools=[{"type": "function", "function": {"name": "f", "description": 3}}]),
     "tools[0].function.description: expected a string, got number"),
    (msg(tools=[{"type": "function", "function": {"name": "get weather"}}]),
     'tools[0].function.name: "get weather" must be 1-64 letters, digits, _ or - (OpenAI\'s rule for function names)'),
    (msg(tools=[{"type": "function", "function": {"name": "f", "strict": "yes"}}]),
     "tools[0].function.strict: expected true or false, got string"),
    (msg(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     'tools[0].function.parameters.type: expected "object" (a function takes named arguments), got "array"'),
    (msg(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}}}]),
     'tools[0].function.parameters.required: names "b", not among its properties'),
    (msg(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"city": {"type": "str"}}}}}]),
     'tools[0].function.parameters.properties.city.type: "str" is not a JSON schema type (object, array, string, '
     'number, integer, boolean, null)'),
    (msg(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "items": "number"}}}}}]),
     "tools[0].function.parameters.properties.xs.items: expected a schema object or a boolean, got string"),
    (msg(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"u": {"type": "string", "enum": []}}}}}]),
     "tools[0].function.parameters.properties.u.enum: is empty; list the allowed values"),
    ('{"messages": [{"role": "user", "content": "q"}], "reference_ans',
     "json: invalid JSON: Unterminated string starting at column 50 (the line ends early: truncated?)"),
    ('{"messages": [', "json: invalid JSON: Expecting value at column 15 (the line ends early: truncated?)"),
    ('{"a": 1} {"b": 2}', "json: invalid JSON: Extra data at column 10"),
    ('{"a": NaN}', "json: invalid JSON: NaN is not standard JSON"),
    ("[" * 200_000, "json: invalid JSON: nested too deeply"),
    ("", "line: blank line; remove it (one JSON object per line)"),
    (" \t", "line: blank line; remove it (one JSON object per line)"),
]


@pytest.mark.parametrize("bad,expected", CASES, ids=[c[1][:50] for c in CASES])
def test_each_rule_reports_file_line_field(tmp_path, bad, expected):
    assert with_one_bad(tmp_path, bad) == [f"{tmp_path / 'data.jsonl'}:1: {expected}"]


def test_invalid_utf8_is_reported_with_its_byte(tmp_path):
    p = write(tmp_path, b'{"a": "\xff"}\n' + ("\n".join(good_lines(99)) + "\n").encode())
    assert [str(x) for x in validate_file(p).problems] == [
        f"{p}:1: encoding: not valid UTF-8 (byte 0xff at column 8)"]


def test_bom_on_line_one_is_a_warning_elsewhere_an_error(tmp_path):
    lines = good_lines(100)
    rep = validate_file(write(tmp_path, b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode()))
    assert rep.ok and len(rep.records) == 100
    assert [(w.line, w.field) for w in rep.warnings] == [(1, "encoding")]
    p = write(tmp_path, ("\n".join(lines[:1] + ["\ufeff" + lines[1]] + lines[2:]) + "\n").encode())
    assert [str(x) for x in validate_file(p).problems] == [
        f"{p}:2: encoding: UTF-8 byte order mark in the middle of the file"]


def test_line_endings_crlf_and_missing_final_newline_are_fine(tmp_path):
    assert validate_file(write(tmp_path, "\r\n".join(good_lines(100)).encode())).ok


def test_every_problem_is_reported_with_a_count(tmp_path):
    lines = good_lines(100)
    lines[1] = json.dumps(msg(messages=[{"role": "robot", "content": "q"}, {"role": "user",
                                                                           "content": "q"}]))
    lines[4] = json.dumps({"messages": GOOD["messages"]})
    lines[6] = json.dumps(msg(id=""))
    p = write(tmp_path, lines)
    r = cli("validate", str(p))
    assert r.returncode == 2, r.stderr
    assert r.stdout.splitlines() == [
        f'{p}:2: messages[0].role: "robot" is not one of system, user, assistant',
        f"{p}:5: reference_answer: missing; give a non-empty string or object",
        f"{p}:7: id: is empty",
        f"3 problems in {p}",
    ]


def test_several_problems_on_one_line_are_all_reported(tmp_path):
    bad = {"messages": [{"role": "system", "content": ""}], "reference_answer": [], "id": False}
    assert [x.split(":1: ")[1] for x in with_one_bad(tmp_path, bad)] == [
        "messages[0].content: is empty", "messages: no user message; need at least one",
        "reference_answer: expected a non-empty string or object, got list",
        "id: expected a non-empty string (or an integer), got boolean"]


def test_printed_problems_are_capped_but_all_counted(tmp_path):
    p = write(tmp_path, ["[]"] * 120)
    r = cli("validate", str(p))
    out = r.stdout.splitlines()
    assert r.returncode == 2 and len(out) == 52
    assert out[49] == f"{p}:50: record: expected a JSON object, got list"
    assert out[50:] == ["... and 70 more", f"120 problems in {p}"]
    assert len(validate_file(p).problems) == 120


def test_ids_given_derived_and_colliding(tmp_path):
    lines = good_lines(100)
    lines[0] = json.dumps(msg(id=7))
    lines[1] = json.dumps(msg(id="a"))
    rep = validate_file(write(tmp_path, lines))
    assert rep.ok
    assert [r.id for r in rep.records[:4]] == ["7", "a", "line-3", "line-4"]
    assert rep.summary["derived_ids"] == 98
    lines[2] = json.dumps(msg(id="7"))  # 7 and "7" are the same id
    lines[3] = json.dumps(msg(id="a"))
    lines[9] = json.dumps(msg(id="line-6"))  # line 6 has no id, so its derived id is line-6
    p = write(tmp_path, lines)
    assert [str(x) for x in validate_file(p).problems] == [
        f'{p}:3: id: duplicate id "7" (first used on line 1)',
        f'{p}:4: id: duplicate id "a" (first used on line 2)',
        f'{p}:10: id: "line-6" is also the id derived for line 6 (which has no id); '
        "rename one of them"]


def test_records_metadata_tools_and_summary(tmp_path):
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"},
                                               "description": "adds"}}]
    lines = good_lines(98, difficulty="easy") + [
        json.dumps({"id": "s", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a"},
                                            {"role": "user", "content": "q2"}],
                    "reference_answer": {"answer": "72"}, "tools": tools, "source": "x"}),
        json.dumps(msg(tools=None))]
    rep = validate_file(write(tmp_path, lines))
    assert rep.ok and len(rep.records) == 100
    r = rep.records[98]
    assert (r.line, r.id, r.reference_answer, r.tools, r.metadata) == (
        99, "s", {"answer": "72"}, tools, {"source": "x"})
    assert rep.records[0].metadata == {"difficulty": "easy"} and rep.records[99].tools is None
    s = rep.summary
    assert s["records"] == 100 and s["with_tools"] == 1
    assert s["roles"] == {"user": 101, "system": 1, "assistant": 1}
    assert s["message_shapes"] == {"user": 99, "system,user,assistant,user": 1}
    assert s["reference_types"] == {"string": 99, "object": 1}
    assert s["metadata_fields"] == {"difficulty": 98, "source": 1}
    assert r.to_json_dict() == {"id": "s", "messages": r.messages, "reference_answer":
                                {"answer": "72"}, "tools": tools, "source": "x"}


def test_record_count_limits_and_allow_small(tmp_path):
    p = write(tmp_path, good_lines(99))
    assert [str(x) for x in validate_file(p).problems] == [
        f"{p}: records: 99 records; Bedrock needs at least 100 "
        "(--allow-small accepts fewer for local prototyping)"]
    rep = validate_file(p, allow_small=True)
    assert rep.ok and [str(w) for w in rep.warnings] == [
        f"{p}: records: 99 records; Bedrock needs at least 100 (allowed by --allow-small)"]
    r = cli("validate", str(p), "--allow-small")
    assert r.returncode == 0 and "warning:" in r.stdout and "OK, 99 records" in r.stdout
    empty = write(tmp_path, b"", "empty.jsonl")
    assert [x.message for x in validate_file(empty, allow_small=True).problems] == [
        "no records in the file"]
    big = write(tmp_path, good_lines(20_001), "big.jsonl")
    assert [str(x) for x in validate_file(big, allow_small=True).problems] == [
        f"{big}: records: 20,001 records; Bedrock accepts at most 20,000"]
    assert validate_file(write(tmp_path, good_lines(20_000), "max.jsonl")).ok


def test_valid_file_cli_summary_exits_0(tmp_path):
    p = write(tmp_path, good_lines(100, difficulty="easy"))
    r = cli("validate", str(p))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{p}: OK, 100 records" in r.stdout
    for part in ("roles: user 100", "[user] x100", "reference_answer: string 100",
                 "metadata fields: difficulty 100", "0 given, 100 derived as line-<LINE>"):
        assert part in r.stdout


NASTY = {  # name -> (content, expected exit code)
    "truncated": ((("\n".join(good_lines(100)) + "\n")[:-30]).encode(), 2),
    "bom": (b"\xef\xbb\xbf" + ("\n".join(good_lines(100)) + "\n").encode(), 0),
    "blank_lines": (("\n".join(good_lines(50) + ["", "  "] + good_lines(50)) + "\n\n").encode(), 2),
    "binary_junk": (bytes(range(256)) * 40, 2),
    "five_mb_line": (("\n".join(good_lines(99) + [json.dumps(msg(note="x" * 5_000_000))])
                      + "\n").encode(), 0),
    "top_level_list": (b"[" + b",".join(json.dumps(GOOD).encode() for _ in range(3)) + b"]\n", 2),
    "null": (b"null\n", 2),
    "deep_nesting": (b"[" * 500_000 + b"\n", 2),
    "empty": (b"", 2),
    "nul_bytes": (b"\x00" * 1000, 2),
}


@pytest.mark.parametrize("name", list(NASTY))
def test_cli_on_nasty_files_never_tracebacks(tmp_path, name):
    content, code = NASTY[name]
    p = write(tmp_path, content, f"{name}.jsonl")
    r = cli("validate", str(p))
    assert "Traceback" not in r.stderr + r.stdout
    assert r.returncode == code, r.stdout[-2000:] + r.stderr
    out = [x for x in r.stdout.splitlines() if not x.startswith("warning: ")]
    assert (out[-1].endswith(f"in {p}") and "problem" in out[-1]) if code else \
        out[0].startswith(f"{p}: OK")


def test_blank_lines_are_named(tmp_path):
    p = write(tmp_path, NASTY["blank_lines"][0])
    assert [str(x) for x in validate_file(p).problems] == [
        f"{p}:{n}: line: blank line; remove it (one JSON object per line)" for n in (51, 52, 103)]


@pytest.mark.parametrize("target", ["missing.jsonl", "."])
def test_cli_missing_file_or_directory_is_a_clear_error(tmp_path, target):
    r = cli("validate", str(tmp_path / target))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    want = "no such file" if target != "." else "is a directory; expected a JSONL file"
    assert r.stderr.startswith("error: ") and want in r.stderr


def test_load_records_raises_user_error_listing_problems(tmp_path, capsys):
    lines = good_lines(100)
    lines[2] = "{oops"
    p = write(tmp_path, lines)
    with pytest.raises(UserError) as e:
        load_records(p)
    assert str(e.value).splitlines() == [
        f"{p} is not valid Bedrock RFT data:",
        f"{p}:3: json: invalid JSON: Expecting property name enclosed in double quotes at column 2",
        f"1 problem in {p}"]
    small = write(tmp_path, good_lines(5), "small.jsonl")
    records = load_records(small, allow_small=True)
    assert [r.id for r in records] == [f"line-{n}" for n in range(1, 6)]
    assert isinstance(records[0], Record)
    assert f"warning: {small}: records: 5 records" in capsys.readouterr().err
    assert str(Problem("f", None, "records", "m")) == "f: records: m"


def test_write_jsonl_is_atomic_and_reusable(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    rows = [msg(id=str(i)) for i in range(100)]
    assert write_jsonl(out, rows) == 100
    recs = load_records(out)
    assert [r.id for r in recs] == [str(i) for i in range(100)]
    assert write_jsonl(out, recs) == 100 and load_records(out) == [
        Record(line=r.line, id=r.id, messages=r.messages, reference_answer=r.reference_answer,
               metadata={}, tools=None) for r in recs]
    before = out.read_bytes()

    def failing():
        yield rows[0]
        raise UserError("stop halfway")

    with pytest.raises(UserError, match="stop halfway"):
        write_jsonl(out, failing())
    assert out.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no temp file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(UserError, match=r"row 2: .*surrogate"):
        write_jsonl(out, [rows[0], {"text": "\ud800"}])
    assert out.read_bytes() == before
    with pytest.raises(UserError, match="is a directory"):
        write_jsonl(tmp_path, rows)


@needs_gsm8k
def test_gsm8k_test_split_conversion_matches_the_spec(tmp_path):
    out = tmp_path / "gsm8k_test.jsonl"
    r = subprocess.run([sys.executable, "-m", "grpo", "data", "gsm8k", "--input",
                        str(GSM8K / "test.jsonl"), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"wrote 1,319 records to {out}"]
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    question = json.loads((GSM8K / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])["question"]
    assert question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first == {"id": "gsm8k-test-0", "reference_answer": "#### 18", "messages": [
        {"role": "user", "content": question + " Let's think step by step and output the final "
                                               "answer after '####'."}]}
    assert GSM8K_SUFFIX == " Let's think step by step and output the final answer after '####'."
    v = cli("validate", str(out))
    assert v.returncode == 0 and "OK, 1,319 records" in v.stdout, v.stdout
    again = tmp_path / "again.jsonl"
    convert_gsm8k(GSM8K / "test.jsonl", again)
    assert again.read_bytes() == out.read_bytes()  # stable ids and content across runs


@needs_gsm8k
def test_gsm8k_train_validates_quickly(tmp_path):
    out = tmp_path / "train.jsonl"
    assert convert_gsm8k(GSM8K, out, split="train") == 7473  # a directory holding train.jsonl
    t0 = time.perf_counter()
    rep = validate_file(out)
    elapsed = time.perf_counter() - t0
    assert rep.ok and len(rep.records) == 7473 and rep.records[-1].id == "gsm8k-train-7472"
    assert elapsed < 2.0, f"validating 7,473 records took {elapsed:.2f} s"
    refs = {r.reference_answer for r in rep.records}
    assert "#### 1,080" in refs  # numbers are kept as they appear after #### in the source


@needs_gsm8k
def test_gsm8k_limit(tmp_path):
    out = tmp_path / "few.jsonl"
    r = subprocess.run([sys.executable, "-m", "grpo", "data", "gsm8k", "--input",
                        str(GSM8K / "test.jsonl"), "--out", str(out), "--limit", "3"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "wrote 3 records" in r.stdout
    assert [r.id for r in load_records(out, allow_small=True)] == [f"gsm8k-test-{i}" for i in range(3)]


def test_gsm8k_malformed_rows_name_file_and_line(tmp_path):
    src = write(tmp_path, [json.dumps({"question": "q", "answer": "so\n#### 5"}),
                           json.dumps({"question": "", "answer": "no marker"}),
                           json.dumps(["not", "a", "row"]), "{broken"], "g.jsonl")
    r = subprocess.run([sys.executable, "-m", "grpo", "data", "gsm8k", "--input", str(src),
                        "--out", str(tmp_path / "o.jsonl")], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{src}:4: json: invalid JSON" in r.stderr  # unparsable lines are reported first
    src.write_text("\n".join(src.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(UserError) as e:
        convert_gsm8k(src, tmp_path / "o.jsonl")
    assert str(e.value).splitlines()[1:] == [
        f"{src}:2: question: is empty",
        f"{src}:2: answer: the last line must be '#### <answer>'",
        f"{src}:3: row: expected an object with question and answer, got list",
        "3 problems"]
    assert not (tmp_path / "o.jsonl").exists()
    assert gsm8k_to_records([{"question": " q ", "answer": "x\n####  -1,000 "}], tag="t") == [
        {"id": "gsm8k-t-0", "messages": [{"role": "user", "content": "q" + GSM8K_SUFFIX}],
         "reference_answer": "#### -1,000"}]


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                    reason="`datasets` is installed: the hub path would need the network")
def test_gsm8k_hub_without_datasets_says_how_to_fix(tmp_path):
    r = cli("gsm8k", "--input", "openai/gsm8k", "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pip install datasets" in r.stderr and "local GSM8K JSONL file" in r.stderr
    r = cli("gsm8k", "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "no such file" in r.stderr
    assert not os.path.exists(tmp_path / "o.jsonl")
