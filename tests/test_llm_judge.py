"""rewards/llm_judge.py: the score parse and the configuration by hand; then the handler for real, in the reward
runner's worker processes, grading through `grpo serve` on loopback with the embedded tiny model as the judge,
and through the reward lab (`grpo reward check`). The tiny model knows arithmetic, not grading: the judge prompt
asks it the trajectory's own sum and its `#### N` answer is the "score" (0..50), so the parse path meets real
replies, in range and out of it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.reward.runner import RewardRunner, make_trajectory

ROOT = Path(__file__).resolve().parents[1]
HANDLER = ROOT / "rewards" / "llm_judge.py"
SUFFIX = " Let's think step by step and output the final answer after '####'."


def _load():
    spec = importlib.util.spec_from_file_location("llm_judge", HANDLER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


judge = _load()


def test_parse_score_by_hand():
    pat = re.compile(judge.DEFAULT_PATTERN, re.IGNORECASE)
    assert judge.parse_score("Looks right.\nScore: 7", pat, 10) == 7.0
    assert judge.parse_score("score = 3.5 then SCORE: 9", pat, 10) == 9.0  # the last match counts
    assert judge.parse_score("<think>Score: 2</think>Final. Score: 8", pat, 10) == 8.0  # thinking is not the verdict
    with pytest.raises(judge.JudgeFailure, match=r"score 11 is outside 0..10: 'Score: 11'"):
        judge.parse_score("Score: 11", pat, 10)
    with pytest.raises(judge.JudgeFailure, match="has no score"):
        judge.parse_score("I think it is fine.", pat, 10)
    with pytest.raises(judge.JudgeFailure, match="has no score"):
        judge.parse_score("<think>Score: 5</think>", pat, 10)
    assert judge.parse_score("#### 14", re.compile(r"####\s*(-?\d+)"), 20) == 14.0


def test_configuration_errors_name_the_variable():
    base = {"JUDGE_BASE_URL": "http://127.0.0.1:9/v1", "JUDGE_MODEL": "m"}
    cfg = judge.load_config(base)
    assert (cfg["max_score"], cfg["timeout_s"], cfg["retries"], cfg["temperature"]) == (10.0, 30.0, 2, 0.0)
    for env, text in ([{}, "JUDGE_BASE_URL is not set"], [{"JUDGE_BASE_URL": "x"}, "JUDGE_MODEL is not set"],
                      [{**base, "JUDGE_BASE_URL": "ftp://x"}, "expected an http:// or https:// URL"],
                      [{**base, "JUDGE_TIMEOUT_S": "soon"}, "JUDGE_TIMEOUT_S='soon': expected a number"],
                      [{**base, "JUDGE_MAX_SCORE": "0"}, "JUDGE_MAX_SCORE='0': must be > 0"],
                      [{**base, "JUDGE_SCORE_PATTERN": r"\d+"}, "needs a group"],
                      [{**base, "JUDGE_PROMPT": "{answer}"}, "JUDGE_PROMPT: bad template"]):
        with pytest.raises(judge.ConfigError, match=re.escape(text)):
            judge.load_config(env)
    q, r, ref = judge.split_trajectory(make_trajectory("a", 0, [{"role": "system", "content": "S"},
                                                                {"role": "user", "content": "Q"}], "R", "#### 4"))
    assert (q, r, ref) == ("system: S\nuser: Q", "R", "#### 4")


# ------------------------------------------------------------------------------ against grpo serve
SUMS = [(10, 12), (11, 13), (15, 20), (30, 41), (10, 10), (55, 12), (12, 14), (23, 45)]  # two-digit, as it learned


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from server_helpers import start_server

    from grpo.models.tiny import ensure_tiny_model

    tmp = tmp_path_factory.mktemp("judge")
    (tmp / "handlers").mkdir()
    model = ensure_tiny_model(progress=False)  # cached across runs, as the quickstart test's
    with start_server(tmp / "state", tmp / "handlers", "judge-key", ["--model", f"tiny={model}"]) as (url, key, _):
        env = {"JUDGE_BASE_URL": url, "JUDGE_API_KEY": key, "JUDGE_MODEL": "tiny", "JUDGE_RUBRIC": "",
               "JUDGE_PROMPT": "{question}", "JUDGE_SCORE_PATTERN": r"####\s*(-?\d+)", "JUDGE_MAX_SCORE": "50",
               "JUDGE_MAX_TOKENS": "48", "JUDGE_RETRIES": "1", "JUDGE_TIMEOUT_S": "60"}
        yield {"tmp": tmp, "url": url, "key": key, "env": env}


def _trajectories():
    return [make_trajectory(f"s{i}", 0, [{"role": "user", "content": f"What is {a} + {b}?{SUFFIX}"}], "a response",
                            f"#### {a + b}") for i, (a, b) in enumerate(SUMS)]


def test_judge_scores_through_grpo_serve_and_reports_each_failure(served):
    trajs = _trajectories()
    with RewardRunner(str(HANDLER), env=served["env"], max_concurrency=1, on_failure="skip") as runner:
        res = runner.score(trajs)
    # what the judge says to each prompt, asked directly (temperature 0: the same reply), parsed by the handler
    cfg = judge.load_config(served["env"])
    failed = {tid: f.message for f in res.failures for tid in f.trajectory_ids}
    graded = 0
    for t, score in zip(trajs, res.scores):
        reply = judge._post(cfg, {"model": "tiny", "temperature": 0, "max_tokens": 48,
                                  "messages": [t["messages"][0]]})
        try:
            want = judge.parse_score(reply, cfg["pattern"], 50) / 50
        except judge.JudgeFailure as exc:
            assert score is None and str(exc) in failed[t["id"]], (reply, failed)
            assert "the handler could not grade it: llm_judge: the judge's" in failed[t["id"]]
        else:
            assert score == pytest.approx(want), reply
            graded += 1
    assert graded >= 1 and len(failed) >= 1, (res.scores, failed)  # both paths met real replies
    assert res.summary()["reward_failures"] == len(failed)  # counted, never a silent 0
    assert all(v >= 1 for v in res.metrics["judge_attempts"])


def test_an_unreachable_or_refusing_judge_fails_each_trajectory(served):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once the socket closes
    trajs = _trajectories()[:2]
    for env, text in ({"JUDGE_BASE_URL": f"http://127.0.0.1:{closed}/v1"}, "could not be reached after 2 attempt(s)"), \
                     ({"JUDGE_API_KEY": "wrong"}, "refused the request: HTTP 401"):
        with RewardRunner(str(HANDLER), env={**served["env"], **env}, max_concurrency=1, on_failure="skip") as runner:
            res = runner.score(trajs)
        assert res.scores == [None, None] and res.n_failed == 2
        assert all(text in f.message for f in res.failures), res.failures


def test_reward_lab_runs_the_judge(served):
    from helpers_engine import write_records

    data = write_records(served["tmp"] / "sums.jsonl", [
        {"id": f"s{i}", "messages": [{"role": "user", "content": f"What is {a} + {b}?{SUFFIX}"}],
         "reference_answer": f"#### {a + b}"} for i, (a, b) in enumerate(SUMS)])
    env_args = [a for k, v in served["env"].items() for a in ("--env", f"{k}={v}")]
    out = subprocess.run([sys.executable, "-m", "grpo", "reward", "check", "--handler", str(HANDLER), "--data",
                          str(data), *env_args, "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads(out.stdout)
    assert "8 records; fine for checking a handler" in out.stderr  # a small file is a warning in the lab
    assert report["n_scored"] + report["n_failed"] == 8 and report["n_scored"] >= 1 and report["n_failed"] >= 1
    assert out.returncode == 1  # the handler failed on some trajectories: said, not zeroed
    assert all("llm_judge:" in f["message"] for f in report["failures"])
    assert report["metrics"]["judge_score"]["type"] == "Metric"
