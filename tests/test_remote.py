"""The client side (`grpo submit/status/pull`, `grpo eval --base-url`): the Bedrock body built from a job YAML,
the auth rules and the token refresh, without a server; and end to end against our own server
(`grpo serve`, started on loopback by tests/server_helpers.py), never needing AWS."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers_engine import cli_env, run_grpo

from grpo.config import parse_config
from grpo.errors import UserError
from grpo.remote.client import (
    DOCUMENTED_HYPERPARAMETERS,
    RefreshingToken,
    bedrock_region,
    build_job_request,
    metrics_rows,
    resolve_api_key,
    resolve_base_url,
)

BEDROCK_URL = "https://bedrock-mantle.us-west-2.api.aws/v1"
ARN = "arn:aws:lambda:us-west-2:123456789012:function:gsm8k-reward"


def job(**hyper) -> dict:
    return {"model": "qwen.qwen3-32b", "training_file": "data/train.jsonl", "validation_file": "data/val.jsonl",
            "method": {"type": "reinforcement", "reinforcement": {
                "grader": {"type": "lambda", "lambda": {"function": ARN}},
                "hyperparameters": {"n_epochs": 1, **hyper}}},
            "engine": {"handler": "rewards/gsm8k.py", "base_learning_rate": 2e-3, "lora": {"rank": 8, "alpha": 16}}}


# -- the body ---------------------------------------------------------------------------------------------
def test_bedrock_body_strips_engine_and_sends_the_documented_three():
    req = build_job_request(parse_config(job(batch_size=4)), bedrock=True)
    kw = req.create_kwargs()
    assert set(kw) == {"model", "training_file", "validation_file", "extra_body"}
    assert set(kw["extra_body"]) == {"method"}  # no engine
    hyper = kw["extra_body"]["method"]["reinforcement"]["hyperparameters"]
    # the three documented ones always, with the values the local run uses (learning_rate_multiplier defaulted)
    assert hyper == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert tuple(hyper) == DOCUMENTED_HYPERPARAMETERS
    assert kw["extra_body"]["method"]["reinforcement"]["grader"] == {"type": "lambda", "lambda": {"function": ARN}}
    assert req.warnings == []
    # what is left at the local defaults is not sent, and said so
    notes = " ".join(req.notes)
    assert "not sent" in notes and "training_sample_per_prompt=8" in notes and "early_stopping=True" in notes
    assert "engine.handler (rewards/gsm8k.py) is local-only" in notes
    assert "engine.base_learning_rate=0.002" in notes


def test_bedrock_undocumented_hyperparameters_are_sent_with_a_warning_or_dropped():
    cfg = parse_config({**job(batch_size=16, training_sample_per_prompt=4, inference_max_tokens=512), "seed": 7})
    req = build_job_request(cfg, bedrock=True)
    hyper = req.method["reinforcement"]["hyperparameters"]
    assert hyper["training_sample_per_prompt"] == 4 and hyper["inference_max_tokens"] == 512
    assert req.create_kwargs()["seed"] == 7
    assert len(req.warnings) == 1
    w = req.warnings[0]
    assert "not documented" in w and "sent anyway" in w and "may ignore or reject" in w
    assert "training_sample_per_prompt=4" in w and "inference_max_tokens=512" in w and "seed=7" in w
    dropped = build_job_request(cfg, bedrock=True, drop_undocumented=True)
    assert dropped.method["reinforcement"]["hyperparameters"] == {"n_epochs": 1, "batch_size": 16,
                                                                  "learning_rate_multiplier": 1.0}
    assert "seed" not in dropped.create_kwargs()
    assert "left out (--drop-undocumented)" in dropped.warnings[0] and "training_sample_per_prompt=4" in dropped.warnings[0]


def test_our_server_gets_every_hyperparameter_and_the_engine_only_on_request():
    cfg = parse_config(job(batch_size=4))
    req = build_job_request(cfg, bedrock=False)
    kw = req.create_kwargs()
    assert "engine" not in kw["extra_body"] and req.warnings == [] and req.notes == []
    hyper = kw["extra_body"]["method"]["reinforcement"]["hyperparameters"]
    assert hyper["training_sample_per_prompt"] == 8 and hyper["batch_size"] == 4 and hyper["early_stopping"] is True
    with_engine = build_job_request(cfg, bedrock=False, with_engine=True).create_kwargs()
    assert with_engine["extra_body"]["engine"]["lora"] == {"rank": 8, "alpha": 16, "dropout": 0.0,
                                                           "target_modules": "all-linear"}
    with pytest.raises(UserError, match="--with-engine is for our own server"):
        build_job_request(cfg, bedrock=True, with_engine=True)


def test_bedrock_refuses_a_local_grader_and_a_local_model():
    raw = job()
    raw["method"]["reinforcement"]["grader"]["lambda"]["function"] = "rewards/gsm8k.py"
    with pytest.raises(UserError) as err:
        build_job_request(parse_config(raw), bedrock=True)
    msg = str(err.value)
    assert "local handler (rewards/gsm8k.py)" in msg and "deploy the handler as a Lambda" in msg
    assert "ARN in method.reinforcement.grader.lambda.function" in msg
    # our own server takes the path as it is (it checks that it lies under its handlers directory)
    assert build_job_request(parse_config(raw), bedrock=False).method["reinforcement"]["grader"]["lambda"][
        "function"] == "rewards/gsm8k.py"
    with pytest.raises(UserError, match="Bedrock needs its own model id"):
        build_job_request(parse_config({**job(), "model": "Qwen/Qwen3-32B"}), bedrock=True)
    odd = build_job_request(parse_config({**job(), "model": "amazon.nova-lite"}), bedrock=True)
    assert "not one of the ids known" in odd.warnings[0]


def test_submit_dry_run_through_the_cli(tmp_path):
    from helpers_engine import write_data

    write_data(tmp_path / "data", n_train=120, n_val=100)
    raw = job(batch_size=4, training_sample_per_prompt=4)
    raw.update(training_file="data/train.jsonl", validation_file="data/validation.jsonl")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    res = run_grpo("submit", tmp_path / "job.yaml", "--base-url", BEDROCK_URL, "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["bedrock"] is True and "engine" not in body["extra_body"]
    assert body["training_file"] == "data/train.jsonl"  # not uploaded by a dry run
    assert body["extra_body"]["method"]["reinforcement"]["hyperparameters"]["training_sample_per_prompt"] == 4
    assert "warning: not documented on Bedrock's OpenAI-compatible path, sent anyway" in res.stderr
    # batch_size 4 is outside the native 16-512: the config's own warning shows for Bedrock
    assert "outside the native API's 16-512" in res.stderr
    # the data is checked with Bedrock's rules before anything is sent: 100 records at least
    write_data(tmp_path / "small", n_train=8, n_val=4)
    small = run_grpo("submit", tmp_path / "job.yaml", "--base-url", BEDROCK_URL, "--dry-run", "--set",
                     "training_file=small/train.jsonl", cwd=tmp_path)
    assert small.returncode == 2 and "small/train.jsonl is not valid Bedrock RFT data" in small.stderr
    assert "at least 100" in small.stderr
    missing = run_grpo("submit", tmp_path / "job.yaml", "--base-url", BEDROCK_URL, "--dry-run", "--set",
                       "validation_file=nope.jsonl", cwd=tmp_path)
    assert missing.returncode == 2 and "validation_file: nope.jsonl: no such file" in missing.stderr
    raw["method"]["reinforcement"]["grader"]["lambda"]["function"] = "rewards/gsm8k.py"
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(raw))
    bad = run_grpo("submit", tmp_path / "local.yaml", "--base-url", BEDROCK_URL, "--dry-run", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "deploy the handler as a Lambda" in bad.stderr
    assert "Traceback" not in bad.stderr
    env = {k: v for k, v in cli_env().items() if k != "OPENAI_BASE_URL"}
    nourl = run_grpo("submit", tmp_path / "job.yaml", "--dry-run", cwd=tmp_path, env=env)
    assert nourl.returncode == 2 and "no endpoint: give --base-url" in nourl.stderr


# -- auth -------------------------------------------------------------------------------------------------
def test_bedrock_url_detection():
    assert bedrock_region(BEDROCK_URL) == "us-west-2"
    assert bedrock_region("https://bedrock-mantle.eu-central-1.api.aws/v1/") == "eu-central-1"
    assert bedrock_region("http://127.0.0.1:8000/v1") is None
    assert bedrock_region("https://bedrock-mantle.us-west-2.api.aws.evil.com/v1") is None
    assert resolve_base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    with pytest.raises(UserError, match="expected an http"):
        resolve_base_url("127.0.0.1:8000")


def test_api_key_rules(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    assert resolve_api_key(BEDROCK_URL, "given") == "given"
    with pytest.raises(UserError, match="give --api-key or set OPENAI_API_KEY"):
        resolve_api_key("http://127.0.0.1:8000/v1", None)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "bedrock-api-key-abc")
    assert resolve_api_key("http://127.0.0.1:8000/v1", None) == "sk-local"
    assert resolve_api_key(BEDROCK_URL, None) == "bedrock-api-key-abc"  # Bedrock never takes OPENAI_API_KEY
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK")
    try:
        import aws_bedrock_token_generator  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install aws-bedrock-token-generator"):
            resolve_api_key(BEDROCK_URL, None)
    else:
        assert isinstance(resolve_api_key(BEDROCK_URL, None), RefreshingToken)


def test_token_is_refreshed_before_it_expires():
    now = [1000.0]
    made = []

    def generate():
        made.append(f"bedrock-api-key-{len(made)}")
        return made[-1]

    tok = RefreshingToken(generate, lifetime_s=900, margin_s=120, clock=lambda: now[0])
    assert tok() == "bedrock-api-key-0" and tok.generated == 1
    now[0] += 779  # 779 s old: still 121 s of life left, more than the margin
    assert tok() == "bedrock-api-key-0" and tok.generated == 1
    now[0] += 1  # 780 s = lifetime - margin: regenerate before it expires
    assert tok() == "bedrock-api-key-1" and tok.generated == 2
    now[0] += 100
    assert tok() == "bedrock-api-key-1"
    now[0] += 5000  # long idle: a fresh one
    assert tok() == "bedrock-api-key-2" and tok.generated == 3
    with pytest.raises(ValueError):
        RefreshingToken(generate, lifetime_s=60, margin_s=60)


def test_metrics_rows_from_events_sorted_and_deduplicated():
    ev = lambda step, r, t="metrics": {"type": t, "data": {"step": step, "total_steps": 3, "critic_rewards_mean": r}}
    events = [ev(2, 0.2), ev(1, 0.1), {"type": "message", "data": {"step": 0, "val_score_rewards_mean": 0.3}},
              ev(2, 0.25), ev(3, 0.3), {"type": "metrics", "data": None}]
    rows = metrics_rows(events)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["critic_rewards_mean"] == 0.25


# -- end to end against our own server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`grpo serve` on loopback with a tiny random model, data, and the varied handler in its handlers dir;
    one job submitted from YAML with `grpo submit` and watched to the end with `grpo status --watch`."""
    from helpers_engine import build_model_dir, write_data, write_job, write_varied_handler
    from server_helpers import server_log, start_server

    tmp = tmp_path_factory.mktemp("remote")
    model = build_model_dir(tmp / "model")
    train, val = write_data(tmp / "data", n_train=8, n_val=4)
    handlers = tmp / "handlers"
    handlers.mkdir()
    handler = write_varied_handler(handlers / "varied.py")
    job_yaml = write_job(tmp / "job.yaml", model, train, val, handler=handler, hyper={"eval_interval": 2})
    # the operator serves the model directory under its own path as the name (the YAML's `model`)
    with start_server(tmp / "state", handlers, "test-key", ["--model", f"{model}={model}"]) as (url, key, _proc):
        conn = ("--base-url", url, "--api-key", key)
        sub = run_grpo("submit", job_yaml, *conn, "--with-engine", "--json", cwd=tmp)
        assert sub.returncode == 0, sub.stderr + server_log(tmp / "state")
        job = json.loads(sub.stdout)
        watch = run_grpo("status", job["id"], *conn, "--watch", "--interval", "0.5", "--json", cwd=tmp, timeout=180)
        assert watch.returncode == 0, watch.stdout + watch.stderr + server_log(tmp / "state")
        yield {"tmp": tmp, "url": url, "key": key, "conn": conn, "job": job, "submit": sub,
               "status": json.loads(watch.stdout), "job_yaml": job_yaml, "val": val, "handler": handler}


