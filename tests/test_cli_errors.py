"""User mistakes at the command line end in `error: ...` and exit 2, never a traceback.

Each test runs the real `grpo` CLI as a subprocess on real files in tmp_path: `grpo reward check`
with a bad responses file or a bad Lambda endpoint, `grpo eval` with bad flags or an unwritable --out,
and `grpo quickstart` data written to the paths the config names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_engine import GSM8K_HANDLER, cli_env, run_grpo, write_data  # noqa: E402

ARN = "arn:aws:lambda:us-east-1:123456789012:function:x"


def assert_user_error(res, *needles: str) -> None:
    """Exit 2, `error:` on stderr naming every needle, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "error: " in res.stderr, res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


@pytest.fixture
def data(tmp_path) -> Path:
    train, _ = write_data(tmp_path / "data", n_train=4, n_val=2)
    return train


def reward_check(data: Path, *args) -> object:
    return run_grpo("reward", "check", "--handler", GSM8K_HANDLER, "--data", data, "--allow-small", *args,
                    timeout=60)


# ---------------------------------------------------------------- grpo reward check --responses

def test_responses_file_with_invalid_utf8_names_file_line_field(tmp_path, data):
    bad = tmp_path / "responses.jsonl"
    bad.write_bytes(b'{"id": "train-00000", "response": "#### 1"}\n{"id": "train-00001", "response": "\xff"}\n')
    res = reward_check(data, "--responses", bad)
    assert_user_error(res, f"{bad}:2: encoding: not valid UTF-8 (byte 0xff")


def test_responses_file_with_a_bom_is_accepted_with_a_warning(tmp_path, data):
    first = json.loads(data.read_text().splitlines()[0])
    good = tmp_path / "responses.jsonl"
    good.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": first["id"], "response": first["reference_answer"]}).encode()
                     + b"\n")
    res = reward_check(data, "--responses", good, "--json")
    assert res.returncode == 0, res.stderr
    assert f"warning: {good}:1: encoding: UTF-8 byte order mark" in res.stderr
    report = json.loads(res.stdout)
    assert report["n_trajectories"] == 1 and report["score"]["mean"] == 1.0  # the reference scores 1
    # a byte order mark anywhere but the start is still an error
    good.write_bytes(good.read_bytes() + b"\xef\xbb\xbf{}\n")
    assert_user_error(reward_check(data, "--responses", good),
                      f"{good}:2: encoding: UTF-8 byte order mark in the middle of the file")


def test_responses_file_problems_listed_up_to_fifty(tmp_path, data):
    bad = tmp_path / "responses.jsonl"
    bad.write_text("".join(json.dumps({"id": f"nope-{i}", "response": "x"}) + "\n" for i in range(60))
                   + "[1]\n" + "{not json\n", encoding="utf-8")
    res = reward_check(data, "--responses", bad)
    assert_user_error(res, f"{bad}:1: id: 'nope-0' is not a record id", f"{bad}:50: id: 'nope-49'",
                      "... and 12 more", "62 problems")
    assert f"{bad}:51:" not in res.stderr
    # the object and JSON checks, on a short file so that they are shown
    bad.write_text("[1]\n{not json\n" + json.dumps({"id": "train-00000"}) + "\n", encoding="utf-8")
    assert_user_error(reward_check(data, "--responses", bad), f"{bad}:1: record: expected a JSON object",
                      f"{bad}:2: json: invalid JSON", f"{bad}:3: response: missing or not a string")


def test_responses_path_missing_or_a_directory(tmp_path, data):
    assert_user_error(reward_check(data, "--responses", tmp_path / "none.jsonl"), "none.jsonl: no such file")
    assert_user_error(reward_check(data, "--responses", tmp_path), "is a directory")


# ---------------------------------------------------------------- the Lambda client (ARN handlers)

