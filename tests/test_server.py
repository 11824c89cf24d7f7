"""`grpo serve` driven by the real `openai` package over loopback, in the order of AWS's notebook: list
jobs, upload, list and retrieve files, create a job, list jobs, retrieve it, list events and plot their
metrics, list checkpoints, chat completions on the fine-tuned model (and a checkpoint), list models,
stream a response; cancel a second job. Then the errors (401, 404, 400 naming the field) and a server
SIGKILLed mid-job whose restart resumes the job from its checkpoint, one metrics line per step.

Everything is real: a uvicorn server subprocess on 127.0.0.1, `grpo train` subprocesses, a tiny random
Qwen3 on disk, Lambda-contract handler files under the handlers directory the server was given.
"""

from __future__ import annotations

import json
import os
import signal

import httpx
import openai
import pytest
from helpers_engine import VARIED_HANDLER, build_model_dir, read_jsonl, write_data, write_records
from server_helpers import gone, pids_with, server_log, sse_data, start_server, wait_for

KEY = "test-key-0123456789"
MODEL = "qwen.qwen3-32b"  # served as the tiny random model: `grpo serve --model qwen.qwen3-32b=<its directory>`
TERMINAL = ("succeeded", "failed", "cancelled")
HYPER = {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 4, "inference_max_tokens": 8}
ENGINE = {"checkpoint_interval": 2, "micro_batch_size": 4, "reward": {"concurrency": 1}, "log_with": ["none"],
          "lora": {"rank": 4, "alpha": 8}, "base_learning_rate": 5e-3}
PACED = VARIED_HANDLER.replace("import time\n", "import time\ntime_per_call = 0.6\n").replace(
    'time.sleep(float(os.environ.get("TEST_REWARD_SLEEP_S", "0")))', "time.sleep(time_per_call)")
STUCK = '''import json, os, time
def lambda_handler(event, context):
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"pid": os.getpid(), "ppid": os.getppid()}}) + "\\n")
    time.sleep(120)
    return [{{"id": t["id"], "aggregate_reward_score": 0.0}} for t in event]
'''


def body(handler: str, hyper=None, engine=None) -> dict:
    """extra_body of jobs.create: Bedrock's method (lambda grader) plus the local engine object."""
    return {"method": {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "lambda", "lambda": {"function": handler}},
        "hyperparameters": {**HYPER, **(hyper or {})}}}, "engine": {**ENGINE, **(engine or {})}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    model = build_model_dir(d / "model", seed=3)
    train, val = write_data(d / "data", n_train=8, n_val=2)
    handlers = d / "handlers"
    handlers.mkdir()
    (handlers / "varied.py").write_text(VARIED_HANDLER)
    (handlers / "paced.py").write_text(PACED)
    (handlers / "stuck.py").write_text(STUCK.format(log=str(d / "stuck.log")))
    (d / "outside.py").write_text(VARIED_HANDLER)
    return {"dir": d, "model": model, "train": train, "val": val, "handlers": handlers, "stuck_log": d / "stuck.log"}


@pytest.fixture(scope="module")
def server(env):
    with start_server(env["dir"] / "state", env["handlers"], KEY, ["--model", f"{MODEL}={env['model']}"]) as (url, key, proc):
        yield openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60), url, proc


