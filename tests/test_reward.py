"""The reward runner: event shape, worker processes, failures and policy, the ARN path, the CLI.

Real parts only: handler files in tests/handlers run in real worker processes; the ARN path uses the
real boto3 client over HTTP against tests/lambda_emulator.py on 127.0.0.1; the CLI runs as a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grpo.errors import UserError
from grpo.reward.runner import (
    RewardError,
    RewardRunner,
    check_answer,
    make_trajectory,
    plan_batches,
    split_trajectory_id,
    trajectory_id,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lambda_emulator import LambdaEmulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H = ROOT / "tests" / "handlers"
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 * 3?"}]
ARN = "arn:aws:lambda:us-west-2:123456789012:function:reward-fn"


def trajs(responses, reference="#### 18", metadata=None, record="r"):
    return [make_trajectory(f"{record}{i}", 0, PROMPT, text, reference, metadata) for i, text in enumerate(responses)]


# ------------------------------------------------------------------------------------ event shape
def test_event_shape_string_and_object_reference():
    t = make_trajectory("rec-1", 3, PROMPT, "6*3 = 18\n#### 18", "#### 18", {"difficulty": "easy"})
    assert t == {
        "id": "rec-1#3",
        "messages": PROMPT + [{"role": "assistant", "content": "6*3 = 18\n#### 18"}],
        "reference_answer": {"text": "#### 18"},
        "metadata": {"difficulty": "easy", "reference_answer": "#### 18"},
    }
    assert list(t) == ["id", "messages", "reference_answer", "metadata"]
    assert list(t["metadata"]) == ["reference_answer", "difficulty"]  # the spec example's order
    obj = make_trajectory("rec-2", 0, PROMPT, "72", {"answer": "72"}, None, reasoning_content="6 times 12")
    assert obj["reference_answer"] == {"answer": "72"}
    assert obj["metadata"] == {"reference_answer": {"answer": "72"}}
    assert obj["messages"][-1] == {"role": "assistant", "content": "72", "reasoning_content": "6 times 12"}
    assert json.loads(json.dumps([t, obj])) == [t, obj]  # JSON-serialisable as it is
    assert PROMPT[-1] == {"role": "user", "content": "What is 6 * 3?"}  # prompt not mutated


def test_trajectory_id_format_and_uniqueness():
    assert trajectory_id("a", 0) == "a#0"
    assert split_trajectory_id("a#b#12") == ("a#b", 12)
    ids = [trajectory_id(r, i) for r in ("a", "a#1", "b") for i in range(3)]
    assert len(set(ids)) == len(ids)
    assert all(split_trajectory_id(x) == (r, i) for x, (r, i) in
               zip(ids, [(r, i) for r in ("a", "a#1", "b") for i in range(3)]))


def test_plan_batches_respects_count_and_bytes():
    batches, over = plan_batches([10] * 7, batch_size=3, max_payload=10_000)
    assert batches == [[0, 1, 2], [3, 4, 5], [6]] and over == []
    # [a,b] = 2 + 10 + 1 + 10 = 23 bytes: a third item (34) would pass 30
    batches, over = plan_batches([10, 10, 10, 29, 10], batch_size=10, max_payload=30)
    assert batches == [[0, 1], [2, 4]] and over == [3]  # 29 + 2 > 30 fits in no batch


# ----------------------------------------------------------------------------- local handler runs
def test_local_workers_scores_metrics_and_reuse(tmp_path, monkeypatch):
    probe = tmp_path / "probe.jsonl"
    monkeypatch.setenv("PROBE_FILE", str(probe))
    with RewardRunner(str(H / "good.py"), batch_size=2, max_concurrency=2) as runner:
        res = runner.score(trajs(["#### 18", "nope", "#### 18"]))
        assert res.scores == [1.0, 0.0, 1.0] and res.n_calls == 2 and res.failures == []
        assert res.metrics == {"exact": [1.0, 0.0, 1.0], "length": [7.0, 4.0, 7.0]}
        assert res.metric_types == {"exact": "Reward", "length": "Metric"}
        s = res.summary()
        assert s["reward_exact_mean"] == pytest.approx(2 / 3) and s["reward_length_mean"] == 6.0
        assert s["reward_failures"] == 0 and s["reward_calls"] == 2
    with RewardRunner(f"{H / 'good.py'}:half", max_concurrency=1) as runner:
        assert runner.score(trajs(["x", "y"])).scores == [0.5, 0.5]
    with RewardRunner(str(H / "probe.py"), batch_size=1, max_concurrency=2, pass_env=["PROBE_FILE"]) as runner:
        pids = set()
        for _ in range(3):  # three steps: the same two processes, imported once each
            runner.score(trajs(["a", "b", "c", "d"]))
        rows = [json.loads(line) for line in probe.read_text().splitlines()]
        imports = [r["import"] for r in rows if "import" in r]
        calls = [r for r in rows if "import" not in r]
        pids = {c["pid"] for c in calls}
        assert len(imports) == 2 and set(imports) == pids and os.getpid() not in pids
        assert len(calls) == 12 and all(c["n"] == 1 for c in calls)


def test_context_object_and_exact_event(tmp_path, monkeypatch):
    probe = tmp_path / "probe.jsonl"
    monkeypatch.setenv("PROBE_FILE", str(probe))
    sent = trajs(["#### 18"], reference={"answer": "18"}, metadata={"level": 2})
    with RewardRunner(str(H / "probe.py"), max_concurrency=1, timeout_s=30, pass_env=["PROBE_FILE"]) as runner:
        runner.score(sent)
    call = [json.loads(line) for line in probe.read_text().splitlines()][-1]
    assert call["event"] == sent  # the handler receives exactly the event, as JSON
    assert call["function_name"] == "probe" and call["function_version"] == "$LATEST"
    assert call["invoked_function_arn"] == "arn:aws:lambda:us-west-2:000000000000:function:probe"
    assert call["memory_limit_in_mb"] == "512" and len(call["aws_request_id"]) == 36
    assert call["log_group_name"] == "/aws/lambda/probe" and "[$LATEST]" in call["log_stream_name"]
    assert 25_000 < call["remaining_ms"] <= 30_000


def test_handler_exception_fail_and_skip_policies():
    batch = trajs(["ok", "boom", "ok"])
    with RewardRunner(str(H / "raises.py"), batch_size=1, max_concurrency=2) as runner:
        with pytest.raises(RewardError) as err:
            runner.score(batch)
        assert "ValueError: cannot grade trajectory r1#0: reference is unreadable" in str(err.value)
        assert err.value.result.scores == [1.0, None, 1.0]
    with RewardRunner(str(H / "raises.py"), batch_size=2, max_concurrency=1, on_failure="skip") as runner:
        res = runner.score(batch)
    assert res.scores == [None, None, 1.0]  # the whole call failed: both trajectories of it
    (f,) = res.failures
    assert f.kind == "error" and f.trajectory_ids == ["r0#0", "r1#0"]
    assert f.message.startswith("ValueError: cannot grade trajectory r1#0")
    assert 'raise ValueError(f"cannot grade' in f.message  # the handler's own traceback lines
    assert "grading 2 trajectories" in f.message  # and its printed output
    assert res.summary()["reward_failures"] == 2 and "reward_score_mean" in res.summary()


@pytest.mark.parametrize("handler,trigger,expect", [
    ("exits.py", "exit", ["exit status 1", "about to call os._exit(1)"]),
    ("segfaults.py", "segv", ["killed by signal 11", "Segmentation fault", "segfaults.py"]),
])
def test_dead_worker_is_reported_and_replaced(handler, trigger, expect):
    with RewardRunner(str(H / handler), batch_size=1, max_concurrency=1, on_failure="skip") as runner:
        res = runner.score(trajs(["fine", trigger, "fine"]))
        assert res.scores == [1.0, None, 1.0]  # the replacement worker scored the third call
        (f,) = res.failures
        assert f.kind == "crash" and f.trajectory_ids == ["r1#0"]
        for text in expect:
            assert text in f.message
        assert runner.score(trajs(["fine"])).scores == [1.0]


def test_hanging_handler_times_out_and_is_replaced():
    with RewardRunner(str(H / "hangs.py"), batch_size=1, max_concurrency=2, timeout_s=1.0,
                      on_failure="skip") as runner:
        start = time.monotonic()
        res = runner.score(trajs(["fine", "hang", "fine", "fine"]))
        assert time.monotonic() - start < 8
        assert res.scores == [1.0, None, 1.0, 1.0]
        (f,) = res.failures
        assert f.kind == "timeout" and "within 1 s" in f.message
        assert "wait_forever" in f.message  # faulthandler's stack shows where it hung
        with pytest.raises(RewardError, match="did not answer within 1 s"):
            runner.on_failure = "fail"
            runner.score(trajs(["hang"]))
        assert runner.score(trajs(["fine", "fine"])).scores == [1.0, 1.0]


def test_close_during_a_hung_call_returns_promptly(tmp_path, monkeypatch):
    marker = tmp_path / "hanging"
    monkeypatch.setenv("HANG_MARKER", str(marker))
    runner = RewardRunner(str(H / "hangs.py"), max_concurrency=1, timeout_s=60, on_failure="skip",
                          pass_env=["HANG_MARKER"])
    out = {}
    thread = threading.Thread(target=lambda: out.update(res=runner.score(trajs(["hang"]))))
    thread.start()
    for _ in range(200):
        if marker.exists():
            break
        time.sleep(0.05)
    assert marker.exists()
    start = time.monotonic()
    runner.close()  # what the trainer does on Ctrl-C
    thread.join(10)
    assert time.monotonic() - start < 5 and not thread.is_alive()
    (f,) = out["res"].failures
    assert f.kind == "crash" and f.message.startswith("the reward runner was closed during the call")
    with pytest.raises(RuntimeError, match="closed"):
        runner.score(trajs(["fine"]))


MALFORMED = {
    "short": "2 entries for 3 trajectories",
    "wrong_ids": "entry 0 has id 'r0#0x', expected 'r0#0'",
    "reversed": "entry 0 has id 'r2#0', expected 'r0#0'",
    "nan": "aggregate_reward_score is nan, not a finite number",
    "bool": "aggregate_reward_score is boolean true, not a number",
    "string_score": 'aggregate_reward_score is string "1.0", not a number',
    "bad_metric_type": "metrics_list 'm' has type 'Score'",
    "bad_metric_value": "metrics_list 'm' value is inf",
    "metrics_not_list": "metrics_list is object, not a list",
    "dict": "expected a JSON list of 3 entries, got object",
    "not_serializable": "Runtime.MarshalError: Unable to marshal response",
    "sys_exit": "Runtime.ExitError: RequestId: ",
}


def test_malformed_answers_are_counted_failures():
    with RewardRunner(str(H / "malformed.py"), max_concurrency=1, on_failure="skip") as runner:
        for mode, text in MALFORMED.items():
            res = runner.score(trajs(["a", "b", "c"], metadata={"mode": mode}))
            assert res.failures and text in res.failures[0].message, (mode, res.failures)
            whole = mode in ("short", "wrong_ids", "reversed", "dict", "not_serializable", "sys_exit")
            assert res.scores == ([None] * 3 if whole else [None, 1.0, 1.0]), mode
            assert res.summary()["reward_failures"] == (3 if whole else 1)
        assert runner.score(trajs(["a"], metadata={"mode": "ok"})).scores == [1.0]
        assert "exit status 3" in runner.score(trajs(["a"], metadata={"mode": "sys_exit"})).failures[0].message
        runner.max_payload_bytes = 4000  # the answer (3 x 5 kB) is over Lambda's limit, scaled down
        res = runner.score(trajs(["a", "b", "c"], metadata={"mode": "huge"}))
        assert res.scores == [None] * 3 and "Function.ResponseSizeTooLarge" in res.failures[0].message


def test_check_answer_accepts_ints_and_missing_metrics():
    entries, failures = check_answer(b'[{"id":"a","aggregate_reward_score":1},{"id":"b",'
                                     b'"aggregate_reward_score":0.5,"metrics_list":null,"extra":1}]', ["a", "b"])
    assert failures == [] and [e["aggregate_reward_score"] for e in entries] == [1, 0.5]
    _, failures = check_answer(b"[{]", ["a"])
    assert failures[0].kind == "malformed" and "not JSON" in failures[0].message
    # an entry without a score that says why: that trajectory fails, quoting the handler's words
    entries, failures = check_answer(b'[{"id":"a","error":"judge unreachable"},{"id":"b","aggregate_reward_score":1}]',
                                     ["a", "b"])
    assert entries[0] is None and entries[1]["aggregate_reward_score"] == 1
    assert [(f.trajectory_ids, f.message) for f in failures] == [
        (["a"], "malformed answer: the handler could not grade it: judge unreachable (id 'a')")]


def test_payload_splitting_and_oversized_trajectory():
    batch = trajs([f"resp {i}" for i in range(6)])
    one = len(json.dumps(batch[0], separators=(",", ":")))
    with RewardRunner(str(H / "good.py"), batch_size=64, max_concurrency=1,
                      max_payload_bytes=2 * one + 5, on_failure="skip") as runner:
        res = runner.score(batch)
        assert res.n_calls == 3 and res.failures == [] and len(res.scores) == 6
        big = batch[:2] + trajs(["x" * (3 * one)], record="big")
        res = runner.score(big)
    assert res.scores[:2] == [0.0, 0.0] and res.scores[2] is None
    (f,) = res.failures
    assert f.kind == "too_large" and f.trajectory_ids == ["big0#0"] and "fits in no batch" in f.message


def test_handler_resolution_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        RewardRunner(str(tmp_path / "missing.py"))
    with pytest.raises(UserError, match="defines no function 'nope'"):
        RewardRunner(f"{H / 'good.py'}:nope", max_concurrency=1)
    broken = tmp_path / "broken.py"
    broken.write_text("def lambda_handler(event, context)\n    return []\n")
    with pytest.raises(UserError, match="SyntaxError"):
        RewardRunner(str(broken), max_concurrency=1)
    for bad in ("arn:aws:lambda:us-west-2:123:function:f", "arn:aws:s3:::bucket",
                "arn:aws:lambda:us-west-2:123456789012:layer:f"):
        with pytest.raises(UserError, match="not a Lambda function ARN"):
            RewardRunner(bad)
    with pytest.raises(UserError, match="on_failure"):
        RewardRunner(str(H / "good.py"), on_failure="zero")


# ------------------------------------------------------------------------------------- ARN path
@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_SESSION_TOKEN": "testing", "AWS_EC2_METADATA_DISABLED": "true",
                 "AWS_CONFIG_FILE": str(tmp_path / "none"),
                 "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def test_arn_path_retries_throttling_and_5xx(aws_env):
    with LambdaEmulator(str(H / "good.py"), throttle_first=3, fail_first=1) as emu:
        with RewardRunner(ARN + ":live", endpoint_url=emu.url, batch_size=2, max_concurrency=1,
                          max_retries=5, retry_base_s=0.01) as runner:
            res = runner.score(trajs(["#### 18", "no", "#### 18"]))
    assert res.scores == [1.0, 0.0, 1.0] and res.metrics["exact"] == [1.0, 0.0, 1.0]
    assert [c[2] for c in emu.calls] == [429, 429, 429, 500, 200, 200]
    assert {c[0] for c in emu.calls} == {ARN + ":live"}


def test_arn_path_gives_up_after_max_retries(aws_env):
    with LambdaEmulator(str(H / "good.py"), throttle_first=100) as emu:
        with RewardRunner(ARN, endpoint_url=emu.url, max_concurrency=1, max_retries=2,
                          retry_base_s=0.01, on_failure="skip") as runner:
            res = runner.score(trajs(["a"]))
    assert res.scores == [None] and len(emu.calls) == 3
    (f,) = res.failures
    assert f.kind == "invoke" and "after 3 tries" in f.message and "TooManyRequestsException" in f.message


def test_arn_path_function_error_and_payload_limit(aws_env):
    with LambdaEmulator(str(H / "raises.py"), max_payload=100_000) as emu:
        with RewardRunner(ARN, endpoint_url=emu.url, region="us-west-2", max_concurrency=1,
                          retry_base_s=0.01) as runner:
            with pytest.raises(RewardError) as err:
                runner.score(trajs(["ok", "boom"]))
            (f,) = err.value.failures
            assert f.kind == "error" and "FunctionError (Unhandled)" in f.message
            assert "ValueError: cannot grade trajectory r1#0: reference is unreadable" in f.message
            assert "raise ValueError" in f.message  # the stackTrace of the payload
            assert len(emu.calls) == 1  # a FunctionError is not retried
            big = trajs(["ok"] * 300)  # about 120 kB: split under the emulator's limit by a small max
            runner.max_payload_bytes = 50_000
            assert runner.score(big).scores == [1.0] * 300
    assert all(size <= 50_000 and status == 200 for _, size, status in emu.calls[1:])


# ------------------------------------------------------------------------------------------ CLI
def write_data(path: Path, references: list[str]) -> Path:
    with open(path, "w") as f:
        for i, ref in enumerate(references):
            f.write(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}"}],
                                "reference_answer": ref, "topic": "math"}) + "\n")
    return path


def grpo(*args):
    return subprocess.run([sys.executable, "-m", "grpo", "reward", "check", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cli_reward_check(tmp_path):
    data = write_data(tmp_path / "d.jsonl", [f"#### {i}" for i in range(12)])
    out = grpo("--handler", ROOT / "rewards" / "gsm8k.py", "--data", data, "--reference-as-response",
               "--allow-small")
    assert out.returncode == 0, out.stderr
    assert "PASS  a ground-truth-aligned response gets the maximum score: 12 of 12" in out.stdout
    assert "accuracy" in out.stdout and "format_ok" in out.stdout and "trajectories/s" in out.stdout
    responses = tmp_path / "r.jsonl"
    responses.write_text("".join(json.dumps({"id": f"q{i % 3}", "response": f"so #### {i}"}) + "\n"
                                 for i in range(6)))
    out = grpo("--handler", ROOT / "rewards" / "gsm8k.py", "--data", data, "--responses", responses,
               "--allow-small", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_trajectories"] == 6 and report["records_without_response"] == 9
    assert report["score"]["mean"] == pytest.approx(0.5)  # q0: #### 0 right, #### 3 wrong; ...
    assert report["metrics"]["accuracy"] == {"type": "Reward", "mean": 0.5, "n": 6}
    assert all(c["ok"] for c in report["checks"]) and report["failures"] == []

    # a file under Bedrock's 100 records is a warning in the lab (no --allow-small needed); validate keeps the rule
    out = grpo("--handler", ROOT / "rewards" / "gsm8k.py", "--data", data)
    assert out.returncode == 0, out.stderr
    assert f"warning: {data}: 12 records; fine for checking a handler, but a Bedrock job needs at least 100" in out.stderr
    val = subprocess.run([sys.executable, "-m", "grpo", "data", "validate", str(data)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert val.returncode == 2 and "12 records; Bedrock needs at least 100" in val.stdout

    bad = write_data(tmp_path / "bad.jsonl", ["#### 1", "boom", "#### 2"])
    out = grpo("--handler", H / "raises.py", "--data", bad, "--allow-small", "--batch-size", "1")
    assert out.returncode == 1
    assert "note: no --responses given" in out.stdout
    assert "[error] 1 trajectories (q1#0)" in out.stdout
    assert "ValueError: cannot grade trajectory q1#0: reference is unreadable" in out.stdout
    assert "FAIL  every reference parses" in out.stdout
    out = grpo("--handler", tmp_path / "nope.py", "--data", bad, "--allow-small")
    assert out.returncode == 2 and "error: reward handler file" in out.stderr and "Traceback" not in out.stderr