def cli(*args):
    """`grpo ARGS` in this process (the real entry point, exit status and both streams captured)."""
    import contextlib
    import io
    import subprocess

    from grpo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["grpo", *args], code, out.getvalue(), err.getvalue())


def client_for(served):
    from openai import OpenAI

    return OpenAI(base_url=served["url"], api_key=served["key"])


def test_submit_uploads_the_files_and_creates_the_job(served):
    job, client = served["job"], client_for(served)
    assert job["status"] in ("validating_files", "queued", "running") and job["id"].startswith("ftjob-")
    files = {f.id: f for f in client.files.list(purpose="fine-tune").data}
    assert job["training_file"] in files and job["validation_file"] in files
    assert files[job["training_file"]].filename == "train.jsonl"
    assert "uploaded training_file" in served["submit"].stderr and "(8 records)" in served["submit"].stderr
    # the handler's path under --handlers-dir, shown as $HANDLERS: no server path reaches a client (issue 20)
    assert job["method"]["reinforcement"]["grader"] == {"type": "lambda", "lambda": {"function": "$HANDLERS/varied.py"}}
    hyper = job["method"]["reinforcement"]["hyperparameters"]
    assert hyper["batch_size"] == 2 and hyper["training_sample_per_prompt"] == 4 and hyper["eval_interval"] == 2
    # --with-engine: the server's job ran our engine section (LoRA rank 4, no trackers)
    server_job = yaml.safe_load((served["tmp"] / "state" / "jobs" / job["id"] / "job.yaml").read_text())
    assert server_job["engine"]["lora"]["rank"] == 4


