"""`grpo serve` against a hostile client holding a valid key (issue 12): a real server on loopback, the real
`openai` SDK and raw httpx requests, and a real local listener standing in for every place a request could
leave to (the server's AWS endpoint points at it), which must see no connection.

Items: 1 no URL or ARN from a client makes the server send anything (an ARN runs only as the operator mapped
it); 2 the client cannot choose what the server loads (only served models; the operator's --model mapping
holds for the job that trains); 3 bodies, uploads and engine knobs are bounded; 5 the handler's environment
is explicit (no server key, pid or AWS credentials) and the key is not on the command line; 7 malformed
bodies are 400s, never 500s; 8 an orphaned upload from a killed server is removed at start.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers_engine import build_model_dir, write_data
from server_helpers import server_log, start_server, wait_for

KEY = "harden-key-0123456789"
MAPPED = "arn:aws:lambda:us-west-2:123456789012:function:gsm8k-reward"  # the operator maps it to envdump.py
UNMAPPED = "arn:aws:lambda:us-west-2:123456789012:function:other"
HYPER = {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 2, "inference_max_tokens": 4}
ENGINE = {"checkpoint_interval": 1, "micro_batch_size": 4, "reward": {"concurrency": 1}, "log_with": ["none"],
          "lora": {"rank": 2, "alpha": 4}}
ENVDUMP = '''import json, os
def lambda_handler(event, context):
    with open(os.environ["ENV_DUMP"], "w") as f:
        json.dump(dict(os.environ), f)
    return [{"id": t["id"], "aggregate_reward_score": float(len(t["messages"][-1]["content"]) % 2)} for t in event]
'''
TERMINAL = ("succeeded", "failed", "cancelled")


class Listener(socketserver.ThreadingTCPServer):
    """Records every connection made to it (and the first bytes sent), then closes it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.seen: list[bytes] = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(inner):
                inner.request.settimeout(2)
                try:
                    self.seen.append(inner.request.recv(200))
                except OSError:
                    self.seen.append(b"")

        super().__init__(("127.0.0.1", 0), Handler)


def body(grader: str = MAPPED, hyper=None, engine=None, model: str = "tiny", training_file: str | None = None) -> dict:
    out = {"model": model, "method": {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "lambda", "lambda": {"function": grader}}, "hyperparameters": {**HYPER, **(hyper or {})}}},
           "engine": {**ENGINE, **(engine or {})}}
    if training_file:
        out["training_file"] = training_file
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("harden")
    model = build_model_dir(d / "model", seed=1)
    train, _ = write_data(d / "data", n_train=2, n_val=1)
    handlers = d / "handlers"
    handlers.mkdir()
    (handlers / "envdump.py").write_text(ENVDUMP)
    state = d / "state"
    (state / "files").mkdir(parents=True)
    orphan = state / "files" / ".upload-file-0123456789abcdef01234567"  # left by a server killed mid-upload
    orphan.write_bytes(b"x" * 1000)
    listener = Listener()
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    sink = f"http://127.0.0.1:{listener.server_address[1]}"
    env = {"AWS_ENDPOINT_URL": sink, "AWS_ENDPOINT_URL_LAMBDA": sink, "AWS_ACCESS_KEY_ID": "AKIDHARDENTEST",
           "AWS_SECRET_ACCESS_KEY": "secret-harden-test", "AWS_REGION": "us-west-2", "GRPO_API_KEY": KEY}
    args = ["--model", f"tiny={model}", "--lambda", f"{MAPPED}={handlers / 'envdump.py'}",
            "--handler-env", f"ENV_DUMP={d / 'env.json'}", "--handler-env", "JUDGE_MODE=strict",
            "--max-upload-mb", "0.05", "--max-request-mb", "0.25", "--max-reward-concurrency", "4"]
    try:
        with start_server(state, handlers, KEY, args, env=env, key_file=True) as (url, key, proc):
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            f = client.files.create(file=train.open("rb"), purpose="fine-tune")
            yield {"client": client, "http": http, "url": url, "proc": proc, "state": state, "dir": d, "file": f.id,
                   "listener": listener, "orphan": orphan, "model": model}
            http.close()
    finally:
        listener.shutdown()


def create_error(served, **kw) -> dict:
    r = served["http"].post("/fine_tuning/jobs", json=body(training_file=served["file"], **kw))
    assert r.status_code == 400, (r.status_code, r.text)
    return r.json()["error"]


