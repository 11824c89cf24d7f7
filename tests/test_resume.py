"""Resume is exact: a CPU run killed with SIGKILL mid-way and resumed ends bit for bit where an
uninterrupted run with the same seed ends (adapter, optimizer state, metrics), one metrics line per step.

Both runs are real `python -m grpo train` subprocesses on a tiny random Qwen3 with a reward handler whose
scores vary inside each group, so every step really moves the adapter. The interrupted run is paced by a
sleep inside the handler so that the kill lands after step 5 (checkpoint at step 4): the resume must drop
the orphaned step-5 line and redo steps 5-8, crossing the epoch boundary (4 steps per epoch) and two
validations (steps 6 and 8) on the way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers_engine import (
    PYTHON,
    REPO,
    build_model_dir,
    cli_env,
    read_jsonl,
    run_grpo,
    stable_metrics,
    write_data,
    write_job,
    write_varied_handler,
)
from safetensors.torch import load_file

TOTAL_STEPS = 8


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume")
    model = build_model_dir(d / "model", seed=1)
    train, val = write_data(d, n_train=8, n_val=4)
    handler = write_varied_handler(d / "varied.py")
    return write_job(d / "job.yaml", model, train, val, handler=handler,
                     hyper={"n_epochs": 2, "batch_size": 2, "eval_interval": 3},
                     engine={"checkpoint_interval": 2, "micro_batch_size": 3, "seed": 7,
                             "reward": {"pass_env": ["TEST_REWARD_SLEEP_S"]}})


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    """True once no process of the group is left (the trainer and its reward workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _kill_after(job: Path, out: Path, lines: int) -> None:
    """Start a run in its own session, SIGKILL the whole group once metrics.jsonl has `lines` lines."""
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([PYTHON, "-m", "grpo", "train", str(job), "--output-dir", str(out), "--no-progress"],
                            cwd=REPO, env=cli_env(TEST_REWARD_SLEEP_S="0.5"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(read_jsonl(metrics)) >= lines:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{(out.parent / f'{out.name}.log').read_text()}"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        assert _group_gone(proc.pid), "reward workers outlived the SIGKILLed trainer"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*") if p.name[5:].isdigit())


def test_sigkill_and_resume_is_bitwise_identical(job, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    done = run_grpo("train", job, "--output-dir", a, "--no-progress")
    assert done.returncode == 0, done.stderr

    _kill_after(job, b, lines=5)
    killed_rows = read_jsonl(b / "metrics.jsonl")
    last_ckpt = max(_checkpoint_steps(b))
    assert 2 <= last_ckpt < TOTAL_STEPS
    assert len(killed_rows) >= 5 and not (b / "summary.json").exists()
    assert len(killed_rows) > last_ckpt, "killed right after a checkpoint: the orphaned-lines case went untested"

    resumed = run_grpo("train", job, "--resume", "--output-dir", b, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr

    # Adapter and optimizer: the same bits.
    final = f"checkpoints/step-{TOTAL_STEPS:06d}"
    wa, wb = (load_file(str(r / final / "adapter" / "adapter_model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys() and wa
    changed = [k for k in wa if "lora_B" in k and wa[k].abs().sum() > 0]
    assert changed, "the adapter never moved: the test would prove nothing"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"adapter tensor {k} differs after resume"
    assert (a / final / "adapter" / "adapter_model.safetensors").read_bytes() == \
           (b / final / "adapter" / "adapter_model.safetensors").read_bytes()
    sa, sb = (torch.load(r / final / "trainer_state.pt", weights_only=False) for r in (a, b))
    assert sa["scheduler"] == sb["scheduler"]
    for pid, st in sa["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(t, sb["optimizer"]["state"][pid][name]), f"optimizer state {pid}.{name} differs"

    # Metrics: one line per step, in order, equal but for wall-clock fields.
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in ra] == list(range(1, TOTAL_STEPS + 1))
    assert [r["step"] for r in rb] == list(range(1, TOTAL_STEPS + 1))
    for x, y in zip(ra, rb):
        assert stable_metrics(x) == stable_metrics(y), f"step {x['step']} metrics differ"
    assert [r["step"] for r in ra if "val_score_rewards_mean" in r] == [3, 6, 8]
    # The steps the killed run logged before the kill are the same steps, too (same data, same RNG).
    for x, y in zip(ra, killed_rows):
        assert stable_metrics(x) == stable_metrics(y)

    # events.jsonl: one metrics event per step; the resume is recorded.
    events = read_jsonl(b / "events.jsonl")
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == list(range(1, TOTAL_STEPS + 1))
    assert any(e["message"] == f"Resumed from checkpoint at step {last_ckpt}" for e in events)
    assert sum(e["message"] == "The job has successfully completed" for e in events) == 1
    ckpt_events = [e["data"]["step"] for e in events if e["type"] == "checkpoint"]
    assert ckpt_events == [2, 4, 6, 8]


def test_resume_without_checkpoint_starts_fresh_and_another_world_size_is_refused(job, tmp_path):
    """--resume on an empty directory is a plain start (with a note), not an error. Resuming a checkpoint
    written by another number of processes is a clear error (each process's RNG state is restored)."""
    out = tmp_path / "fresh"
    short = ["--set", "method.reinforcement.hyperparameters.n_epochs=1", "--set", "engine.checkpoint_interval=4",
             "--set", "method.reinforcement.hyperparameters.eval_interval=4"]
    r = run_grpo("train", job, "--resume", "--output-dir", out, "--no-progress", *short)
    assert r.returncode == 0, r.stderr
    assert "no checkpoint" in r.stdout
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    ckpt = out / "checkpoints" / "step-000004"
    (ckpt / "rng_1.pt").write_bytes((ckpt / "rng_0.pt").read_bytes())  # as a 2-process run leaves it
    r = run_grpo("train", job, "--resume", "--output-dir", out, "--no-progress", *short)
    assert r.returncode == 2
    assert f"error: {ckpt}: written by 2 process(es) but resumed with 1" in r.stderr
    assert "Traceback" not in r.stderr
