"""`grpo compare` (the parity check) on synthetic run directories written to disk, through the real CLI."""

import contextlib
import io
import json
import math
import random
import subprocess

import pytest
from helpers_engine import run_grpo

from grpo.errors import UserError
from grpo.remote.parity import DEFAULT_TOLERANCES, Tolerance, align, compare_runs, metric_stats, parse_tolerances
from grpo.remote.runs import health_alarms, load_run, run_thresholds


def make_rows(steps: int, *, total: int | None = None, seed: int = 0, reward_shift: float = 0.0,
              grad_scale: float = 1.0, val_every: int = 5) -> list[dict]:
    """A plausible GRPO curve: reward 0.5 -> 0.85, length falling, entropy drifting, small noise."""
    total = total or steps
    rng = random.Random(seed)
    rows = []
    for s in range(1, steps + 1):
        f = s / total
        row = {"step": s, "total_steps": total,
               "critic_rewards_mean": 0.5 + 0.35 * f + rng.gauss(0, 0.01) + reward_shift,
               "actor_pg_loss": rng.gauss(0, 0.005), "actor_entropy": 0.9 - 0.2 * f + rng.gauss(0, 0.005),
               "actor_grad_norm": grad_scale * (0.02 + 0.01 * f) * (1 + rng.gauss(0, 0.03)),
               "critic_advantages_mean": rng.gauss(0, 0.005), "response_length_mean": 600 - 200 * f + rng.gauss(0, 5),
               "timing_s_step": rng.random()}
        if s % val_every == 0 or s == total:
            row["val_score_rewards_mean"] = 0.55 + 0.3 * f + reward_shift
        rows.append(row)
    return rows


def write_run(path, rows, summary: dict | None = None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def cli(*args):
    """`grpo ARGS` in this process (the real CLI entry point; a subprocess would re-import torch)."""
    from grpo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*map(str, args)])
    return subprocess.CompletedProcess(["grpo", *args], code, out.getvalue(), err.getvalue())


def compare(*args):
    return cli("compare", *args)


