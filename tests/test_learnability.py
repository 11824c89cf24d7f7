"""Learnability statistics (grpo.training.learnability) against hand-computed values, and the engine's own
GRPO advantages as the definition of "carries an advantage"."""

import pytest
import torch

from grpo.algorithms.core import group_normalized_advantages
from grpo.training.learnability import group_by_record, group_stats, histogram, learnability, parse_range

GROUPS = {  # record id -> 4 samples' scores (None: grading failed)
    "a": [1.0, 0.0, 0.0, 1.0],      # spread: pass 2/4, every sample carries an advantage
    "b": [0.0, 0.0, 0.0, 0.0],      # tie at 0: too hard
    "c": [1.0, 1.0, 1.0, 1.0],      # tie, all pass: solved
    "d": [0.5, 0.5, 0.5, 0.5],      # tie at a partial credit: other
    "e": [1.0, None, 0.0, 0.5],     # 3 graded, mean 0.5: the 0.5 sample has advantage 0
    "x#y": [None, None, None, None],  # nothing graded ('#' inside a record id is fine)
}


def _flat():
    ids, scores = [], []
    for rid, ss in GROUPS.items():
        ids += [f"{rid}#{k}" for k in range(len(ss))]
        scores += ss
    return ids, scores


def test_group_stats_by_hand():
    assert group_stats("a", GROUPS["a"]).as_dict() == {
        "id": "a", "samples": 4, "graded": 4, "passed": 2, "pass_rate": 0.5, "mean": 0.5, "tie": None,
        "with_advantage": 4}
    assert group_stats("b", GROUPS["b"]).tie == "too_hard" and group_stats("b", GROUPS["b"]).with_advantage == 0
    assert group_stats("c", GROUPS["c"]).tie == "solved" and group_stats("c", GROUPS["c"]).pass_rate == 1.0
    assert group_stats("d", GROUPS["d"]).tie == "other" and group_stats("d", GROUPS["d"]).pass_rate == 0.0
    e = group_stats("e", GROUPS["e"])
    assert (e.samples, e.graded, e.passed, e.with_advantage, e.tie) == (4, 3, 1, 2, None)
    assert e.pass_rate == pytest.approx(1 / 3) and e.mean == pytest.approx(0.5)
    # a lower pass score: 0.5 passes too
    assert group_stats("e", GROUPS["e"], pass_score=0.5).passed == 2
    assert group_stats("d", GROUPS["d"], pass_score=0.5).tie == "solved"
    nothing = group_stats("x", [None, None])
    assert (nothing.graded, nothing.pass_rate, nothing.tie, nothing.with_advantage) == (0, None, None, 0)


def test_carrying_an_advantage_is_a_nonzero_grpo_advantage():
    for rid, ss in GROUPS.items():
        graded = [s for s in ss if s is not None]
        if len(graded) < 2:
            continue
        adv = group_normalized_advantages(torch.tensor(graded, dtype=torch.float64), [0] * len(graded))
        assert int((adv.abs() > 1e-9).sum()) == group_stats(rid, ss).with_advantage, rid


def test_report_by_hand():
    ids, scores = _flat()
    rep = learnability(ids, scores, group_size=4)
    assert rep["prompts"] == 6 and rep["judged_prompts"] == 5 and rep["prompts_without_grades"] == 1
    assert rep["frac_zero_std"] == pytest.approx(3 / 5)
    assert (rep["frac_too_hard"], rep["frac_solved"], rep["frac_other_ties"]) == pytest.approx((0.2, 0.2, 0.2))
    # (4/4 + 0 + 0 + 0 + 2/3) / 5
    assert rep["frac_samples_with_advantage"] == pytest.approx((1 + 2 / 3) / 5)
    # (0.5 + 0 + 1 + 0 + 1/3) / 5
    assert rep["pass_rate_mean"] == pytest.approx((0.5 + 1 + 1 / 3) / 5)
    # pass rates 0.5, 0, 1, 0, 1/3 -> nearest k/4: 2, 0, 4, 0, 1
    assert [b["prompts"] for b in rep["histogram"]] == [2, 1, 1, 0, 1]
    assert [p["id"] for p in rep["per_prompt"]] == list(GROUPS)


def test_grouping_and_histogram_edges():
    assert group_by_record(["r#1#0", "r#1#1", "s#0"], [1, 0, None]) == {"r#1": [1, 0], "s": [None]}
    with pytest.raises(ValueError):
        group_by_record(["a#0"], [])
    assert [b["prompts"] for b in histogram([0.0, 1.0, 1.0, 0.5], 2)] == [1, 1, 2]
    empty = learnability([], [], group_size=8)
    assert empty["judged_prompts"] == 0 and empty["frac_zero_std"] is None and empty["pass_rate_mean"] is None


def test_parse_range():
    assert parse_range("0.1:0.9") == (0.1, 0.9)
    assert parse_range(":0.5") == (0.0, 0.5) and parse_range("0.25:") == (0.25, 1.0)
    for bad in ("0.5", "a:b", "0.9:0.1", "-0.1:0.5", "0:1.5"):
        with pytest.raises(ValueError):
            parse_range(bad)


