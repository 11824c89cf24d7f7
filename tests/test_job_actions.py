"""`grpo pause JOB`, `grpo resume JOB`, `grpo cancel JOB` against a real `grpo serve` on loopback (the real openai
SDK inside the commands): a queued job pauses at once, resumes to queued, cancels; a running one turns pausing;
a job in the wrong state or an unknown id is `error: ...` with exit 2, no traceback. Cheap: one job trains (its
reward handler sleeps, so it holds the server's one slot) and is cancelled; the other never leaves the queue."""

from __future__ import annotations

import contextlib
import io
import json

import openai
from helpers_engine import build_model_dir, write_data
from server_helpers import pids_with, server_log, start_server, wait_for

from grpo.cli import main

KEY = "test-key-actions-0123"
SLOW = "import time\n\ndef lambda_handler(event, context):\n    time.sleep(120)\n"


def grpo(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_pause_resume_cancel_commands(tmp_path):
    model = build_model_dir(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=4, n_val=2)
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "slow.py").write_text(SLOW)
    state = tmp_path / "state"
    with start_server(state, handlers, KEY, ["--model", f"tiny={model}", "--max-jobs", "1"]) as (url, key, _proc):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        f = client.files.create(file=train.open("rb"), purpose="fine-tune")
        body = {"method": {"type": "reinforcement", "reinforcement": {
                    "grader": {"type": "lambda", "lambda": {"function": "slow.py"}},
                    "hyperparameters": {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 2,
                                        "inference_max_tokens": 4}}},
                "engine": {"log_with": ["none"], "lora": {"rank": 2, "alpha": 4}}}
        first = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, extra_body=body).id
        second = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, extra_body=body).id
        conn = ("--base-url", url, "--api-key", key)
        wait_for(lambda: client.fine_tuning.jobs.retrieve(second).status == "queued", 30,  # past validating_files
                 "the second job to be queued\n" + server_log(state))

        code, out, err = grpo("pause", second, *conn)  # waits behind the first job: paused at once
        assert code == 0 and out.startswith(f"job {second}: paused (nothing runs until you resume it)"), out + err
        assert f"then: grpo resume {second} --base-url {url}" in out
        code, _, err = grpo("pause", second, *conn)
        assert code == 2 and err.startswith(f"error: {url} answered 400: Fine-tuning job {second} is paused; "
                                            "only a queued or running job can be paused"), err
        code, out, _ = grpo("resume", second, *conn, "--json")
        assert code == 0 and json.loads(out)["status"] == "queued" and json.loads(out)["id"] == second
        code, out, _ = grpo("pause", second, *conn, "--wait", "--interval", "0.1")
        assert code == 0 and out.startswith(f"job {second}: paused"), out
        code, out, _ = grpo("cancel", second, *conn)  # a paused job can be cancelled
        assert code == 0 and out.startswith(f"job {second}: cancelled"), out
        assert client.fine_tuning.jobs.retrieve(second).status == "cancelled"

        wait_for(lambda: client.fine_tuning.jobs.retrieve(first).status == "running", 60,
                 "the first job to run\n" + server_log(state))
        code, out, _ = grpo("pause", first, *conn)
        assert code == 0 and out.startswith(f"job {first}: pausing (it saves a checkpoint after its current step")
        assert f"next: grpo status {first} --base-url {url} --watch" in out
        code, out, _ = grpo("cancel", first, *conn)
        assert code == 0 and out.startswith(f"job {first}: cancelled"), out
        wait_for(lambda: pids_with(first) == [], 30, "the cancelled trainer to stop")
        code, _, err = grpo("resume", first, *conn)
        assert code == 2 and "is cancelled; only a paused job can be resumed" in err and "Traceback" not in err
        code, _, err = grpo("cancel", "ftjob-nope", *conn)
        assert code == 2 and err.startswith(f"error: {url} answered 404"), err
        assert client.fine_tuning.jobs.retrieve(second).status == "cancelled"  # nothing ever ran it
        assert not (state / "jobs" / second / "run" / "metrics.jsonl").exists()