@pytest.fixture(scope="module")
def flow(env, server):
    """The notebook up to a finished job; a second job (its handler never returns) waits queued behind it."""
    client, _, _ = server
    assert client.fine_tuning.jobs.list(limit=10).data == []
    train = client.files.create(file=env["train"].open("rb"), purpose="fine-tune")
    val = client.files.create(file=env["val"].open("rb"), purpose="fine-tune")
    assert train.id.startswith("file-") and train.status == "processed" and train.purpose == "fine-tune"
    assert train.bytes == env["train"].stat().st_size and train.filename == "train.jsonl"
    assert "Bedrock needs at least 100" in train.status_details  # small files are accepted, with the note
    listed = client.files.list(purpose="fine-tune")
    assert [f.id for f in listed.data] == [val.id, train.id]  # newest first
    assert client.files.retrieve(train.id).model_dump() == train.model_dump()
    assert client.files.content(train.id).read() == env["train"].read_bytes()

    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, validation_file=val.id,
                                         extra_body=body("varied.py", hyper={"eval_interval": 2}))
    assert job.id.startswith("ftjob-") and job.status == "validating_files" and job.fine_tuned_model is None
    assert job.hyperparameters.batch_size == 2 and job.training_file == train.id
    second = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id,
                                            extra_body=body("stuck.py"))
    assert [j.id for j in client.fine_tuning.jobs.list(limit=10).data] == [second.id, job.id]
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", 60, "the first job to run")
    # one job at a time by default: the second waits queued once validated (its validation may come a tick later)
    assert wait_for(lambda: (s := client.fine_tuning.jobs.retrieve(second.id).status) != "validating_files" and s,
                    10, "the second job to be validated") == "queued"
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j, 150,
                    "the first job to finish")
    assert done.status == "succeeded", (done.error, server_log(env["dir"] / "state")[-3000:])
    return {"job": done, "second": second, "train": train, "val": val}


def test_job_succeeds_with_openai_fields(flow, env):
    job = flow["job"]
    assert job.model == MODEL and job.fine_tuned_model == f"ft:{job.model}:grpo:{job.id}"
    # the operator's --model mapping holds for training: the job trained the directory served as qwen.qwen3-32b
    summary = json.loads((env["dir"] / "state" / "jobs" / job.id / "run" / "summary.json").read_text())
    assert summary["model"] == str(env["model"])
    assert job.finished_at >= job.created_at and job.error is None
    assert job.trained_tokens > 0 and job.organization_id and job.method.type == "reinforcement"


