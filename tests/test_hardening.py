"""The command line against an unlucky user (issue 12): a crash before the first checkpoint, a full disk during
a checkpoint, a handler answering 10**400, an infinite timeout, a lone surrogate in the data, a FIFO or
/dev/zero given as data, a record with 100k messages; and the handler's environment (no key, no credentials
unless named). Real `grpo` subprocesses, real handler files, a real tmpfs for the full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers_engine import (
    PYTHON,
    REPO,
    build_model_dir,
    cli_env,
    read_jsonl,
    run_grpo,
    write_data,
    write_job,
    write_records,
)

RECORD = {"messages": [{"role": "user", "content": "1 + 1?"}], "reference_answer": "2"}
GATE = '''import os, time
def lambda_handler(event, context):
    with open(os.environ["CALLS"], "a") as f:
        f.write("call\\n")
    calls = len(open(os.environ["CALLS"]).read().splitlines())
    if calls >= 2 and not os.path.exists(os.environ["RELEASE"]):
        time.sleep(600)  # step 2 hangs until the test has killed the run
    return [{"id": t["id"], "aggregate_reward_score": float(len(t["messages"][-1]["content"]) % 2)} for t in event]
'''


def assert_clear_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == code and "Traceback" not in out, out[-3000:]
    for n in needles:
        assert n in out, (n, out[-3000:])


def test_resume_before_the_first_checkpoint_does_not_duplicate_history(tmp_path):
    """Item 4: killed after step 1 with checkpoint_interval 50 (no checkpoint), a half-written step-N.tmp
    left behind: --resume starts over cleanly, one metrics line per step, one 'job started', no .tmp."""
    model = build_model_dir(tmp_path / "model", seed=2)
    train, _ = write_data(tmp_path / "data", n_train=4, n_val=1)
    (tmp_path / "gate.py").write_text(GATE)
    reward = {"concurrency": 1, "env": {"CALLS": str(tmp_path / "calls"), "RELEASE": str(tmp_path / "release")}}
    job = write_job(tmp_path / "job.yaml", model, train, None, handler=tmp_path / "gate.py",
                    engine={"checkpoint_interval": 50, "reward": reward})
    run = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([PYTHON, "-m", "grpo", "train", str(job), "--output-dir", str(run), "--no-progress"],
                                cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not ((run / "metrics.jsonl").exists() and read_jsonl(run / "metrics.jsonl")):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
                time.sleep(0.1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("step-*[0-9]"))
    partial = run / "checkpoints" / "step-000001.tmp"
    partial.mkdir(parents=True)
    (partial / "rng_0.pt").write_bytes(b"cut short")
    (tmp_path / "release").touch()
    res = run_grpo("train", job, "--output-dir", run, "--resume", "--no-progress", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "starting from step 0 (the 1 step(s) logged before it stopped are discarded)" in res.stdout
    assert f"removed {partial}" in res.stdout and not partial.exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    events = [e["message"] for e in read_jsonl(run / "events.jsonl")]
    assert events.count("Fine-tuning job started") == 1
    assert [e for e in events if e.startswith("Step ")] == ["Step 1/2: training metrics", "Step 2/2: training metrics"]


DISK_FULL = '''
import os, shutil, sys, torch
from pathlib import Path
from accelerate import Accelerator
from grpo.config import LoraConfig
from grpo.errors import UserError
from grpo.models.loading import load_policy
from grpo.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

run = Path(sys.argv[2])
acc = Accelerator(cpu=True)
policy = load_policy(sys.argv[1], LoraConfig(rank=2, alpha=4), dtype=torch.float32)
opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
kw = dict(accelerator=acc, model=policy, optimizer=opt, scheduler=sched)
save_checkpoint(run, 1, state={"best_val": None}, **kw)
with open(run / "filler", "wb") as f:  # fill the device, then give back a little: a write starts and fails
    try:
        while True:
            f.write(b"\\0" * 65536)
            f.flush()
    except OSError:
        pass
os.truncate(run / "filler", max(0, os.path.getsize(run / "filler") - 24576))
try:
    save_checkpoint(run, 2, state={"best_val": None}, **kw)
    print("SAVED")
except UserError as e:
    print("USERERROR", e)
print("LEFT", sorted(p.name for p in (run / "checkpoints").iterdir()))
print("LATEST", latest_checkpoint(run).name, [s for s, _ in list_checkpoints(run)])
(run / "filler").unlink()
print("RESUMED", load_checkpoint(latest_checkpoint(run), **kw)["step"])
'''


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_the_previous_one_stays(tmp_path):
    """Item 6: a real full device (a 2 MiB tmpfs in a user+mount namespace): 'no space left', no .tmp left,
    the step-1 checkpoint intact and loadable."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small tmpfs")
    model = build_model_dir(tmp_path / "model", seed=4)
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = (f"mount -t tmpfs -o size=2m tmpfs {mnt} && {sys.executable} {script} {model} {mnt / 'run'}")
    res = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], cwd=REPO, env=cli_env(PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in res.stdout.splitlines() if " " in ln}
    assert "no space left on the device" in lines["USERERROR"], res.stdout
    assert "the previous checkpoint step-000001 is intact" in lines["USERERROR"]
    assert lines["LEFT"] == "['step-000001']" and lines["LATEST"] == "step-000001 [1]" and lines["RESUMED"] == "1"


