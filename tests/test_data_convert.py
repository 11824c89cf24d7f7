"""`grpo data convert`: a local Hugging Face dataset (save_to_disk, one dataset or a dict of splits), parquet, CSV
and JSON Lines into Bedrock RFT JSONL that `grpo data validate` accepts; column mapping, a system message, ids,
kept metadata; every bad row named as SOURCE:row N: column: message, exit 2, nothing written."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from grpo.cli import main
from grpo.data import validate_file

datasets = pytest.importorskip("datasets")

ROWS = [{"question": f"What is {i} + {i}?", "answer": 2 * i, "level": i % 3, "uid": f"q{i}"} for i in range(4)]


def grpo(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(d / "arith.parquet"))
    ds.to_csv(str(d / "arith.csv"), index=False)
    ds.to_json(str(d / "arith.jsonl"))
    ds.save_to_disk(str(d / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(d / "splits"))
    return d


@pytest.mark.parametrize("name", ["arith.parquet", "arith.csv", "arith.jsonl", "one"])
def test_every_format_gives_the_same_valid_records(sources, tmp_path, name):
    out = tmp_path / "out.jsonl"
    code, text, _ = grpo("data", "convert", sources / name, "--out", out, "--prompt-column", "question",
                         "--system", "Answer with a number.", "--keep", "level")
    assert code == 0, text
    assert f"wrote 4 records to {out}" in text and "fewer than 100" in text
    stem = name.split(".")[0]
    assert read(out)[3] == {"id": f"{stem}-3", "reference_answer": "6", "level": 0, "messages": [
        {"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 3 + 3?"}]}
    rep = validate_file(out, allow_small=True)
    assert rep.ok and len(rep.records) == 4


def test_a_split_of_a_saved_dict_and_ids_from_a_column(sources, tmp_path):
    out = tmp_path / "test.jsonl"
    code, text, _ = grpo("data", "convert", sources / "splits", "--split", "test", "--out", out,
                         "--prompt-column", "question", "--id-column", "uid")
    assert code == 0 and "(split test)" in text
    assert [r["id"] for r in read(out)] == ["q0", "q1"]
    code, _, err = grpo("data", "convert", sources / "splits", "--split", "dev", "--out", out)
    assert code == 2 and "error: --split dev:" in err and "train, test" in err
    code, _, _ = grpo("data", "convert", sources / "splits", "--out", out, "--prompt-column", "question")
    assert code == 0 and read(out)[0]["id"] == "splits-train-0"  # train by default, named in the id


def test_a_chat_format_column_is_the_conversation(tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "2+2?"}], "ref": {"answer": "4"}}) + "\n")
    out = tmp_path / "o.jsonl"
    assert grpo("data", "convert", src, "--out", out, "--prompt-column", "messages", "--answer-column", "ref")[0] == 0
    assert read(out) == [{"id": "chat-0", "reference_answer": {"answer": "4"}, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]}]
    code, _, err = grpo("data", "convert", src, "--out", out, "--prompt-column", "messages", "--answer-column", "ref",
                        "--system", "Again.")
    assert code == 2 and f"{src}:row 1: messages: already starts with a system message" in err


def test_bad_rows_are_all_named_and_nothing_is_written(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("question,answer\nWhat is 1+1?,2\n,3\nWhat is 2+2?,\n   ,4\n")
    out = tmp_path / "o.jsonl"
    code, _, err = grpo("data", "convert", src, "--out", out, "--prompt-column", "question")
    assert code == 2 and not out.exists() and "Traceback" not in err
    assert err.splitlines()[1:] == [f"{src}:row 2: question: is null", f"{src}:row 3: answer: is null",
                                    f"{src}:row 4: question: is empty", "3 problems"]
    code, _, err = grpo("data", "convert", src, "--out", out, "--prompt-column", "q")
    assert code == 2 and "no column 'q' (--prompt-column q); its columns: question, answer" in err
    for missing in (tmp_path / "nope.parquet", tmp_path / "x.txt"):
        missing.touch() if missing.suffix == ".txt" else None
        code, _, err = grpo("data", "convert", missing, "--out", out)
        assert code == 2 and err.startswith(f"error: {missing}:"), err


def test_a_kept_column_must_be_json(tmp_path):
    import datetime

    src = tmp_path / "when.parquet"
    datasets.Dataset.from_list([{"prompt": "p", "answer": "a", "when": datetime.datetime(2026, 1, 1)}]).to_parquet(str(src))
    code, _, err = grpo("data", "convert", src, "--out", tmp_path / "o.jsonl", "--keep", "when")
    assert code == 2 and f"{src}:row 1: when: a datetime value is not JSON; leave it out of --keep" in err, err


def test_what_bedrock_rules_refuse_after_mapping_names_the_row(tmp_path):
    src = tmp_path / "dup.jsonl"
    src.write_text("".join(json.dumps({"prompt": "p", "answer": "a", "uid": u}) + "\n" for u in ("a", "b", "a")))
    code, _, err = grpo("data", "convert", src, "--out", tmp_path / "o.jsonl", "--id-column", "uid")
    assert code == 2 and f'{src}:row 3: id: duplicate id "a" (first used on line 1)' in err
