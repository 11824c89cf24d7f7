"""The server's smaller guarantees, on real processes (a `grpo serve` on loopback, the real openai
package): path helpers and jobs-only use never load torch; generation pads with the real pad id; an
internal error tells the client nothing of the server's insides; file content streams from disk;
/v1/models lists checkpoints from their directories; the job worker reuses the upload's validation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import httpx
import openai
import pytest
from helpers_engine import PYTHON, REPO, cli_env, write_data, write_records
from server_helpers import server_log, start_server, wait_for


def test_server_modules_and_checkpoint_paths_do_not_import_torch(tmp_path):
    """What the server runs for files, jobs and /v1/models (grpo.api.app, and grpo.training.checkpoint's path
    helpers that jobs.py and worker.py call) leaves torch and numpy unimported, in a fresh interpreter."""
    run = tmp_path / "run"
    for step in (2, 10):
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:06d}" / "state.json").write_text("{}")
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import grpo.api.app
        from grpo.training.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints
        run = Path({str(run)!r})
        assert [s for s, _ in list_checkpoints(run)] == [2, 10]
        assert latest_checkpoint(run) == checkpoint_dir(run, 10)
        assert latest_checkpoint(run / "missing") is None
        loaded = sorted(m for m in ("torch", "numpy") if m in sys.modules)
        assert not loaded, loaded
        print("ok")
    """)
    res = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_generation_pads_with_the_tokenizers_pad_id_even_when_it_is_zero():
    """The tiny model's tokenizer pads with id 0 (<|endoftext|>); 0 is a real id, not "no pad token"."""
    from grpo.api.inference import Loaded, generation_config
    from grpo.models.tiny_data import build_tokenizer

    tok = build_tokenizer()
    assert tok.pad_token_id == 0 and tok.eos_token_id != 0
    loaded = Loaded(None, tok, [], [tok.eos_token_id])
    greedy = generation_config(loaded, max_new_tokens=5, temperature=0, top_p=1.0)
    assert greedy.pad_token_id == 0 and greedy.eos_token_id == [tok.eos_token_id] and not greedy.do_sample
    sampled = generation_config(loaded, max_new_tokens=5, temperature=0.7, top_p=0.9)
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p == 0.9 and sampled.pad_token_id == 0
    tok.pad_token = None  # no pad token at all: the first end token stands in
    assert tok.pad_token_id is None
    assert generation_config(loaded, max_new_tokens=5, temperature=0, top_p=1.0).pad_token_id == tok.eos_token_id


# -- a real server on loopback, its state partly prepared on disk beforehand -------------------------------
KEY = "review-key-0123456789"
SERVED = "tiny"  # the model the server serves (--model tiny=<directory>)
HANDLER = "def lambda_handler(event, context):\n    return [{'id': t['id'], 'aggregate_reward_score': 0.0} for t in event]\n"