def test_exit_codes_through_a_real_process(tmp_path):
    rows = make_rows(20)
    a, b = write_run(tmp_path / "a", rows), write_run(tmp_path / "b", make_rows(20, reward_shift=0.3))
    assert run_grpo("compare", a, a).returncode == 0
    assert run_grpo("compare", a, b).returncode == 1
    res = run_grpo("compare", a, tmp_path / "missing")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_identical_runs_are_within_tolerance(tmp_path):
    rows = make_rows(40)
    a, b = write_run(tmp_path / "a", rows), write_run(tmp_path / "b", rows)
    res = compare(a, b, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    assert rep["verdict"] == "within" and rep["alignment"] == "step" and rep["failing"] == []
    assert set(rep["metrics"]) == {*DEFAULT_TOLERANCES}  # the six plus the validation reward (both have it)
    for m, r in rep["metrics"].items():
        assert r["level_gap"] == 0 and r["max_gap"] == 0 and r["points"] == (8 if m.startswith("val") else 40)
    assert rep["metrics"]["critic_rewards_mean"]["corr"] == pytest.approx(1.0)


def test_shifted_reward_fails_and_names_the_metric(tmp_path):
    a = write_run(tmp_path / "a", make_rows(40, seed=1))
    b = write_run(tmp_path / "b", make_rows(40, seed=2, reward_shift=0.3))
    res = compare(a, b)
    assert res.returncode == 1, res.stdout + res.stderr
    verdict = res.stdout.strip().splitlines()[-1]
    assert verdict.startswith("verdict: OUTSIDE tolerance") and "critic_rewards_mean" in verdict
    assert "val_score_rewards_mean" in verdict  # shifted too
    table = {line.split()[0]: line.split()[-1] for line in res.stdout.splitlines() if line.startswith(("critic_", "actor_"))}
    assert table["critic_rewards_mean"] == "OUTSIDE" and table["actor_entropy"] == "ok"
    # a looser tolerance on the command line lets it pass
    ok = compare(a, b, "--tolerance", "critic_rewards_mean=0.35", "--tolerance", "val_score_rewards_mean=abs:0.35")
    assert ok.returncode == 0, ok.stdout


def test_different_seeds_same_curve_pass_and_scale_is_relative(tmp_path):
    a = write_run(tmp_path / "a", make_rows(40, seed=1))
    b = write_run(tmp_path / "b", make_rows(40, seed=2))
    assert compare(a, b).returncode == 0
    # grad norm 3x larger (another model size): a relative gap of ~67%, outside the default
    c = write_run(tmp_path / "c", make_rows(40, seed=2, grad_scale=3.0))
    res = compare(a, c, "--json")
    rep = json.loads(res.stdout)
    assert res.returncode == 1 and rep["failing"] == ["actor_grad_norm"]
    assert rep["metrics"]["actor_grad_norm"]["kind"] == "rel"
    assert rep["metrics"]["actor_grad_norm"]["level_gap"] == pytest.approx(2 / 3, abs=0.03)


def test_different_step_counts_align_by_fraction(tmp_path):
    a = write_run(tmp_path / "a", make_rows(60, seed=1))
    b = write_run(tmp_path / "b", make_rows(20, seed=2, val_every=4))
    res = compare(a, b, "--json")
    rep = json.loads(res.stdout)
    assert res.returncode == 0, res.stdout
    assert rep["alignment"] == "fraction" and "fraction of training" in rep["overlap"]
    r = rep["metrics"]["critic_rewards_mean"]
    assert r["x_first"] == pytest.approx(1 / 20) and r["x_last"] == pytest.approx(1.0)
    assert r["points"] == 20 - 0  # the shorter run's points within the overlap
    assert r["corr"] > 0.9  # the same rise, sampled at different steps


def test_early_stopped_run_is_compared_over_the_overlap(tmp_path):
    full = make_rows(50, seed=1)
    a = write_run(tmp_path / "a", full)
    # B stopped at step 30 of 50 (early stopping): same planned total, so aligned by step over 1-30
    b = write_run(tmp_path / "b", make_rows(30, total=50, seed=2), summary={"status": "succeeded", "stopped_early": True})
    res = compare(a, b, "--json")
    rep = json.loads(res.stdout)
    assert res.returncode == 0, res.stdout
    assert rep["alignment"] == "step" and rep["run_b"]["stopped_early"] and not rep["run_a"]["stopped_early"]
    assert "b stopped at step 30/50" in rep["overlap"]
    r = rep["metrics"]["critic_rewards_mean"]
    assert r["points"] == 30 and r["x_last"] == 30
    # over the overlap the end levels agree; over the full run A would end ~0.14 higher
    assert r["end_a"] == pytest.approx(r["end_b"], abs=0.03)
    assert full[-1]["critic_rewards_mean"] - r["end_a"] > 0.1


def test_png_and_json(tmp_path):
    a = write_run(tmp_path / "a", make_rows(30, seed=1))
    b = write_run(tmp_path / "b", make_rows(30, seed=2, reward_shift=0.2))
    png = tmp_path / "out" / "parity.png"
    res = compare(a, b, "--out", png, "--json")
    assert res.returncode == 1
    rep = json.loads(res.stdout)
    assert rep["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert set(rep["alarms"]) == {"run_a", "run_b"}
    text = compare(a, b, "--out", tmp_path / "p2.png")
    assert f"plot: {tmp_path / 'p2.png'}" in text.stdout and (tmp_path / "p2.png").is_file()


def test_chosen_metrics_and_user_errors(tmp_path):
    a = write_run(tmp_path / "a", make_rows(20, seed=1))
    b = write_run(tmp_path / "b", make_rows(20, seed=2))
    res = compare(a, b, "--metrics", "critic_rewards_mean", "actor_entropy", "--json")
    assert res.returncode == 0 and list(json.loads(res.stdout)["metrics"]) == ["critic_rewards_mean", "actor_entropy"]
    missing = compare(a, tmp_path / "nope")
    assert missing.returncode == 2 and "nope: no such run directory" in missing.stderr and "Traceback" not in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no metrics.jsonl" in compare(a, empty).stderr
    bad = compare(a, b, "--tolerance", "critic_rewards_mean")
    assert bad.returncode == 2 and "expected METRIC=VALUE" in bad.stderr
    nodefault = compare(a, b, "--metrics", "timing_s_step")
    assert nodefault.returncode == 2 and "--tolerance timing_s_step=VALUE" in nodefault.stderr
    absent = compare(a, b, "--metrics", "actor_ppo_kl")
    assert absent.returncode == 2 and "no values of 'actor_ppo_kl'" in absent.stderr


def test_stats_and_tolerance_parsing_by_hand():
    import numpy as np

    ya = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    yb = ya + 0.1
    s = metric_stats(ya, yb, "abs")
    # 11 points: start/end are 2-point means (ceil 10%), every gap is the 0.1 shift
    assert s["start_a"] == pytest.approx(0.1) and s["end_b"] == pytest.approx(1.1)
    assert s["level_gap"] == pytest.approx(0.1) and s["max_gap"] == pytest.approx(0.1) and s["corr"] == pytest.approx(1.0)
    r = metric_stats(np.full(5, 2.0), np.full(5, 3.0), "rel")
    assert r["level_gap"] == pytest.approx(1 / 3) and r["corr"] is None  # flat curves: no correlation
    assert parse_tolerances(["actor_grad_norm=0.3", "critic_rewards_mean=rel:0.1", "x=25%"]) == {
        "actor_grad_norm": Tolerance(0.3, "rel"), "critic_rewards_mean": Tolerance(0.1, "rel"), "x": Tolerance(0.25, "rel")}
    with pytest.raises(UserError):
        parse_tolerances(["a=-1"])
    with pytest.raises(UserError):
        parse_tolerances(["a=nan"])


def test_repeated_step_last_wins_and_disjoint_runs(tmp_path):
    rows = make_rows(10)
    again = dict(rows[4], critic_rewards_mean=0.99)
    a = load_run(write_run(tmp_path / "a", rows + [again]))
    assert [r["step"] for r in a.rows] == list(range(1, 11)) and a.rows[4]["critic_rewards_mean"] == 0.99
    late = [dict(r, step=r["step"] + 20, total_steps=40) for r in make_rows(10)]
    early = [dict(r, total_steps=40) for r in make_rows(10)]
    x = align(load_run(write_run(tmp_path / "late", late)), load_run(write_run(tmp_path / "early", early)),
              "critic_rewards_mean")[1]
    assert len(x) == 0
    rep = compare_runs(load_run(tmp_path / "late"), load_run(tmp_path / "early"))
    assert rep["verdict"] == "outside" and rep["metrics"]["critic_rewards_mean"]["verdict"] == "no overlap"
    assert not math.isnan(rep["metrics"]["critic_rewards_mean"]["tolerance"])


def test_plot_and_compare_name_a_corrupt_summary_or_config(tmp_path):
    """`grpo plot` reads a run as `grpo compare` does: a bad summary.json or config.json is `error:` naming
    the file (and the field), exit 2, never a traceback."""
    good = write_run(tmp_path / "good", make_rows(12))
    cases = {
        "summary.json": [("{\"status\": ", "summary.json:1: invalid JSON"),
                         ("[1, 2]", "summary.json: expected a JSON object, got list"),
                         (b"\xff\xfe", "summary.json: cannot read it")],
        "config.json": [("{\n  \"engine\": {", "config.json:2: invalid JSON"),
                        ('{"engine": {"health": {"window": 0}}}', "config.json: engine.health.window: must be >= 1"),
                        ('{"engine": {"health": {"windw": 3}}}', "config.json: engine.health: unknown field(s) windw"),
                        ('{"engine": {"health": {"stop_on": ["nope"]}}}', "unknown alarm 'nope'"),
                        ('{"engine": {"health": {"window": "ten"}}}', "config.json: engine.health:"),
                        ('{"engine": {"health": 3}}', "engine.health: expected an object, got int"),
                        ("[]", "config.json: expected a JSON object")],
    }
    n = 0
    for name, contents in cases.items():
        for text, expected in contents:
            run = write_run(tmp_path / f"bad{n}", make_rows(12))
            n += 1
            (run / name).write_bytes(text if isinstance(text, bytes) else text.encode())
            for res in (cli("plot", run), compare(good, run)):
                assert res.returncode == 2, (res.args, res.stdout, res.stderr)
                assert res.stderr.startswith(f"error: {run / name}") and expected in res.stderr, res.stderr
                assert "Traceback" not in res.stderr
            assert not (run / "metrics.png").exists()


def test_run_thresholds_are_the_configured_ones_and_plot_marks_their_alarms(tmp_path):
    rows = make_rows(30)
    for r in rows[20:]:
        r["actor_grad_norm"] = 50.0  # a spike the default thresholds flag
    plain = write_run(tmp_path / "plain", rows, summary={"baseline_val_score_rewards_mean": 0.5})
    tuned = write_run(tmp_path / "tuned", rows, summary={"baseline_val_score_rewards_mean": 0.5})
    (tuned / "config.json").write_text(json.dumps({"engine": {"health": {"window": 7, "disable": ["grad_norm_spike"]}}}))
    assert run_thresholds(plain).window == 10 and run_thresholds(tuned).window == 7
    assert "grad_norm_spike" in [a.name for a in health_alarms(load_run(plain))]
    assert "grad_norm_spike" not in [a.name for a in health_alarms(load_run(tuned))]
    res = run_grpo("plot", tuned)  # the real command, in its own process
    assert res.returncode == 0 and res.stdout.strip() == str(tuned / "metrics.png"), res.stderr
    assert (tuned / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