# ------------------------------------------------------------------------------ the CLI, end to end
def test_eval_reports_learnability_and_filter_keeps_the_range(tmp_path):
    """`grpo eval --samples 4` on a tiny random model graded by a real handler whose score depends on the text,
    then `grpo data filter` on its --out: the kept records are those whose recomputed pass rate is in range."""
    import json

    from helpers_engine import build_model_dir, read_jsonl, run_grpo, write_data, write_varied_handler

    from grpo.data import validate_file
    from grpo.training.learnability import group_by_record, group_stats

    model = build_model_dir(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=12, n_val=2)
    handler = write_varied_handler(tmp_path / "varied.py")  # 0.4 x (len % 3) + 0.2 if a digit: 0 .. 1.0
    out = tmp_path / "eval.jsonl"
    res = run_grpo("eval", "--model", model, "--data", train, "--handler", handler, "--samples", "4",
                   "--max-tokens", "6", "--temperature", "1.0", "--pass-score", "0.6", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    learn = json.loads(res.stdout)["learnability"]
    rows = read_jsonl(out)
    assert len(rows) == 48 and {r["data"] for r in rows} == {str(train.resolve())}
    groups = {rid: group_stats(rid, s, 0.6) for rid, s in group_by_record([r["id"] for r in rows],
                                                                           [r["score"] for r in rows]).items()}
    assert learn["group_size"] == 4 and learn["prompts"] == learn["judged_prompts"] == 12
    assert learn["frac_zero_std"] == pytest.approx(sum(g.tie is not None for g in groups.values()) / 12)
    assert [p["pass_rate"] for p in learn["per_prompt"]] == [g.pass_rate for g in groups.values()]
    assert sum(b["prompts"] for b in learn["histogram"]) == 12
    text = run_grpo("eval", "--model", model, "--data", train, "--handler", handler, "--samples", "4",
                    "--max-tokens", "6", "--temperature", "1.0", "--limit", "3")
    assert text.returncode == 0 and "learnability: 4 samples per prompt" in text.stdout
    assert "samples carrying an advantage" in text.stdout and "pass rate histogram" in text.stdout

    filtered = tmp_path / "filtered.jsonl"
    res = run_grpo("data", "filter", "--scores", out, "--pass-rate", "0.25:0.75", "--pass-score", "0.6",
                   "--out", filtered, "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    want = [rid for rid, g in groups.items() if 0.25 <= g.pass_rate <= 0.75]
    assert [r.id for r in validate_file(filtered, allow_small=True).records] == want
    assert rep["kept"] == len(want) and rep["valid"] and not rep["bedrock_minimum"]
    assert rep["dropped"]["below"] == sum(g.pass_rate < 0.25 for g in groups.values())
    assert rep["dropped"]["above"] == sum(g.pass_rate > 0.75 for g in groups.values())
    # records as they were: byte-identical JSON objects to the source lines
    source = {r["id"]: r for r in read_jsonl(train)}
    assert all(source[r["id"]] == r for r in read_jsonl(filtered))


def test_filter_errors_name_the_file_line_and_field(tmp_path):
    from helpers_engine import run_grpo, write_data

    train, _ = write_data(tmp_path / "data", n_train=3, n_val=1)
    scores = tmp_path / "s.jsonl"
    scores.write_text('{"id": "nope", "score": 1}\n{"id": "x#0", "score": "high"}\n[1]\n')
    res = run_grpo("data", "filter", "--scores", scores, "--pass-rate", "0.1:0.9", "--out", tmp_path / "o.jsonl")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{scores}:1: id: expected a trajectory id" in res.stderr and f"{scores}:2: score: expected a number" in res.stderr
    assert f"{scores}:3: row: expected a JSON object" in res.stderr
    scores.write_text('{"id": "other#0", "score": 1}\n')
    res = run_grpo("data", "filter", "--scores", scores, "--pass-rate", "0.1:0.9", "--out", tmp_path / "o.jsonl")
    assert res.returncode == 2 and "do not say which data file" in res.stderr
    res = run_grpo("data", "filter", "--scores", scores, "--data", train, "--pass-rate", "0.1:0.9", "--out", train)
    assert res.returncode == 2 and "is the data file itself" in res.stderr
    res = run_grpo("data", "filter", "--scores", scores, "--data", train, "--pass-rate", "0.1:0.9",
                   "--out", tmp_path / "o.jsonl")
    assert res.returncode == 2 and "1 scored record ids are not in" in res.stderr and "'other'" in res.stderr
    res = run_grpo("data", "filter", "--scores", scores, "--data", train, "--pass-rate", "0.9", "--out", tmp_path / "o")
    assert res.returncode == 2 and "--pass-rate: expected LOW:HIGH" in res.stderr
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o").exists()


def test_eval_through_grpo_serve_reports_learnability(tmp_path):
    """The same report through --base-url: `grpo serve` on loopback serving a tiny model, sampled with n=4."""
    import json

    from helpers_engine import build_model_dir, read_jsonl, run_grpo, write_data, write_varied_handler
    from server_helpers import start_server

    from grpo.training.learnability import learnability

    model = build_model_dir(tmp_path / "model", seed=1)
    train, _ = write_data(tmp_path / "data", n_train=6, n_val=2)
    handler = write_varied_handler(tmp_path / "varied.py")
    (tmp_path / "handlers").mkdir()
    out = tmp_path / "eval.jsonl"
    with start_server(tmp_path / "state", tmp_path / "handlers", "k-learn", ["--model", f"tiny={model}"]) as (url, key, _):
        res = run_grpo("eval", "--base-url", url, "--api-key", key, "--model", "tiny", "--data", train,
                       "--handler", handler, "--samples", "4", "--max-tokens", "6", "--temperature", "1.0",
                       "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    rows = read_jsonl(out)
    assert got["samples"] == 24 and got["base_url"] == url and len(rows) == 24
    assert got["learnability"] == learnability([r["id"] for r in rows], [r["score"] for r in rows], group_size=4)
    assert got["learnability"]["judged_prompts"] == 6