def job_body(model: str, training_file: str) -> dict:
    return {"model": model, "training_file": training_file, "method": {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "lambda", "lambda": {"function": "zero.py"}},
        "hyperparameters": {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 2}}}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server whose state directory already holds, as an earlier server would have left it, a finished
    job (checkpoints at steps 2 and 4, a metrics.jsonl that is not UTF-8) created with the server's own
    code, and an invalid file with no record of the upload's check."""
    from grpo.api import jobs as J
    from grpo.api.policy import ServerPolicy
    from grpo.api.store import Store

    d = tmp_path_factory.mktemp("review")
    handlers = d / "handlers"
    handlers.mkdir()
    (handlers / "zero.py").write_text(HANDLER)
    model = d / "model"  # a directory is all job creation checks; no trainer runs for the prepared job
    model.mkdir()
    train, _ = write_data(d / "data", n_train=4, n_val=1)
    state = d / "state"
    store = Store(state)
    try:
        data_doc = {"id": "file-" + "a" * 24, "object": "file", "bytes": train.stat().st_size, "created_at": 1,
                    "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed", "expires_at": None,
                    "status_details": None}
        shutil.copyfile(train, store.files_dir / f"{data_doc['id']}.jsonl")
        store.add_file(data_doc)
        legacy = dict(data_doc, id="file-" + "b" * 24, filename="legacy.jsonl")  # uploaded by an older server:
        (store.files_dir / f"{legacy['id']}.jsonl").write_text('{"messages": []}\n')  # no record of a check
        store.add_file(legacy)
        job = J.create_job(store, job_body(SERVED, data_doc["id"]),
                           ServerPolicy(handlers_dir=handlers, base_models={SERVED: str(model)}))
        job = store.update_job(job["id"], status="succeeded", fine_tuned_model=J.fine_tuned_model_id(job),
                               finished_at=job["created_at"] + 5)
        run = J.run_dir(store, job["id"])
        for step in (2, 4):
            (run / "checkpoints" / f"step-{step:06d}" / "adapter").mkdir(parents=True)
            (run / "checkpoints" / f"step-{step:06d}" / "state.json").write_text(json.dumps({"step": step}))
            os.utime(run / "checkpoints" / f"step-{step:06d}" / "state.json", (1_700_000_000 + step,) * 2)
        (run / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe\n')
    finally:
        store.close()
    with start_server(state, handlers, KEY, ["--model", f"{SERVED}={model}"]) as (url, key, proc):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        yield {"client": client, "http": http, "proc": proc, "state": state, "job": job, "train": train,
               "model": model, "dir": d, "legacy": legacy}
        http.close()


def test_models_list_from_checkpoint_directories_and_retrieve_one_directly(served):
    """/v1/models lists checkpoints from their directories, without reading any metrics.jsonl (the
    prepared run's is not UTF-8, so a listing that read it would fail); retrieve finds one id directly
    and gives the same object the list has."""
    client, job = served["client"], served["job"]
    ft = job["fine_tuned_model"]
    listed = {m.id: m for m in client.models.list()}
    assert {SERVED, ft, f"{ft}:ckpt-step-2", f"{ft}:ckpt-step-4"} <= set(listed)
    assert listed[f"{ft}:ckpt-step-4"].created == 1_700_000_004  # when its state.json was written
    assert listed[SERVED].owned_by == "system" and listed[ft].owned_by == "grpo-local"
    for mid, m in listed.items():
        assert client.models.retrieve(mid).model_dump() == m.model_dump(), mid
    for missing in (f"{ft}:ckpt-step-3", f"{ft}:ckpt-step-02", f"{ft}x", "ft:other:grpo:" + job["id"],
                    f"ft:{job['model']}:grpo:ftjob-{'0' * 24}", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(missing)
        assert e.value.body["code"] == "model_not_found", missing


def test_an_internal_error_is_generic_to_the_client_and_logged_once(served):
    """An unexpected exception (here: a run's metrics.jsonl that is not UTF-8) is a 500 whose message
    says nothing of the server's files or code; the server's log names the request and has the traceback
    once."""
    job, state = served["job"], served["state"]
    before = server_log(state)
    r = served["http"].get(f"/fine_tuning/jobs/{job['id']}/checkpoints")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["message"].startswith("The server had an error")
    assert str(state) not in r.text and "Unicode" not in r.text and "utf-8" not in r.text
    log = wait_for(lambda: (t := server_log(state)[len(before):]).count("Traceback") and t, 10, "the traceback")
    assert f"internal error on GET /v1/fine_tuning/jobs/{job['id']}/checkpoints: UnicodeDecodeError" in log
    assert log.count("Traceback (most recent call last)") == 1, log
    with pytest.raises(openai.InternalServerError):
        served["client"].fine_tuning.jobs.checkpoints.list(job["id"])


def test_file_content_streams_and_is_404_once_gone_from_disk(served):
    client, state, d = served["client"], served["state"], served["dir"]
    big = write_records(d / "big.jsonl", [{"messages": [{"role": "user", "content": f"question {i} " + "x" * 200}],
                                           "reference_answer": str(i)} for i in range(1500)])
    assert big.stat().st_size > 5 * 64 * 1024  # several of the streamed chunks
    f = client.files.create(file=big.open("rb"), purpose="fine-tune")
    got = served["http"].get(f"/files/{f.id}/content")
    assert got.status_code == 200 and got.content == big.read_bytes()
    assert got.headers["content-type"] == "application/jsonl"
    assert int(got.headers["content-length"]) == big.stat().st_size
    (state / "files" / f"{f.id}.jsonl").unlink()  # lost behind the server's back
    with pytest.raises(openai.NotFoundError) as e:
        client.files.content(f.id)
    assert e.value.body["code"] == "file_not_found" and str(state) not in e.value.body["message"]


def job_status(client, job_id: str):
    return client.fine_tuning.jobs.retrieve(job_id).status


def messages(client, job_id: str) -> list[str]:
    return [e.message for e in reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100)))]


def test_the_worker_reuses_the_uploads_validation_and_never_loads_torch(served):
    """The worker moves a job validating_files -> queued with its events, without reading the uploaded
    bytes again: changed behind the server's back after their upload (which never happens through the
    API), they are not looked at. The job is launched (its trainer then cancelled); after that and the
    /v1/models calls, the server process has not loaded torch."""
    client, http, state = served["client"], served["http"], served["state"]
    f = client.files.create(file=served["train"].open("rb"), purpose="fine-tune")
    raw = [http.get(f"/files/{f.id}").json(), *http.get("/files").json()["data"]]
    assert raw[0] == f.model_dump() and all(not k.startswith("_") for doc in raw for k in doc)  # server-only field
    (state / "files" / f"{f.id}.jsonl").write_text("this is not JSON\n")
    job = client.fine_tuning.jobs.create(**job_body(SERVED, f.id))
    assert job.status == "validating_files"
    wait_for(lambda: job_status(client, job.id) in ("running", "failed", "cancelled"), 30, "the job to start")
    try:
        client.fine_tuning.jobs.cancel(job.id)
    except openai.BadRequestError as e:  # the trainer found nothing to train on first (not the worker)
        assert e.body["code"] == "job_not_cancellable"
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "cancelled" or done.error.code == "training_failed", done.error
    said = messages(client, job.id)
    assert said.index(f"Validating training file: {f.id}") < said.index("Files validated, moving job to queued state")
    assert "Fine-tuning job started" in said or done.status == "cancelled"

    client.models.list()
    client.models.retrieve(f"{served['job']['fine_tuned_model']}:ckpt-step-2")
    maps = Path(f"/proc/{served['proc'].pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps


def test_a_file_without_a_record_of_its_check_is_validated_by_the_worker(served):
    """A file an older server stored (no record of the upload's check) is read and checked by the worker:
    the job fails naming the file, its line and field."""
    client, legacy = served["client"], served["legacy"]
    job = client.fine_tuning.jobs.create(**job_body(SERVED, legacy["id"]))
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status != "validating_files" and j, 30,
                    "the worker to validate the file")
    assert done.status == "failed" and done.error.code == "invalid_training_file", done.error
    assert done.error.param == "training_file" and f"{legacy['id']}:1: messages" in done.error.message
    assert f"Validating training file: {legacy['id']}" in messages(client, job.id)