def test_events_paginate_newest_first_and_plot(flow, server, tmp_path):
    client, _, _ = server
    job = flow["job"]
    first = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=3)
    assert len(first.data) == 3 and first.has_more
    assert first.data[0].message == "The job has successfully completed"
    nxt = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=3, after=first.data[-1].id)
    assert nxt.data[0].id not in {e.id for e in first.data}
    events = list(client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=4))  # auto-paging
    assert len({e.id for e in events}) == len(events) and events[:3] == first.data
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    assert all(e.object == "fine_tuning.job.event" and e.level in ("info", "warn", "error") for e in events)
    metrics = [e for e in reversed(events) if e.type == "metrics"]
    assert [e.message for e in metrics] == [f"Step {i}/4: training metrics" for i in range(1, 5)]
    for key in ("step", "total_steps", "critic_rewards_mean", "actor_pg_loss", "actor_entropy", "actor_grad_norm",
                "critic_advantages_mean", "response_length_mean"):
        assert key in metrics[0].data
    messages = [e.message for e in reversed(events)]
    assert "Fine-tuning job started" in messages and "Files validated, moving job to queued state" in messages
    ckpt_events = [e.data for e in events if e.message.startswith("Checkpoint created")]
    assert {d["fine_tuned_model_checkpoint"] for d in ckpt_events} == {
        f"{job.fine_tuned_model}:ckpt-step-{s}" for s in (2, 4)}

    from grpo.remote.plot import plot_runs

    png = plot_runs([(job.id, [e.data for e in metrics])], tmp_path / "events.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_checkpoints(flow, server):
    client, _, _ = server
    job = flow["job"]
    ckpts = client.fine_tuning.jobs.checkpoints.list(fine_tuning_job_id=job.id)
    assert [c.step_number for c in ckpts.data] == [4, 2] and not ckpts.has_more
    for c in ckpts.data:
        assert c.object == "fine_tuning.job.checkpoint" and c.id.startswith("ftckpt-")
        assert c.fine_tuning_job_id == job.id
        assert c.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{c.step_number}"
        assert c.metrics.step == c.step_number and "critic_rewards_mean" in c.metrics.model_extra
    page = client.fine_tuning.jobs.checkpoints.list(fine_tuning_job_id=job.id, limit=1, after=ckpts.data[0].id)
    assert [c.step_number for c in page.data] == [2]


def test_chat_completions_on_fine_tuned_model_and_checkpoint(flow, server):
    client, _, _ = server
    job = flow["job"]
    msgs = [{"role": "user", "content": "What is 3 + 4? Let's think step by step."}]
    a = client.chat.completions.create(model=job.fine_tuned_model, messages=msgs, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model=job.fine_tuned_model, messages=msgs, max_tokens=6, temperature=0)
    assert a.object == "chat.completion" and a.id.startswith("chatcmpl-") and a.model == job.fine_tuned_model
    choice = a.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and (choice.finish_reason == "stop" or a.usage.completion_tokens == 6)
    assert a.usage.prompt_tokens > 5 and a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.choices[0].message.content == b.choices[0].message.content  # greedy is deterministic

    stream = client.chat.completions.create(model=job.fine_tuned_model, messages=msgs, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens

    ckpt = f"{job.fine_tuned_model}:ckpt-step-2"
    two = client.chat.completions.create(model=ckpt, messages=msgs, max_tokens=5, n=2, seed=7)
    again = client.chat.completions.create(model=ckpt, messages=msgs, max_tokens=5, n=2, seed=7)
    assert len(two.choices) == 2 and [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]  # seeded


def test_models_list_has_base_fine_tuned_and_checkpoints(flow, server):
    client, _, _ = server
    job = flow["job"]
    ids = {m.id for m in client.models.list()}
    assert {job.model, job.fine_tuned_model, f"{job.fine_tuned_model}:ckpt-step-2",
            f"{job.fine_tuned_model}:ckpt-step-4"} <= ids
    m = client.models.retrieve(job.fine_tuned_model)
    assert m.object == "model" and m.owned_by == "grpo-local"


def test_raw_objects_validate_strictly_against_the_sdk_types(flow, server):
    """The SDK parses leniently; here every object is validated strictly against its own pydantic type."""
    from openai.types import FileObject, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.fine_tuning import FineTuningJobEvent
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    _, url, _ = server
    job = flow["job"]
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    for f in http.get("/files").json()["data"]:
        FileObject.model_validate(f)
    for e in http.get(f"/fine_tuning/jobs/{job.id}/events", params={"limit": 100}).json()["data"]:
        FineTuningJobEvent.model_validate(e)
    for c in http.get(f"/fine_tuning/jobs/{job.id}/checkpoints").json()["data"]:
        FineTuningJobCheckpoint.model_validate(c)
    for m in http.get("/models").json()["data"]:
        Model.model_validate(m)
    ask = {"model": job.fine_tuned_model, "messages": [{"role": "user", "content": "1 + 1?"}], "max_tokens": 4}
    ChatCompletion.model_validate(http.post("/chat/completions", json=ask).json())
    chunks = sse_data(http.post("/chat/completions", json={**ask, "stream": True}).text)
    assert chunks and all(ChatCompletionChunk.model_validate(c) for c in chunks)
    ask = {"model": job.fine_tuned_model, "input": "1 + 1?", "max_output_tokens": 4}
    Response.model_validate(http.post("/responses", json=ask).json())
    events = sse_data(http.post("/responses", json={**ask, "stream": True}).text)
    adapter = TypeAdapter(ResponseStreamEvent)
    assert events and all(adapter.validate_python(e) for e in events)


def test_reasoning_becomes_a_reasoning_item_and_reasoning_content(env):
    """Thinking text (Qwen3's <think>, here not a single token, so it arrives in pieces) streams as a
    response's reasoning item and a chat message's reasoning_content, apart from the answer. The tokens
    are a recorded generation (a random model does not think), run through the server's own code."""
    from openai.types.chat import ChatCompletionChunk
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter
    from transformers import AutoTokenizer

    from grpo.api.chat import Choice, chat_stream
    from grpo.api.inference import Loaded
    from grpo.api.responses import ResponseBuilder

    tok = AutoTokenizer.from_pretrained(env["model"])
    loaded = Loaded(None, tok, [t for t in tok.all_special_tokens if t], [tok.eos_token_id])
    ids = tok("<think>\nadd 3 and 4\n</think>\n\nThe answer is 7", add_special_tokens=False)["input_ids"]
    ids.append(tok.eos_token_id)
    assert len(ids) > 12  # many small pieces: the split must hold back the partial "<think"

    builder = ResponseBuilder("m", {}, "high", {"temperature": 1.0, "top_p": 1.0})
    events = [TypeAdapter(ResponseStreamEvent).validate_python(e)
              for e in sse_data("".join(builder.stream(Choice(None, loaded, [1, 2, 3], {}, source=ids), 3)))]
    kinds = [e.type for e in events]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "add 3 and 4"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "The answer is 7"
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    final = events[-1].response
    assert events[-1].type == "response.completed" and [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "add 3 and 4" and final.output_text == "The answer is 7"
    assert final.usage.output_tokens == len(ids) and 0 < final.usage.output_tokens_details.reasoning_tokens < len(ids)

    chunks = [ChatCompletionChunk.model_validate(c)
              for c in sse_data("".join(chat_stream("m", [Choice(None, loaded, [1], {}, source=ids)], 1, True)))]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "add 3 and 4"
    assert "".join(d.content or "" for d in deltas) == "The answer is 7"
    assert chunks[-1].usage.completion_tokens == len(ids) and deltas[-1] is not None


def test_responses_stream(flow, server):
    client, _, _ = server
    model = flow["job"].fine_tuned_model
    inp = [{"role": "user", "content": "What is 2 + 2?"}]
    events = list(client.responses.create(model=model, input=inp, reasoning={"effort": "low"}, stream=True,
                                          max_output_tokens=7, temperature=0))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert kinds[-1] == f"response.{final.status}" and final.status in ("completed", "incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == final.output_text
    assert final.usage.output_tokens <= 7 and final.usage.input_tokens > 5 and final.reasoning.effort == "low"
    assert final.status == "completed" or final.incomplete_details.reason == "max_output_tokens"

    # The SDK's stream helper checks the sequence as it accumulates it (item identities, unfinished items).
    # (Its get_final_response() wants response.completed; a random model rarely ends before the limit.)
    with client.responses.stream(model=model, input=inp, max_output_tokens=7, temperature=0) as s:
        helper = list(s)[-1].response
    plain = client.responses.create(model=model, input="What is 2 + 2?", max_output_tokens=7, temperature=0)
    assert helper.output_text == plain.output_text == text  # same greedy text whichever way it is asked
    assert plain.status == final.status and plain.usage.output_tokens == final.usage.output_tokens


def test_cancel_second_job(flow, server, env):
    client, _, _ = server
    second = flow["second"]
    worker = wait_for(lambda: env["stuck_log"].is_file() and read_jsonl(env["stuck_log"]), 90,
                      "the second job's reward handler to be called")[0]
    assert client.fine_tuning.jobs.retrieve(second.id).status == "running"
    assert pids_with(second.id), "no trainer process for the running job"
    cancelled = client.fine_tuning.jobs.cancel(second.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    assert client.fine_tuning.jobs.retrieve(second.id).status == "cancelled"
    wait_for(lambda: not pids_with(second.id), 10, "the cancelled trainer to be gone")
    wait_for(lambda: gone(worker["pid"]) and gone(worker["ppid"]), 10, "the reward worker to be gone")
    events = client.fine_tuning.jobs.list_events(fine_tuning_job_id=second.id, limit=1)
    assert events.data[0].message == "Fine-tuning job cancelled"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.cancel(second.id)
    assert e.value.status_code == 400 and e.value.body["code"] == "job_not_cancellable"


def test_auth_not_found_and_bad_requests(server, env):
    client, url, _ = server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{url}/fine_tuning/jobs", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    assert e.value.body == {"message": "No such fine-tuning job: 'ftjob-000000000000000000000000'",
                            "type": "invalid_request_error", "param": "fine_tuning_job_id",
                            "code": "fine_tuning_job_not_found"}
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("../../etc/passwd")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model"

    f = client.files.create(file=env["train"].open("rb"), purpose="fine-tune")

    def create_error(model=MODEL, training_file=f.id, **kw) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model=model, training_file=training_file,
                                           extra_body=body(**kw))
        return err.value

    grader = "method.reinforcement.grader.lambda.function"
    for outside in (str(env["dir"] / "outside.py"), "../outside.py", "/etc/passwd"):
        err = create_error(handler=outside)
        assert err.body["param"] == grader and "handlers directory" in err.body["message"], outside
    err = create_error(handler="missing.py")
    assert err.body["param"] == grader and "no handler file" in err.body["message"]
    err = create_error(handler="varied.py", hyper={"batch_size": 0})
    assert err.body["param"] == "method.reinforcement.hyperparameters.batch_size"
    assert "method.reinforcement.hyperparameters.batch_size" in err.body["message"]
    err = create_error(handler="varied.py", hyper={"training_sample_per_prompt": 40})
    assert err.body["param"] == "method.reinforcement.hyperparameters.training_sample_per_prompt"
    err = create_error(handler="varied.py", engine={"handler": str(env["dir"] / "outside.py")})
    assert err.body["param"] == "engine.handler"
    err = create_error(training_file="file-ffffffffffffffffffffffff", handler="varied.py")
    assert err.body["param"] == "training_file"
    assert create_error(model="/no/such/model", handler="varied.py").body["param"] == "model"

    bad = write_records(env["dir"] / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}],
                                                    "reference_answer": "1"},
                                                   {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    assert e.value.body["param"] == "file" and "bad.jsonl:2: reference_answer" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=env["train"].open("rb"), purpose="assistants")
    assert e.value.body["param"] == "purpose"
    assert not [p for p in (env["dir"] / "state" / "files").iterdir() if p.name.startswith(".upload")]

    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_restart_resumes_the_running_job(env, tmp_path):
    """SIGKILL the server mid-job (after the step-2 checkpoint, with step 3 logged); the trainer goes with
    it; a new server on the same state directory resumes the job, which ends with one metrics line per step."""
    state = tmp_path / "state"
    served = ["--model", f"{MODEL}={env['model']}"]
    with start_server(state, env["handlers"], KEY, ["--max-upload-mb", "0.01", *served]) as (url, key, proc):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        for size in (200_000, 12_000):  # refused from Content-Length, and while reading the upload
            big = env["dir"] / f"big-{size}.jsonl"
            big.write_bytes(b"x" * size)
            with pytest.raises(openai.APIStatusError) as e:
                client.files.create(file=big.open("rb"), purpose="fine-tune")
            assert e.value.status_code == 413 and e.value.body["param"] == "file"
        f = client.files.create(file=env["train"].open("rb"), purpose="fine-tune")
        v = client.files.create(file=env["val"].open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, validation_file=v.id,
                                             extra_body=body("paced.py"))

        def step3_logged():
            steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
            return 3 in steps
        wait_for(step3_logged, 120, "step 3 of the job", interval=0.05)
        assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [2]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_for(lambda: not pids_with(job.id), 10, "the orphaned trainer to stop by itself")
    run = state / "jobs" / job.id / "run"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]  # step 3 is past the checkpoint

    with start_server(state, env["handlers"], KEY, served) as (url, key, proc):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        assert [x.id for x in client.files.list().data] == [v.id, f.id]  # the state survived
        done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j, 150,
                        "the resumed job to finish")
        assert done.status == "succeeded", (done.error, server_log(state)[-3000:])
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        assert sorted(e.data["step"] for e in events if e.type == "metrics") == [1, 2, 3, 4]
        messages = [e.message for e in events]
        assert "Resumed from checkpoint at step 2" in messages
        assert any(m.startswith("The server restarted") for m in messages)
        assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [4, 2]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["status"] == "succeeded"
