"""`grpo serve --devices cpu:2 --max-jobs 2` placing 2-process jobs (gloo ranks under `accelerate launch`,
started by the server), driven over loopback with the real `openai` package on the tiny random Qwen3:

- the first job takes both CPU slots and succeeds: its events (placement, metrics of every step) and its
  run's metrics.jsonl are there, and both ranks called the reward handler (one reward worker each);
- the second job, though a second job may run (--max-jobs 2), waits queued while the slots are busy (its
  events say so) and starts when the first ends; the server SIGKILLed under it takes every process of the
  job along (the `accelerate launch` leader, both ranks, each in a session of its own, and their reward
  workers); the restarted server places it again (fresh ranks) and it resumes from its step-2 checkpoint
  (not from step 0), and its cancel kills every process of it.
"""

from __future__ import annotations

import json
import os
import signal

import openai
from helpers_engine import VARIED_HANDLER, build_model_dir, read_jsonl, write_data
from server_helpers import gone, pids_with, server_log, start_server, wait_for

KEY = "test-key-placement-0123"
MODEL = "qwen.qwen3-32b"
TERMINAL = ("succeeded", "failed", "cancelled")
STUCK = '''import json, os, time
def lambda_handler(event, context):  # steps 1-2 (one call per rank each) answer; from step 3 on, it hangs
    before = open({log!r}).read().count("\\n") if os.path.exists({log!r}) else 0
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"pid": os.getpid(), "ppid": os.getppid()}}) + "\\n")
    if before >= 4:
        time.sleep(120)
    return [{{"id": t["id"], "aggregate_reward_score": 0.0}} for t in event]
'''
LOGGED = VARIED_HANDLER.replace('os.environ.get("TEST_REWARD_LOG")', "CALLS").replace(
    'os.environ["TEST_REWARD_LOG"]', "CALLS")


def body(handler: str) -> dict:
    return {"method": {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "lambda", "lambda": {"function": handler}},
        "hyperparameters": {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 4,
                            "inference_max_tokens": 8}}},
        "engine": {"num_processes": 2, "checkpoint_interval": 2, "micro_batch_size": 4, "log_with": ["none"],
                   "reward": {"concurrency": 1}, "lora": {"rank": 4, "alpha": 8}, "base_learning_rate": 5e-3}}


def test_two_process_jobs_placed_queued_and_cancelled(tmp_path):
    model = build_model_dir(tmp_path / "model", seed=3)
    train, _ = write_data(tmp_path / "data", n_train=4, n_val=2)
    longer, _ = write_data(tmp_path / "longer", n_train=8, n_val=2)  # 4 steps: a checkpoint at step 2
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    calls, stuck_log = tmp_path / "calls.jsonl", tmp_path / "stuck.jsonl"
    (handlers / "logged.py").write_text(f"CALLS = {str(calls)!r}\n" + LOGGED)
    (handlers / "stuck.py").write_text(STUCK.format(log=str(stuck_log)))
    state = tmp_path / "state"
    args = ["--model", f"{MODEL}={model}", "--devices", "cpu:2", "--max-jobs", "2"]
    with start_server(state, handlers, KEY, args) as (url, key, proc):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        f = client.files.create(file=train.open("rb"), purpose="fine-tune")
        with __import__("pytest").raises(openai.BadRequestError) as e:  # 3 processes > the 2 slots
            client.fine_tuning.jobs.create(model=MODEL, training_file=f.id,
                                           extra_body={**body("logged.py"), "engine": {"num_processes": 3}})
        assert e.value.body["param"] == "engine.num_processes"
        first = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, extra_body=body("logged.py"))
        g = client.files.create(file=longer.open("rb"), purpose="fine-tune")
        second = client.fine_tuning.jobs.create(model=MODEL, training_file=g.id, extra_body=body("stuck.py"))
        wait_for(lambda: client.fine_tuning.jobs.retrieve(first.id).status == "running", 60, "the first job to run")
        assert wait_for(lambda: any("Waiting for 2 free CPU slots" in ev.message for ev in
                                    client.fine_tuning.jobs.list_events(second.id, limit=50).data), 30,
                        "the second job to wait for its slots")
        assert client.fine_tuning.jobs.retrieve(second.id).status == "queued"
        done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(first.id)).status in TERMINAL and j, 240,
                        "the first job to finish")
        assert done.status == "succeeded", (done.error, server_log(state)[-4000:])
        messages = [ev.message for ev in client.fine_tuning.jobs.list_events(first.id, limit=100).data]
        assert "Placed on 2 CPU slots: cpu0,cpu1" in messages
        steps = [json.loads(ev.model_dump_json())["data"]["step"]
                 for ev in client.fine_tuning.jobs.list_events(first.id, limit=100).data if ev.type == "metrics"]
        assert sorted(steps) == [1, 2]  # 4 prompts, 2 per step: one per rank
        rows = read_jsonl(state / "jobs" / first.id / "run" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2] and all(r["reward_calls"] == 2 for r in rows)
        assert len({c["pid"] for c in read_jsonl(calls)}) == 2, "one reward worker per rank"

        # the second job now runs on the freed slots: 2 steps, a checkpoint, both ranks inside their handler
        workers = wait_for(lambda: stuck_log.is_file() and len(read_jsonl(stuck_log)) >= 6 and read_jsonl(stuck_log)[4:],
                           180, "both ranks of the second job to hang in step 3's reward call")
        run = state / "jobs" / second.id / "run"
        assert (run / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()
        assert client.fine_tuning.jobs.retrieve(second.id).status == "running"
        procs = pids_with(second.id)
        assert len(procs) >= 3, f"expected the launcher and two ranks, found {procs}"
        everyone = set(procs) | {w["pid"] for w in workers} | {w["ppid"] for w in workers}
        os.killpg(proc.pid, signal.SIGKILL)  # the server dies: every process of the job follows it
        wait_for(lambda: all(gone(p) for p in everyone) and not pids_with(second.id), 15,
                 "every process of the running job to follow the killed server")

    with start_server(state, handlers, KEY, args) as (url, key, _proc):  # restart: the job is placed again
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        workers = wait_for(lambda: len(read_jsonl(stuck_log)) >= 8 and read_jsonl(stuck_log)[6:], 120,
                           "both ranks of the resumed job to reach step 3's reward call")
        launches = [line for line in (state / "jobs" / second.id / "train.log").read_text().splitlines()
                    if line.startswith("=== ")]
        assert len(launches) == 2 and "--resume" not in launches[0] and launches[1].endswith("--resume")
        assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]  # resumed after step 2, not redone
        messages = [ev.message for ev in client.fine_tuning.jobs.list_events(second.id, limit=100).data]
        assert messages.count("Placed on 2 CPU slots: cpu0,cpu1") == 2
        assert any(m.startswith("The server restarted") for m in messages)
        procs = pids_with(second.id)
        assert len(procs) >= 3 and not set(procs) & everyone
        everyone = set(procs) | {w["pid"] for w in workers} | {w["ppid"] for w in workers}
        assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"
        wait_for(lambda: all(gone(p) for p in everyone) and not pids_with(second.id), 15,
                 "every process of the cancelled job to be gone")