@pytest.fixture
def aws_env(monkeypatch, tmp_path) -> dict:
    """Fake credentials, no profile files or instance metadata: nothing reaches AWS."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


def test_bad_endpoint_url_or_region_is_a_user_error(aws_env, data):
    for flags, needles in ((("--endpoint-url", "not-a-url"), ("endpoint not-a-url", "Invalid endpoint")),
                           (("--region", "bad_region!"), ("region 'bad_region!'", "doesn't match"))):
        res = run_grpo("reward", "check", "--handler", ARN, *flags, "--data", data, "--allow-small",
                       env=cli_env(**aws_env), timeout=60)
        assert_user_error(res, "cannot make a Lambda client for " + ARN, *needles)


def test_connect_timeout_is_retried_then_reported(aws_env):
    """A real loopback listener whose accept queue is full: the kernel drops new SYNs, so botocore's
    connect times out (ConnectTimeoutError, not EndpointConnectionError), and that is retried."""
    import socket

    from grpo.reward.lambda_client import LambdaInvoker, parse_arn

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)  # never accepted: the queue fills with our own connections
    port = server.getsockname()[1]
    fillers, timed_out = [], False
    try:
        for _ in range(8):
            c = socket.socket()
            c.settimeout(0.3)
            fillers.append(c)
            try:
                c.connect(("127.0.0.1", port))
            except (TimeoutError, socket.timeout):
                timed_out = True
                break
        assert timed_out, "the listener's accept queue never filled"
        invoker = LambdaInvoker(parse_arn(ARN), endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=0.2,
                                max_retries=2, retry_base_s=0.01)
        try:
            out = invoker.call(b"[]")
        finally:
            invoker.close()
    finally:
        for c in fillers:
            c.close()
        server.close()
    assert out.kind == "invoke" and "after 3 tries" in out.message, out.message
    assert "last: ConnectTimeoutError" in out.message, out.message


# ---------------------------------------------------------------- grpo eval

MKDIR_HANDLER = '''\
"""Scores 0, and first makes a directory where the eval's --out file is to go (EVAL_TEST_MKDIR)."""
import os


def lambda_handler(event, context):
    os.makedirs(os.environ["EVAL_TEST_MKDIR"], exist_ok=True)
    if isinstance(event, dict):
        event = event["trajectories"]
    return [{"id": t["id"], "aggregate_reward_score": 0.0} for t in event]
