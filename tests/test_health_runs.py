"""Health alarms on real runs: a real quickstart run raises none; a real tiny-model run with a broken
(constant) reward raises the variance-collapse alarm once, as a warning event and in the summary."""

import json
from pathlib import Path

from helpers_engine import read_jsonl, train_with_handler

FIXTURES = Path(__file__).parent / "fixtures"


def constant_handler(score: float) -> str:
    """A broken grader: the same score for every trajectory, so no group has any spread."""
    return ("def lambda_handler(event, context):\n"
            f"    return [{{'id': t['id'], 'aggregate_reward_score': {score}}} for t in event]\n")


def test_a_real_quickstart_run_raises_no_alarm():
    # tests/fixtures/quickstart_metrics.jsonl: `grpo quickstart` on this machine (validation 0.41 -> 0.945,
    # stopped early at step 90), copied as it was written.
    from grpo.training.health import scan

    rows = read_jsonl(FIXTURES / "quickstart_metrics.jsonl")
    assert len(rows) == 90 and rows[-1]["val_score_rewards_mean"] >= 0.9
    assert scan(rows, baseline_val=0.41) == []


def test_a_constant_reward_raises_variance_collapse(tmp_path):
    res, _ = train_with_handler(tmp_path, constant_handler(0.5), n_train=10)
    assert res.returncode == 0, res.stderr
    assert "[reward_variance_collapse]" in res.stdout + res.stderr
    warnings = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["level"] == "warning"]
    collapse = [e for e in warnings if e["data"]["alarm"] == "reward_variance_collapse"]
    assert len(collapse) == 1 and collapse[0]["data"]["step"] == 3  # 3 steps in a row with no spread, once
    health = json.loads((tmp_path / "run" / "summary.json").read_text())["health"]
    assert not health["ok"] and "reward_variance_collapse" in [a["name"] for a in health["alarms"]]


def test_stop_on_turns_an_alarm_into_a_stop(tmp_path):
    res, _ = train_with_handler(tmp_path, constant_handler(1.0), n_train=12,
                                engine={"health": {"stop_on": ["reward_variance_collapse"]}})
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # 6 steps planned; stopped when the alarm fired
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["health"]["stopped_by"] == "reward_variance_collapse"
