"""Pause and resume on `grpo serve`, driven by the real `openai` SDK (client.fine_tuning.jobs.pause/resume) over
loopback: a running job goes pausing -> paused with a checkpoint of the steps it did and no trainer left,
`grpo status` says so, resume continues from that checkpoint to the end with one metrics line per step;
pausing or resuming a job in the wrong state is a 400 naming the state."""

from __future__ import annotations

import json

import openai
import pytest
from helpers_engine import VARIED_HANDLER, build_model_dir, read_jsonl, write_data
from server_helpers import pids_with, server_log, start_server, wait_for

KEY = "test-key-pause-0123"
PACED = VARIED_HANDLER.replace('time.sleep(float(os.environ.get("TEST_REWARD_SLEEP_S", "0")))', "time.sleep(0.4)")


def _grpo(*args) -> tuple[int, str]:
    """`grpo ARGS` in this process: (exit status, stdout)."""
    import contextlib
    import io

    from grpo.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def test_pause_then_resume_continues_from_the_checkpoint(tmp_path):
    model = build_model_dir(tmp_path / "model", seed=5)
    train, _ = write_data(tmp_path / "data", n_train=8, n_val=2)
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "paced.py").write_text(PACED)
    state = tmp_path / "state"
    with start_server(state, handlers, KEY, ["--model", f"tiny={model}"]) as (url, key, _proc):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        f = client.files.create(file=train.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, extra_body={
            "method": {"type": "reinforcement", "reinforcement": {
                "grader": {"type": "lambda", "lambda": {"function": "paced.py"}},
                "hyperparameters": {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 4,
                                    "inference_max_tokens": 6}}},
            "engine": {"checkpoint_interval": 100, "micro_batch_size": 4, "reward": {"concurrency": 1},
                       "log_with": ["none"], "lora": {"rank": 4, "alpha": 8}, "base_learning_rate": 5e-3}})
        run = state / "jobs" / job.id / "run"
        wait_for(lambda: (run / "metrics.jsonl").is_file() and read_jsonl(run / "metrics.jsonl"), 180,
                 "a training step\n" + server_log(state))
        paused = client.fine_tuning.jobs.pause(job.id)
        assert paused.id == job.id and paused.status == "pausing"
        with pytest.raises(openai.BadRequestError) as err:  # still saving: not resumable yet
            client.fine_tuning.jobs.resume(job.id)
        assert err.value.code == "job_not_resumable" and "pausing" in str(err.value)
        wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "paused", 120,
                 "the job to be paused\n" + server_log(state))
        assert pids_with(job.id) == []  # the trainer has stopped
        done = len(read_jsonl(run / "metrics.jsonl"))
        assert 1 <= done < 4  # stopped early: 8 records / batch 2 = 4 steps
        ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in ckpts] == [done]  # the pause's own checkpoint (interval 100)
        assert json.loads((run / "summary.json").read_text())["status"] == "paused"
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any(m.startswith(f"Fine-tuning job paused after step {done}") for m in messages)
        code, out = _grpo("status", job.id, "--base-url", url, "--api-key", key)
        assert code == 0 and "status paused" in out and f"client.fine_tuning.jobs.resume(\"{job.id}\")" in out
        code, out = _grpo("status", job.id, "--base-url", url, "--api-key", key, "--watch", "--interval", "0.2")
        assert code == 1 and "status paused" in out  # nothing more to watch until a resume
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.pause(job.id)
        assert err.value.code == "job_not_pausable"

        resumed = client.fine_tuning.jobs.resume(job.id)
        assert resumed.status == "queued"
        wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed"), 240,
                 "the resumed job to end\n" + server_log(state))
        final = client.fine_tuning.jobs.retrieve(job.id)
        assert final.status == "succeeded", final.error
        rows = read_jsonl(run / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3, 4]  # no step lost, none done twice
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert f"Resumed from checkpoint at step {done}" in messages
        assert not (run / "pause.request").exists()
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.resume(job.id)
        assert err.value.code == "job_not_resumable" and "succeeded" in str(err.value)


def test_a_server_restarted_while_a_job_was_pausing_leaves_it_paused(tmp_path):
    """The worker's start: a job left `pausing` (its trainer was stopped with the server) is `paused`, to resume
    from its last checkpoint, not queued again as a `running` one is."""
    from grpo.api.store import Store
    from grpo.api.worker import JobManager

    store = Store(tmp_path / "state")
    store.add_job({"id": "ftjob-" + "a" * 24, "object": "fine_tuning.job", "status": "pausing", "pid": None})
    manager = JobManager(store, poll_s=3600)
    manager.start()
    manager.stop()
    assert store.get_job("ftjob-" + "a" * 24)["status"] == "paused"
    events = [e["message"] for e in store.list_events("ftjob-" + "a" * 24, limit=10, after=None)]
    assert any("restarted while the job was pausing" in m for m in events)
    store.close()