def test_status_reports_the_finished_job_and_its_last_step(served):
    st = served["status"]
    assert st["job"]["status"] == "succeeded" and st["job"]["fine_tuned_model"]
    assert st["latest_metrics"]["step"] == 4 and st["latest_metrics"]["total_steps"] == 4
    text = cli("status", served["job"]["id"], *served["conn"])
    assert text.returncode == 0 and "status succeeded" in text.stdout and "step 4/4: critic_rewards_mean" in text.stdout


def test_pull_writes_a_run_directory_like_a_local_run(served):
    from helpers_engine import read_jsonl, stable_metrics

    tmp, job_id = served["tmp"], served["job"]["id"]
    res = run_grpo("pull", job_id, *served["conn"], "--out", tmp / "pulled")
    assert res.returncode == 0, res.stderr
    assert "status succeeded, steps 4/4" in res.stdout
    pulled = read_jsonl(tmp / "pulled" / "metrics.jsonl")
    server_run = read_jsonl(tmp / "state" / "jobs" / job_id / "run" / "metrics.jsonl")
    assert [r["step"] for r in pulled] == [1, 2, 3, 4]
    assert [stable_metrics(r) for r in pulled] == [stable_metrics(r) for r in server_run]
    events = read_jsonl(tmp / "pulled" / "events.jsonl")
    assert len(events) == len({e["id"] for e in events}) and events[0]["message"].startswith("Created fine-tuning job")
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3, 4]  # oldest first
    ckpts = json.loads((tmp / "pulled" / "checkpoints.json").read_text())
    assert [c["step_number"] for c in ckpts] == [2, 4] and all(c["fine_tuned_model_checkpoint"] for c in ckpts)
    summary = json.loads((tmp / "pulled" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == 4 and summary["job"]["id"] == job_id
    assert summary["baseline_val_score_rewards_mean"] is not None  # from the step-0 validation event
    # the pulled directory is a run directory: plot draws it
    assert cli("plot", tmp / "pulled").returncode == 0 and (tmp / "pulled" / "metrics.png").is_file()


def test_paging_through_events_and_checkpoints(served):
    from grpo.remote.client import list_checkpoints, list_events

    client, job_id = client_for(served), served["job"]["id"]
    every = list_events(client, job_id, page_size=100)
    assert list_events(client, job_id, page_size=3) == every and len(every) > 6
    assert list_checkpoints(client, job_id, page_size=1) == list_checkpoints(client, job_id)


def test_pulled_job_compares_within_tolerance_to_the_local_run(served):
    """The server ran `grpo train` on the same YAML into its own run directory: a local run, which the
    pulled directory must match (compare exit 0), picture included."""
    tmp = served["tmp"]
    if not (tmp / "pulled").is_dir():
        assert cli("pull", served["job"]["id"], *served["conn"], "--out", tmp / "pulled").returncode == 0
    local = tmp / "state" / "jobs" / served["job"]["id"] / "run"
    assert (local / "config.json").is_file()  # written by the engine's trainer
    res = cli("compare", local, tmp / "pulled", "--out", tmp / "parity.png", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    assert rep["verdict"] == "within" and rep["alignment"] == "step" and (tmp / "parity.png").is_file()
    assert "val_score_rewards_mean" in rep["metrics"]
    assert all(r["level_gap"] == 0 for r in rep["metrics"].values())


def test_eval_through_the_servers_chat_completions(served):
    tmp, st = served["tmp"], served["status"]
    out = tmp / "samples.jsonl"
    res = run_grpo("eval", "--base-url", served["url"], "--api-key", served["key"], "--model",
                   st["job"]["fine_tuned_model"], "--data", served["val"], "--handler", served["handler"],
                   "--samples", "2", "--max-tokens", "8", "--temperature", "1.0", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["records"] == 4 and got["samples"] == 8 and got["base_url"] == served["url"]
    assert 0 < got["response_length_mean"] <= 8 and got["failures"] == 0
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(s["id"] for s in samples)[:2] == sorted(s["id"] for s in samples)[:2] and len(samples) == 8
    # graded by the same handler file: its rule, recomputed on each response, gives each score
    for s in samples:
        text = s["response"]
        assert s["score"] == pytest.approx(0.4 * (len(text) % 3) + (0.2 if any(c.isdigit() for c in text) else 0.0))
    assert got["reward_mean"] == pytest.approx(sum(s["score"] for s in samples) / 8)
    adapter = cli("eval", "--base-url", served["url"], "--model", "x", "--adapter", "a", "--data", served["val"],
                       "--handler", served["handler"])
    assert adapter.returncode == 2 and "--adapter is for a local model" in adapter.stderr


def test_without_engine_the_engine_section_stays_local(served):
    tmp = served["tmp"]
    res = cli("submit", served["job_yaml"], *served["conn"], "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    client_for(served).fine_tuning.jobs.cancel(job["id"])
    server_job = yaml.safe_load((tmp / "state" / "jobs" / job["id"] / "job.yaml").read_text())
    assert "lora" not in (server_job.get("engine") or {})  # the server's defaults, not our engine section


def test_api_errors_are_one_line_messages(served):
    job_id, url = served["job"]["id"], served["url"]
    bad_key = cli("status", job_id, "--base-url", url, "--api-key", "wrong")
    assert bad_key.returncode == 2 and "answered 401" in bad_key.stderr and "check --api-key" in bad_key.stderr
    missing = cli("pull", "ftjob-000000000000000000000000", *served["conn"], "--out", served["tmp"] / "nope")
    assert missing.returncode == 2 and "answered 404" in missing.stderr and "Traceback" not in missing.stderr
    gone = cli("status", job_id, "--base-url", "http://127.0.0.1:9/v1", "--api-key", "k")
    assert gone.returncode == 2 and "cannot reach http://127.0.0.1:9/v1" in gone.stderr


def test_a_refreshing_token_authenticates_every_request(served):
    """The SDK calls the token provider before each request; a stale token is replaced, never sent."""
    from openai import OpenAI

    now, issued = [0.0], []

    def generate():
        issued.append(served["key"] if len(issued) else "expired-key")
        return issued[-1]

    tok = RefreshingToken(generate, lifetime_s=100, margin_s=10, clock=lambda: now[0])
    client = OpenAI(base_url=served["url"], api_key=tok, max_retries=0)
    import openai

    with pytest.raises(openai.AuthenticationError):
        client.models.list()  # the first (deliberately bad) key
    now[0] = 95.0  # within the margin of expiry: the next request gets a fresh key
    assert client.models.list().data and tok.generated == 2
    assert client.fine_tuning.jobs.retrieve(served["job"]["id"]).status == "succeeded" and tok.generated == 2