def test_handler_answers_timeouts_and_data_give_clear_errors(tmp_path):
    """Item 6: 10**400 from a handler is a counted failure naming it; --timeout inf / 1e300 a usage error;
    a lone surrogate in the data is named by FILE:LINE: field, in validate, reward check and train."""
    data = write_records(tmp_path / "d.jsonl", [RECORD, RECORD])
    huge = tmp_path / "huge.py"
    huge.write_text("def lambda_handler(event, context):\n"
                    "    return [{'id': t['id'], 'aggregate_reward_score': 10**400} for t in event]\n")
    res = run_grpo("reward", "check", "--handler", huge, "--data", data, "--allow-small", "--concurrency", "1")
    assert_clear_error(res, 1, "2 failed", "aggregate_reward_score is an integer of 401 digits, too large for a float")
    for timeout in ("inf", "1e300", "0"):
        res = run_grpo("reward", "check", "--handler", huge, "--data", data, "--allow-small", "--timeout", timeout)
        assert_clear_error(res, 2, "reward timeout must be more than 0 and at most 900 s")
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text(json.dumps(RECORD) + "\n" + '{"messages": [{"role": "user", "content": "a\\ud800"}], '
                   '"reference_answer": "2"}\n')
    where = f"{bad}:2: messages[0].content: holds a lone surrogate escape"
    assert_clear_error(run_grpo("data", "validate", bad, "--allow-small"), 2, where)
    assert_clear_error(run_grpo("reward", "check", "--handler", huge, "--data", bad, "--allow-small"), 2, where)
    job = write_job(tmp_path / "job.yaml", tmp_path / "no-model-needed", bad, None, handler=huge)
    assert_clear_error(run_grpo("train", job, "--output-dir", tmp_path / "run"), 2, where)


def test_data_validate_refuses_non_regular_files_and_caps_lines_and_summaries(tmp_path):
    """Item 8: a FIFO and /dev/zero are refused at once; an 9 MiB line is one problem; a record with 100k
    messages and 3,000 metadata fields gives short summary lines."""
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    assert_clear_error(run_grpo("data", "validate", fifo, timeout=30), 2, f"{fifo}: is a FIFO")
    assert_clear_error(run_grpo("data", "validate", "/dev/zero", timeout=30), 2, "/dev/zero: is a device")
    long = tmp_path / "long.jsonl"
    long.write_bytes(json.dumps(RECORD).encode() + b"\n" + b"x" * (9 * 2**20) + b"\n")
    assert_clear_error(run_grpo("data", "validate", long, "--allow-small"), 2,
                       f"{long}:2: line: is 9,437,184 bytes long, over the 8 MiB limit")
    many = {"messages": [{"role": "user", "content": "q"}] + [{"role": r, "content": "a"} for r in
                                                              ["assistant", "user"] * 50_000],
            "reference_answer": "2", **{f"meta{i}": i for i in range(3000)}}
    wide = write_records(tmp_path / "wide.jsonl", [many])
    res = run_grpo("data", "validate", wide, "--allow-small")
    assert res.returncode == 0 and max(len(line) for line in res.stdout.splitlines()) < 200, res.stdout[:500]
    assert "(100,001 messages)" in res.stdout and "2,990 more" in res.stdout


