"""rewards/gsm8k.py: verl/AWS GSM8K grading semantics, both reference placements, and agreement with
the human is_correct labels of 1,319 x 4 real model solutions (shared/data/gsm8k)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from grpo.reward.runner import make_trajectory

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
PROMPT = [{"role": "user", "content": "How many? Let's think step by step and output the final answer after '####'."}]


def _load():
    spec = importlib.util.spec_from_file_location("gsm8k_reward", ROOT / "rewards" / "gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gsm8k = _load()


def grade(responses, reference="#### 18", mode=None, monkeypatch=None):
    if mode is not None:
        monkeypatch.setenv("GSM8K_REWARD_MODE", mode)
    event = [make_trajectory("q", i, PROMPT, r, reference) for i, r in enumerate(responses)]
    return gsm8k.lambda_handler(event, None)


def test_standard_library_only():
    imports = re.findall(r"^\s*(?:import|from)\s+([\w.]+)", (ROOT / "rewards" / "gsm8k.py").read_text(), re.M)
    assert set(imports) <= {"os", "re"}


def test_answer_shape_and_metrics(monkeypatch):
    monkeypatch.delenv("GSM8K_REWARD_MODE", raising=False)
    out = grade(["so 6*3 = 18\n#### 18", "#### 17", "18"])
    assert [o["id"] for o in out] == ["q#0", "q#1", "q#2"]
    assert [o["aggregate_reward_score"] for o in out] == [1.0, 0.0, 0.0]  # strict is the default
    assert out[0]["metrics_list"] == [{"name": "accuracy", "value": 1.0, "type": "Reward"},
                                      {"name": "format_ok", "value": 1.0, "type": "Metric"}]
    assert [o["metrics_list"][1]["value"] for o in out] == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("mode,response,expected", [
    ("strict", "#### 1,234", 1.0),                      # commas stripped
    ("strict", "#### 12 then later #### 1234", 1.0),    # the LAST #### wins
    ("strict", "#### 1234 then later #### 12", 0.0),
    ("strict", "####1234", 0.0),                        # the space after #### is required
    ("strict", "#### 1234" + "x" * 300, 0.0),           # outside the last 300 characters
    ("strict", "x" * 1000 + "#### 1234", 1.0),
    ("strict", "#### 1234.", 0.0),                      # '1234.' != '1234' (verl compares strings)
    ("flexible", "the answer is 1234 apples", 1.0),
    ("flexible", "1234 then 5", 0.0),                   # the last number
    ("flexible", "it is 1,234.", 0.0),                  # last match is '1,234.' -> '1234.'
    ("flexible", "A: 1,234", 1.0),                      # commas stripped (verl keeps them: see docstring)
    ("flexible", "1234 and then . ", 1.0),              # a bare '.' is skipped
    ("flexible", "no number here", 0.0),
])
def test_extraction_semantics(monkeypatch, mode, response, expected):
    out = grade([response], reference="#### 1,234", mode=mode, monkeypatch=monkeypatch)
    assert out[0]["aggregate_reward_score"] == expected


def test_negative_numbers_and_dollar(monkeypatch):
    assert grade(["#### -5"], "#### -5", "strict", monkeypatch)[0]["aggregate_reward_score"] == 1.0
    # verl's pattern wants a digit right after "#### ", so "#### $5" is no strict answer (format_ok 0)
    out = grade(["#### $5"], "#### 5", "strict", monkeypatch)[0]
    assert out["aggregate_reward_score"] == 0.0 and out["metrics_list"][1]["value"] == 0.0
    assert grade(["#### $5"], "#### 5", "flexible", monkeypatch)[0]["aggregate_reward_score"] == 1.0
    assert grade(["5"], {"answer": "$5"}, "flexible", monkeypatch)[0]["aggregate_reward_score"] == 1.0


def test_both_reference_placements(monkeypatch):
    monkeypatch.setenv("GSM8K_REWARD_MODE", "strict")
    base = make_trajectory("q", 0, PROMPT, "#### 72", {"answer": "72"})
    assert gsm8k.lambda_handler([base], None)[0]["aggregate_reward_score"] == 1.0
    only_meta = dict(base, metadata={"reference_answer": "#### 72"})
    del only_meta["reference_answer"]
    top_string = dict(base, reference_answer="#### 72", metadata={})
    top_text = dict(base, reference_answer={"text": "Work...\n#### 72"}, metadata={})
    wrapped = {"trajectories": [only_meta, top_string, top_text]}
    assert [o["aggregate_reward_score"] for o in gsm8k.lambda_handler(wrapped, None)] == [1.0, 1.0, 1.0]


def test_odd_inputs(monkeypatch):
    monkeypatch.setenv("GSM8K_REWARD_MODE", "strict")
    no_assistant = {"id": "a", "messages": [{"role": "user", "content": "hi"}], "reference_answer": {"text": "#### 1"}}
    parts = make_trajectory("b", 0, PROMPT, "", "#### 3")
    parts["messages"][-1]["content"] = [{"type": "text", "text": "so "}, {"type": "text", "text": "#### 3"}]
    out = gsm8k.lambda_handler([no_assistant, parts], None)
    assert out[0]["aggregate_reward_score"] == 0.0 and out[0]["metrics_list"][1]["value"] == 0.0
    assert out[1]["aggregate_reward_score"] == 1.0
    with pytest.raises(ValueError, match="'c#0': reference_answer has no '#### <number>'"):
        gsm8k.lambda_handler([make_trajectory("c", 0, PROMPT, "#### 3", "three")], None)
    monkeypatch.setenv("GSM8K_REWARD_MODE", "fuzzy")
    with pytest.raises(ValueError, match="GSM8K_REWARD_MODE"):
        gsm8k.lambda_handler([parts], None)


def _labelled():
    if not (DATA / "example_model_solutions.jsonl").is_file():
        pytest.skip(f"{DATA} not present")
    solutions = [json.loads(line) for line in (DATA / "example_model_solutions.jsonl").read_text().splitlines()]
    tests = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()]
    assert len(solutions) == len(tests) == 1319
    rows = []
    for n, (sol, test) in enumerate(zip(solutions, tests)):
        assert sol["question"] == test["question"]
        reference = "#### " + re.findall(r"#### (.*)", test["answer"])[-1].strip()
        for key in KEYS:
            rows.append((f"t{n}-{key}", sol[key]["solution"], reference, sol[key]["is_correct"]))
    return rows


def test_agrees_with_is_correct_on_all_5276_solutions(monkeypatch):
    rows = _labelled()
    assert len(rows) == 5276
    assert sum(bool(re.search(r"\nA: [^\n]*\s*$", sol)) for _, sol, _, _ in rows) >= 5265

    def scores(mode, transform):
        event = [make_trajectory(rid, 0, PROMPT, transform(sol), ref) for rid, sol, ref, _ in rows]
        monkeypatch.setenv("GSM8K_REWARD_MODE", mode)
        return [o["aggregate_reward_score"] for o in gsm8k.lambda_handler(event, None)]

    labels = [float(ok) for *_, ok in rows]
    assert 0 < sum(labels) < len(labels)
    flexible = scores("flexible", lambda s: s)
    assert [r[0] for r, s, y in zip(rows, flexible, labels) if s != y] == []
    # strict mode needs the model's format: write the final "A: <n>" as "#### <n>"
    strict = scores("strict", lambda s: re.sub(r"A: ([^\n]*)\s*$", r"#### \1", s))
    assert [r[0] for r, s, y in zip(rows, strict, labels) if s != y] == []
    # unchanged, the solutions have no "####": strict mode gives every one 0 (format_ok 0)
    assert set(scores("strict", lambda s: s)) == {0.0}


def test_verl_flexible_comma_difference_is_exactly_two():
    """verl/AWS flexible mode keeps commas; on this data that differs from the labels in 2 cases."""
    rows = _labelled()
    verl_flexible = []
    for rid, sol, ref, ok in rows:
        found = [a for a in re.findall(r"(\-?[0-9\.\,]+)", sol[-300:]) if a not in ("", ".")]
        truth = re.findall(r"#### (\-?[0-9\.\,]+)", ref)[-1].replace(",", "")
        if (bool(found) and found[-1] == truth) != ok:
            verl_flexible.append((rid, found[-1]))
    assert verl_flexible == [("t419-175b_finetuning", "3,000"), ("t819-175b_finetuning", "6,250")]


def test_through_the_runner_in_worker_processes():
    """The same 5,276 solutions through RewardRunner (workers, env from the runner, answer checks)."""
    from grpo.reward.runner import RewardRunner

    rows = _labelled()
    event = [make_trajectory(rid, 0, PROMPT, sol, ref) for rid, sol, ref, _ in rows]
    with RewardRunner(str(ROOT / "rewards" / "gsm8k.py"), max_concurrency=2,
                      env={"GSM8K_REWARD_MODE": "flexible"}) as runner:
        result = runner.score(event)
    assert result.failures == [] and result.n_calls == -(-5276 // 64)
    assert [s == 1.0 for s in result.scores] == [bool(ok) for *_, ok in rows]
    assert result.metric_types == {"accuracy": "Reward", "format_ok": "Metric"}
    assert result.summary()["reward_format_ok_mean"] == 0.0  # "A: <n>", never "####"