'''


def eval_cli(data: Path, model, *args, env: dict | None = None):
    return run_grpo("eval", "--model", model, "--data", data, "--handler", GSM8K_HANDLER, *args,
                    env=env, timeout=120)


@pytest.mark.parametrize("flags, needle", [
    (("--limit", "0"), "argument --limit: must be >= 1, got 0"),
    (("--limit", "-2"), "argument --limit: must be >= 1, got -2"),
    (("--samples", "0"), "argument --samples: must be >= 1, got 0"),
    (("--max-tokens", "0"), "argument --max-tokens: must be >= 1, got 0"),
    (("--temperature", "-0.5"), "argument --temperature: must be a finite number >= 0"),
    (("--temperature", "nan"), "argument --temperature: must be a finite number >= 0"),
    (("--top-p", "0"), "argument --top-p: must be in (0, 1]"),
    (("--temperature", "0"), "--temperature 0: local sampling"),
])
def test_eval_rejects_bad_numbers_before_loading_anything(tmp_path, flags, needle):
    # neither the model nor the data exist: the flag is checked first
    assert_user_error(eval_cli(tmp_path / "none.jsonl", tmp_path / "no-model", *flags), needle)


def test_eval_out_checked_before_the_model_loads(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    no_model = tmp_path / "no-model"  # would fail if it were loaded: the --out error must come first
    assert_user_error(eval_cli(data, no_model, "--out", tmp_path), f"--out {tmp_path}: is a directory")
    assert_user_error(eval_cli(data, no_model, "--out", data / "sub" / "s.jsonl"), f"{data} is a file, not a folder")
    assert not list(tmp_path.glob(".*.tmp"))


def test_eval_prints_the_result_then_writes_out_atomically(tmp_path):
    from helpers_engine import build_model_dir

    model = build_model_dir(tmp_path / "model")
    _, val = write_data(tmp_path / "data", n_train=2, n_val=3)
    out = tmp_path / "new" / "folder" / "samples.jsonl"
    res = eval_cli(val, model, "--max-tokens", "4", "--limit", "2", "--samples", "2", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["records"] == 2 and got["samples"] == 4
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in rows) == ["validation-00000#0", "validation-00000#1",
                                             "validation-00001#0", "validation-00001#1"]
    assert f"wrote 4 samples to {out}" in res.stderr and not list(out.parent.glob(".*.tmp"))
    # --out becomes unwritable during the run (the handler makes a directory there): the result is
    # still printed, then the write fails as a user error, not a traceback
    handler = tmp_path / "mkdir_handler.py"
    handler.write_text(MKDIR_HANDLER, encoding="utf-8")
    late = tmp_path / "late.jsonl"
    res = run_grpo("eval", "--model", model, "--data", val, "--handler", handler, "--max-tokens", "4",
                   "--limit", "1", "--out", late, "--json", "--env", "EVAL_TEST_MKDIR",
                   env=cli_env(EVAL_TEST_MKDIR=str(late)), timeout=120)
    assert json.loads(res.stdout)["samples"] == 1
    assert_user_error(res, f"{late}: is a directory")


# ---------------------------------------------------------------- grpo quickstart's data files

def quickstart_until_training(tmp_path: Path, config: dict):
    """`grpo quickstart` with `config` (configs/quickstart.yaml changed by it): the data is written, then
    the run stops at once as a user error, because the output directory already holds a run."""
    import yaml
    from helpers_engine import REPO

    job = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    job["engine"]["model"] = str(tmp_path / "no-model-needed")
    job["engine"]["handler"] = str(GSM8K_HANDLER)
    job.pop("validation_file")
    job.update(config)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("", encoding="utf-8")
    res = run_grpo("quickstart", "--config", path, "--output-dir", run_dir, "--no-progress", cwd=tmp_path, timeout=60)
    assert_user_error(res, "already holds a run")
    return res


def test_quickstart_writes_the_files_the_config_names_and_nothing_else(tmp_path):
    from grpo.data import load_records
    from grpo.models.tiny_data import make_arithmetic_records

    folder = tmp_path / "data"
    folder.mkdir()
    mine = {"train.jsonl": "my own training data\n", "validation.jsonl": "my own validation data\n"}
    for name, text in mine.items():
        (folder / name).write_text(text, encoding="utf-8")
    res = quickstart_until_training(tmp_path, {"training_file": "data/arith-train.jsonl",
                                               "validation_file": "data/sub/arith-val.jsonl"})
    assert "wrote the quickstart data: data/arith-train.jsonl, data/sub/arith-val.jsonl" in res.stdout
    for name, text in mine.items():  # same-folder files of the old fixed names are not touched
        assert (folder / name).read_text(encoding="utf-8") == text
    train = load_records(folder / "arith-train.jsonl")
    val = load_records(folder / "sub" / "arith-val.jsonl")
    assert len(train) == 2000 and len(val) == 200
    assert train[0].to_json_dict() == make_arithmetic_records(1, seed=0, split="train")[0]
    assert val[0].id == "validation-00000"
    assert sorted(p.name for p in folder.rglob("*")) == ["arith-train.jsonl", "arith-val.jsonl", "sub",
                                                        "train.jsonl", "validation.jsonl"]  # no temp files left


def test_quickstart_without_validation_file_and_with_an_existing_training_file(tmp_path):
    res = quickstart_until_training(tmp_path, {"training_file": "t.jsonl"})  # no validation_file: no TypeError
    assert "wrote the quickstart data: t.jsonl\n" in res.stdout
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["t.jsonl"]
    # an existing training file is kept; only the missing validation file is written
    (tmp_path / "t.jsonl").write_text("kept\n", encoding="utf-8")
    res = quickstart_until_training(tmp_path, {"training_file": "t.jsonl", "validation_file": "v.jsonl"})
    assert "wrote the quickstart data: v.jsonl\n" in res.stdout
    assert (tmp_path / "t.jsonl").read_text(encoding="utf-8") == "kept\n"
    assert len((tmp_path / "v.jsonl").read_text(encoding="utf-8").splitlines()) == 200