ENVDUMP = '''import json, os
def lambda_handler(event, context):
    with open(os.environ["ENV_DUMP"], "w") as f:
        json.dump(dict(os.environ), f)
    return [{"id": t["id"], "aggregate_reward_score": 1.0} for t in event]
'''


def test_reward_handlers_get_an_explicit_environment(tmp_path):
    """Item 5: the shell's key, server pid and AWS credentials do not reach a handler; what --env names does
    (KEY=VALUE, or KEY passed through, e.g. AWS_PROFILE for a judge calling Bedrock)."""
    data = write_records(tmp_path / "d.jsonl", [RECORD])
    handler = tmp_path / "envdump.py"
    handler.write_text(ENVDUMP)
    dump = tmp_path / "env.json"
    shell = cli_env(GRPO_API_KEY="sk-secret-key", GRPO_SERVER_PID="1", AWS_ACCESS_KEY_ID="AKIDSECRET",
                    AWS_SECRET_ACCESS_KEY="aws-secret", AWS_PROFILE="judge", AWS_REGION="us-east-1")
    base = ["reward", "check", "--handler", handler, "--data", data, "--allow-small", "--env", f"ENV_DUMP={dump}"]
    assert run_grpo(*base, env=shell).returncode == 0
    got = json.loads(dump.read_text())
    assert not {"GRPO_API_KEY", "GRPO_SERVER_PID", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"} & set(got)
    assert "secret" not in json.dumps(got) and got["AWS_REGION"] == "us-east-1" and got["PATH"]
    assert got["AWS_CONFIG_FILE"] == os.devnull and got["AWS_LAMBDA_FUNCTION_NAME"] == "envdump"
    assert run_grpo(*base, "--env", "AWS_PROFILE", "--env", "JUDGE_MODEL=qwen.qwen3-32b", env=shell).returncode == 0
    got = json.loads(dump.read_text())
    assert got["AWS_PROFILE"] == "judge" and got["JUDGE_MODEL"] == "qwen.qwen3-32b"
    assert "AWS_CONFIG_FILE" not in got and "AWS_SECRET_ACCESS_KEY" not in got  # opted in to a profile only
    bad = run_grpo(*base[:-2], "--env", "1BAD=x", env=shell)
    assert_clear_error(bad, 2, "--env '1BAD=x': expected KEY=VALUE or KEY")


def test_serve_reads_the_key_from_a_file_and_refuses_bad_operator_flags(tmp_path):
    """Item 5 / 2: --api-key-file (the key is not on the command line); operator flags checked at start."""
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    for flags, needle in ((["--api-key-file", empty], "the file's first line is empty"),
                          (["--api-key-file", tmp_path / "none"], "cannot read a key from it"),
                          (["--model", f"tiny={tmp_path / 'nowhere'}"], "no such model directory"),
                          (["--lambda", "arn:aws:lambda:us-west-2:123456789012:function:x=missing.py"], "not found"),
                          (["--lambda-endpoint-url", "http://127.0.0.1:9"], "--lambda-endpoint-url is for --invoke-lambdas")):
        res = run_grpo("serve", "--handlers-dir", handlers, "--port", "1", *flags, timeout=60)
        assert_clear_error(res, 2, needle)
    assert "--api-key-file" in run_grpo("serve", "--help").stdout
