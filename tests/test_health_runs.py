"""Health alarms on real runs: a real quickstart run raises none; a real tiny-model run with a broken
(constant) reward raises the variance-collapse alarm once, as a warning event and in the summary."""

import json
from pathlib import Path

from helpers_engine import build_model_dir, read_jsonl, run_grpo, write_data, write_job

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_real_quickstart_run_raises_no_alarm():
    # tests/fixtures/quickstart_metrics.jsonl: `grpo quickstart` on this machine (validation 0.41 -> 0.945,
    # stopped early at step 90), copied as it was written.
    from grpo.health import scan

    rows = read_jsonl(FIXTURES / "quickstart_metrics.jsonl")
    assert len(rows) == 90 and rows[-1]["val_score_rewards_mean"] >= 0.9
    assert scan(rows, baseline_val=0.41) == []


def test_a_constant_reward_raises_variance_collapse(tmp_path):
    model = build_model_dir(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=10, n_val=2)
    handler = tmp_path / "constant.py"
    handler.write_text("def lambda_handler(event, context):\n"
                       "    return [{'id': t['id'], 'aggregate_reward_score': 0.5} for t in event]\n")
    job = write_job(tmp_path / "job.yaml", model, train, None, handler=handler)
    res = run_grpo("train", job, "--output-dir", tmp_path / "run", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "[reward_variance_collapse]" in res.stdout + res.stderr
    warnings = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["level"] == "warning"]
    collapse = [e for e in warnings if e["data"]["alarm"] == "reward_variance_collapse"]
    assert len(collapse) == 1 and collapse[0]["data"]["step"] == 3  # 3 steps in a row with no spread, once
    health = json.loads((tmp_path / "run" / "summary.json").read_text())["health"]
    assert not health["ok"] and "reward_variance_collapse" in [a["name"] for a in health["alarms"]]


def test_stop_on_turns_an_alarm_into_a_stop(tmp_path):
    model = build_model_dir(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=12, n_val=2)
    handler = tmp_path / "constant.py"
    handler.write_text("def lambda_handler(event, context):\n"
                       "    return [{'id': t['id'], 'aggregate_reward_score': 1.0} for t in event]\n")
    job = write_job(tmp_path / "job.yaml", model, train, None, handler=handler,
                    engine={"health": {"stop_on": ["reward_variance_collapse"]}})
    res = run_grpo("train", job, "--output-dir", tmp_path / "run", "--no-progress")
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # 6 steps planned; stopped when the alarm fired
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["health"]["stopped_by"] == "reward_variance_collapse"