def test_no_request_leaves_and_the_mapped_arn_runs_locally_with_an_explicit_environment(served):
    """Item 1 (+ 5 on the server): client-named URLs and ARNs are refused before anything runs; the ARN the
    operator mapped runs its local file; the listener behind the server's AWS endpoint sees nothing."""
    port = served["listener"].server_address[1]
    for url in (f"http://127.0.0.1:{port}/", "http://169.254.169.254/latest/meta-data/"):
        err = create_error(served, engine={"reward": {"concurrency": 1, "endpoint_url": url}})
        assert err["param"] == "engine.reward.endpoint_url" and "operator" in err["message"]
    err = create_error(served, grader=UNMAPPED)
    assert err["code"] == "grader_not_allowed" and err["param"] == "method.reinforcement.grader.lambda.function"
    assert "--lambda ARN=FILE" in err["message"] and "--invoke-lambdas" in err["message"]
    assert create_error(served, engine={"handler": UNMAPPED})["param"] == "engine.handler"

    client = served["client"]
    job = client.fine_tuning.jobs.create(model="tiny", training_file=served["file"],
                                         extra_body={k: v for k, v in body().items() if k != "model"})
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j, 150,
                    "the job graded by the mapped ARN's local file")
    assert done.status == "succeeded", (done.error, server_log(served["state"])[-3000:])
    time.sleep(0.5)
    assert served["listener"].seen == []  # no request left: not to the endpoint, not to AWS
    seen = json.loads((served["dir"] / "env.json").read_text())
    assert seen["JUDGE_MODE"] == "strict" and seen["AWS_REGION"] == "us-west-2"  # configured, and the base
    leaked = {"GRPO_API_KEY", "GRPO_SERVER_PID", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    assert not leaked & set(seen) and KEY not in json.dumps(seen)
    assert seen["AWS_SHARED_CREDENTIALS_FILE"] == os.devnull and seen["AWS_EC2_METADATA_DISABLED"] == "true"
    assert KEY not in Path(f"/proc/{served['proc'].pid}/cmdline").read_bytes().decode(errors="replace")


def test_the_client_cannot_choose_what_the_server_loads(served):
    """Item 2: only served models; no path or hub id from a client reaches a loader; no server path in errors."""
    started = time.monotonic()
    for model in ("/etc", "../../../../../etc", "someorg/some-model", "qwen.qwen3-32b"):
        err = create_error(served, model=model)
        assert err["param"] == "model" and err["code"] == "model_not_found" and "serves tiny" in err["message"]
        assert str(served["dir"]) not in err["message"] and ".cache" not in err["message"]
    assert create_error(served, engine={"model": "/etc"})["param"] == "engine.model"
    for field, value in (("dtype", "float16"), ("load_in_4bit", True), ("attn_implementation", "eager")):
        err = create_error(served, engine={field: value})
        assert err["param"] == f"engine.{field}" and "operator" in err["message"], field
    assert create_error(served, engine={"log_with": ["wandb"]})["param"] == "engine.log_with"
    r = served["http"].post("/chat/completions", json={"model": "someorg/some-model", "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert time.monotonic() - started < 20  # nothing went to a hub


def test_bodies_uploads_and_engine_knobs_are_bounded(served):
    """Item 3: a chunked upload or JSON body (no Content-Length) past the limit is a 413 before it is kept
    whole; engine knobs and hyperparameters outside the server's bounds are a 400 naming them."""
    http, files = served["http"], served["state"] / "files"
    boundary = "harden-boundary"

    def multipart():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(64):
            yield b"x" * 16384  # 1 MiB in all, over 0.05 MiB + the form's slack
        yield f"\r\n--{boundary}--\r\n".encode()

    r = http.post("/files", content=multipart(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert not [p for p in files.iterdir() if p.name.startswith(".upload")]

    def big_json():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(32):
            yield b"y" * 16384  # 0.5 MiB, over --max-request-mb 0.25
        yield b'"}]}'

    r = http.post("/chat/completions", content=big_json(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for engine, param in (({"reward": {"concurrency": 100000}}, "engine.reward.concurrency"),
                          ({"reward": {"concurrency": 1, "timeout_s": 1e300}}, "engine.reward.timeout_s"),
                          ({"lora": {"rank": 10**6, "alpha": 4}}, "engine.lora.rank"),
                          ({"health": {"window": 10**9}}, "engine.health.window"),
                          ({"seed": 2**70}, "engine.seed")):
        assert create_error(served, engine=engine)["param"] == param, engine
    err = create_error(served, hyper={"inference_max_tokens": 10**9})
    assert err["param"] == "method.reinforcement.hyperparameters.inference_max_tokens"


def test_malformed_bodies_are_400_never_500(served):
    """Item 7: deep nesting, wrong types in chat/responses bodies, a NUL in a grader path."""
    http = served["http"]
    deep = "[" * 1000 + "]" * 1000
    for route in ("/chat/completions", "/responses", "/fine_tuning/jobs"):
        r = http.post(route, content=f'{{"model": "tiny", "x": {deep}}}', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "nested" in r.json()["error"]["message"], route
    chat = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for bad, param in (({"messages": [{"role": [], "content": "hi"}]}, "messages[0].role"),
                       ({"reasoning_effort": []}, "reasoning_effort"),
                       ({"stream": True, "stream_options": "yes"}, "stream_options")):
        r = http.post("/chat/completions", json={**chat, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    assert http.post("/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 2,
                                         "reasoning": {"effort": {}}}).status_code == 400
    err = create_error(served, grader="envdump\x00.py")
    assert err["param"] == "method.reinforcement.grader.lambda.function"
    # every field of a chat body given every JSON type (a lone surrogate escape too): a 200 or a 4xx, never a 500
    odd = [[], {}, "x", -1, 1e308, True, None, "\ud800"]

    def post(route, payload):  # json.dumps escapes the surrogate as JSON allows
        return http.post(route, content=json.dumps(payload), headers={"Content-Type": "application/json"})

    for key in ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
                "stream", "stream_options", "reasoning_effort", "tool_choice", "response_format", "stop"):
        for value in odd:
            r = post("/chat/completions", {**chat, key: value})
            assert r.status_code < 500, (key, value, r.text)
    for key in ("input", "instructions", "reasoning", "max_output_tokens", "text", "metadata"):
        for value in odd:
            r = post("/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 2, key: value})
            assert r.status_code < 500, (key, value, r.text)


def test_an_orphaned_upload_is_removed_at_start(served):
    """Item 8: the fixture left a `.upload-file-*` (as a server killed mid-upload would) before starting."""
    assert not served["orphan"].exists()


def test_every_engine_field_is_either_a_client_knob_or_the_operators():
    """A new engine field must be placed: in the client's allowlist (with bounds) or with the operator."""
    from pydantic import BaseModel

    from grpo.api.policy import CLIENT_ENGINE, OPERATOR_ENGINE
    from grpo.config import EngineConfig

    def fields(model, prefix=""):
        for name, f in model.model_fields.items():
            sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
            if sub is not None and isinstance(CLIENT_ENGINE.get(prefix.split(".")[0] or name), dict):
                yield from fields(sub, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    def placed(path):
        rule = CLIENT_ENGINE
        for part in path.split("."):
            rule = rule.get(part) if isinstance(rule, dict) else rule
        return rule is not None or path in OPERATOR_ENGINE

    unplaced = [p for p in fields(EngineConfig) if not placed(p)]
    assert unplaced == [], f"place these in grpo/api/policy.py (CLIENT_ENGINE or OPERATOR_ENGINE): {unplaced}"


def test_what_the_operator_allows_lands_in_the_jobs_config(tmp_path):
    """The job.yaml a trainer reads holds the operator's choices: the served model for the job's Bedrock id,
    the operator's Lambda endpoint for an allowed ARN, the operator's handler environment for a local file;
    the quickstart's engine section (engine.model naming what the server serves for the id) is accepted."""
    import shutil

    import yaml

    from grpo.api import jobs as J
    from grpo.api.policy import ServerPolicy
    from grpo.api.store import Store

    train, _ = write_data(tmp_path / "data", n_train=2, n_val=1)
    store = Store(tmp_path / "state")
    try:
        doc = {"id": "file-" + "c" * 24, "object": "file", "bytes": 1, "created_at": 1, "filename": "t.jsonl",
               "purpose": "fine-tune", "status": "processed", "expires_at": None, "status_details": None}
        shutil.copyfile(train, store.files_dir / f"{doc['id']}.jsonl")
        store.add_file(doc)
        (tmp_path / "handlers").mkdir()
        (tmp_path / "handlers" / "gsm8k.py").write_text(ENVDUMP)
        policy = ServerPolicy(handlers_dir=tmp_path / "handlers", base_models={"qwen.qwen3-32b": "grpo:tiny-arith"},
                              invoke_lambdas=True, lambda_endpoint_url="http://127.0.0.1:4566",
                              handler_env={"JUDGE_MODE": "strict"}, handler_pass_env=["AWS_PROFILE"])

        def job_yaml(engine):
            job = J.create_job(store, dict(body(model="qwen.qwen3-32b", training_file=doc["id"]), engine=engine),
                               policy)
            return yaml.safe_load((J.job_dir(store, job["id"]) / "job.yaml").read_text())

        invoked = job_yaml({"reward": {"concurrency": 1}})
        assert invoked["engine"]["model"] == "grpo:tiny-arith"
        assert invoked["method"]["reinforcement"]["grader"]["lambda"]["function"] == MAPPED
        assert invoked["engine"]["reward"]["endpoint_url"] == "http://127.0.0.1:4566" and "env" not in invoked["engine"]["reward"]
        local = job_yaml({"model": "grpo:tiny-arith", "handler": "gsm8k.py", "base_learning_rate": 1e-3})
        assert local["engine"]["handler"] == str((tmp_path / "handlers" / "gsm8k.py").resolve())
        assert local["engine"]["reward"]["env"] == {"JUDGE_MODE": "strict"}
        assert local["engine"]["reward"]["pass_env"] == ["AWS_PROFILE"]
    finally:
        store.close()
