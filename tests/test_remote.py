"""The client side (`grpo submit/status/pull`, `grpo eval --base-url`): the Bedrock body built from a job YAML,
the auth rules and the token refresh, without a server; and end to end against our own server
(`grpo serve`, started on loopback by tests/server_helpers.py), never needing AWS."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from helpers_engine import cli_env, run_grpo

from grpo.config import parse_config
from grpo.errors import UserError
from grpo.remote import (DOCUMENTED_HYPERPARAMETERS, RefreshingToken, bedrock_region, build_job_request, metrics_rows,
                         resolve_api_key, resolve_base_url)

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
    raw = job(batch_size=4, training_sample_per_prompt=4)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    res = run_grpo("submit", tmp_path / "job.yaml", "--base-url", BEDROCK_URL, "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["bedrock"] is True and "engine" not in body["extra_body"]
    assert body["extra_body"]["method"]["reinforcement"]["hyperparameters"]["training_sample_per_prompt"] == 4
    assert "warning: not documented on Bedrock's OpenAI-compatible path, sent anyway" in res.stderr
    # batch_size 4 is outside the native 16-512: the config's own warning shows for Bedrock
    assert "outside the native API's 16-512" in res.stderr
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


def test_token_provider_is_what_the_openai_client_calls_per_request():
    """The SDK calls a callable api_key before each request: a RefreshingToken is that callable."""
    from openai import OpenAI

    tok = RefreshingToken(lambda: "k", lifetime_s=10, margin_s=1, clock=lambda: 0.0)
    client = OpenAI(base_url="http://127.0.0.1:9/v1", api_key=tok)
    assert client._refresh_api_key() == "k" and tok.generated == 1


def test_metrics_rows_from_events_sorted_and_deduplicated():
    ev = lambda step, r, t="metrics": {"type": t, "data": {"step": step, "total_steps": 3, "critic_rewards_mean": r}}
    events = [ev(2, 0.2), ev(1, 0.1), {"type": "message", "data": {"step": 0, "val_score_rewards_mean": 0.3}},
              ev(2, 0.25), ev(3, 0.3), {"type": "metrics", "data": None}]
    rows = metrics_rows(events)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["critic_rewards_mean"] == 0.25
