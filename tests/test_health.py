"""grpo.training.health on made-up metric streams: each failure raises its alarm once, healthy runs raise none.

The detectors are pure functions of metrics.jsonl rows, so synthetic curves test them exactly. Healthy
streams imitate a GRPO run that works (spec section 6): reward rising noisily from about 0.4 towards 0.9,
entropy slowly falling from about 1.0 to 0.5, grad norm noisy around a level, length stable with noise,
with blips that must not count (a 1.5x and a 2.5x grad-norm step, a 1.4x length step, one clipped step).
"""

import json
import math
import random

import pytest

from grpo import health_thresholds as health
from grpo.health_thresholds import ALARM_NAMES, HealthThresholds
from grpo.training.health import HealthMonitor, scan


def clamp(x, lo=0.0, hi=1.0):
    return min(hi, max(lo, x))


def healthy(seed, steps=100, r0=0.4, r1=0.9, tau=25.0, noise=0.05, eval_every=10):
    """One healthy run's rows; the generator's level p also drives the share of all-equal groups."""
    rng = random.Random(seed)
    blip = {steps // 3: 1.5, steps // 2: 2.5}
    long_step = 2 * steps // 3
    rows = []
    for t in range(1, steps + 1):
        p = r0 + (r1 - r0) * (1 - math.exp(-t / tau))
        row = {
            "step": t, "total_steps": steps,
            "critic_rewards_mean": clamp(p + rng.gauss(0, noise)), "critic_rewards_max": 1.0, "critic_rewards_min": 0.0,
            # groups of 8: P(all equal) = p^8 + (1-p)^8, plus prompts that are always solved or never
            "critic_frac_reward_zero_std": clamp(p ** 8 + (1 - p) ** 8 + 0.15 + rng.gauss(0, 0.03)),
            "actor_entropy": (1.0 - 0.5 * t / steps) * (1 + rng.gauss(0, 0.03)),
            "actor_grad_norm": 0.5 * math.exp(rng.gauss(0, 0.2)) * blip.get(t, 1.0),
            "response_length_mean": (100 - 20 * t / steps) * (1 + rng.gauss(0, 0.05)) * (1.4 if t == long_step else 1),
            "response_length_clip_ratio": 0.3 if t == steps // 4 else clamp(0.02 + rng.gauss(0, 0.01)),
            "actor_pg_loss": rng.gauss(0, 0.05), "critic_advantages_mean": rng.gauss(0, 0.01),
        }
        if t % eval_every == 0:
            row["val_score_rewards_mean"] = clamp(p - 0.03 + rng.gauss(0, 0.02))
        rows.append(row)
    return rows


HEALTHY = [dict(seed=1), dict(seed=2, steps=60, r0=0.5, r1=0.98, tau=15.0),
           dict(seed=3, steps=200, r0=0.3, r1=0.8, tau=60.0, noise=0.08)]


def with_curve(rows, key, fn):
    """The rows with `key` replaced by fn(step, old value) (a key set to None is dropped)."""
    out = []
    for r in rows:
        r = dict(r)
        v = fn(r["step"], r.get(key))
        if v is None:
            r.pop(key, None)
        else:
            r[key] = v
        out.append(r)
    return out


def fired(rows, **kw):
    alarms = scan(rows, **kw)
    return {a.name: a.step for a in alarms}, alarms


# ------------------------------------------------------------------ healthy runs
@pytest.mark.parametrize("cfg", HEALTHY)
def test_healthy_streams_raise_no_alarm(cfg):
    rows = healthy(**cfg)
    mon = HealthMonitor(baseline_val=0.4)
    for r in rows:
        assert mon.update(r) == [], (r["step"], mon.alarms[-1].message)
    assert mon.summary()["ok"] is True and mon.summary()["alarms"] == [] and not mon.should_stop


def test_successful_run_ends_with_most_groups_all_correct_without_alarm():
    rows = healthy(**HEALTHY[1])
    tail = rows[-10:]
    assert min(r["critic_frac_reward_zero_std"] for r in tail) >= 0.8  # the stream really saturates
    assert sum(r["critic_rewards_mean"] for r in tail) / 10 >= 0.9
    assert scan(rows) == []


# ------------------------------------------------------------------ one failure each
def test_reward_stuck_fires_after_warmup():
    rng = random.Random(5)
    rows = with_curve(healthy(1), "critic_rewards_mean", lambda t, v: clamp(0.05 + rng.gauss(0, 0.03)))
    names, alarms = fired(rows)
    assert names == {"reward_stuck": 10}  # warm-up max(10, 10% of 100)
    assert "0.15" in alarms[0].message and "SFT" in alarms[0].message


def test_reward_stuck_warmup_scales_with_total_steps():
    rng = random.Random(5)
    rows = with_curve(healthy(3, steps=200), "critic_rewards_mean", lambda t, v: clamp(0.05 + rng.gauss(0, 0.03)))
    assert fired(rows)[0] == {"reward_stuck": 20}


def test_reward_flat_fires_at_flat_start_only_once():
    rng = random.Random(6)
    rows = with_curve(healthy(1), "critic_rewards_mean", lambda t, v: 0.5 + rng.gauss(0, 0.02))
    names, alarms = fired(rows)
    assert names == {"reward_flat": 30}  # judged after 30% of the run
    assert alarms[0].data["best"] - alarms[0].data["start"] < 0.05


def test_broken_constant_grader_collapses_variance_early():
    # a grader that returns 0.5 for everything: no group has any spread, advantages and gradient are 0,
    # so the policy does not move either (entropy flat)
    rows = healthy(1)
    for r in rows:
        r.update(critic_rewards_mean=0.5, critic_rewards_max=0.5, critic_rewards_min=0.5,
                 critic_frac_reward_zero_std=1.0, actor_entropy=1.0)
    names, alarms = fired(rows)
    assert names == {"reward_variance_collapse": 3, "reward_flat": 30, "entropy_high_flat": 30}
    assert "constant" in alarms[0].message


@pytest.mark.parametrize("const,expected", [
    (0.0, {"reward_variance_collapse": 3, "reward_stuck": 10}),
    (1.0, {"reward_variance_collapse": 3}),
])
def test_constant_grader_at_the_extremes(const, expected):
    rows = with_curve(healthy(2), "critic_frac_reward_zero_std", lambda t, v: 1.0)
    for r in rows:
        r.update(critic_rewards_mean=const, critic_rewards_max=const, critic_rewards_min=const)
    assert fired(rows)[0] == expected


def test_variance_collapse_without_the_key_uses_batch_min_max():
    rows = with_curve(healthy(1), "critic_frac_reward_zero_std", lambda t, v: None)
    for r in rows:
        r.update(critic_rewards_mean=0.5, critic_rewards_max=0.5, critic_rewards_min=0.5)
    assert fired(rows)[0]["reward_variance_collapse"] == 3


def test_variance_collapse_with_mid_reward_and_spread_batch():
    # half the prompts always right, half always wrong: mean 0.5, every group constant
    rows = with_curve(healthy(1), "critic_frac_reward_zero_std", lambda t, v: 0.95 if t >= 40 else v)
    rows = with_curve(rows, "critic_rewards_mean", lambda t, v: 0.5 if t >= 40 else v)
    assert fired(rows)[0] == {"reward_variance_collapse": 42}


def test_entropy_collapse():
    rng = random.Random(3)
    rows = with_curve(healthy(1), "critic_rewards_mean", lambda t, v: 0.45 + rng.gauss(0, 0.03))
    rows = with_curve(rows, "actor_entropy", lambda t, v: v if t < 12 else v * math.exp(-(t - 12) / 4))
    names, alarms = fired(rows)
    assert 15 <= names["entropy_collapse"] <= 22 and set(names) <= {"entropy_collapse", "reward_flat"}
    alarm = next(a for a in alarms if a.name == "entropy_collapse")
    assert alarm.data["entropy"] < 0.25 * alarm.data["start"]


def test_entropy_falling_while_the_reward_rises_is_convergence():
    rows = with_curve(healthy(1), "actor_entropy", lambda t, v: v if t < 30 else v * math.exp(-(t - 30) / 4))
    assert fired(rows)[0] == {}


def test_entropy_high_and_flat_with_flat_reward():
    rng = random.Random(7)
    rows = with_curve(healthy(1), "actor_entropy", lambda t, v: 1.0 + rng.gauss(0, 0.02))
    rows = with_curve(rows, "critic_rewards_mean", lambda t, v: 0.45 + rng.gauss(0, 0.03))
    assert fired(rows)[0] == {"entropy_high_flat": 30, "reward_flat": 30}


def test_response_length_spike_once_even_when_it_stays_up():
    rows = with_curve(healthy(1), "response_length_mean", lambda t, v: v * 2.6 if t >= 40 else v)
    names, alarms = fired(rows)
    assert names == {"response_length_spike": 40} and len(alarms) == 1
    assert alarms[0].data["kind"] == "spike"


def test_response_length_runaway():
    rows = with_curve(healthy(1), "response_length_mean", lambda t, v: v * (1 + 0.04 * t))
    names, alarms = fired(rows)
    assert list(names) == ["response_length_spike"] and 55 <= names["response_length_spike"] <= 80
    assert alarms[0].data["kind"] == "runaway"


def test_response_length_clipped_after_consecutive_steps():
    rows = with_curve(healthy(1), "response_length_clip_ratio", lambda t, v: 0.35 if t >= 30 else v)
    assert fired(rows)[0] == {"response_length_clipped": 34}


def test_reward_hacking_train_up_validation_down():
    rows = healthy(1)
    for r in rows:
        if "val_score_rewards_mean" in r and r["step"] >= 30:
            r["val_score_rewards_mean"] = 0.7 - 0.04 * (r["step"] - 30) / 10
    names, alarms = fired(rows)
    assert names == {"reward_hacking": 60}  # val at 30, 40, 50, 60 all falling
    assert alarms[0].data["val_steps"] == [30, 40, 50, 60] and "hacking" in alarms[0].message


def test_reward_hacking_needs_training_reward_rising():
    rows = with_curve(healthy(1), "critic_rewards_mean", lambda t, v: 0.75 + (v - 0.9) * 0.1 if t >= 30 else v)
    for r in rows:
        if "val_score_rewards_mean" in r and r["step"] >= 30:
            r["val_score_rewards_mean"] = 0.7 - 0.04 * (r["step"] - 30) / 10
    assert "reward_hacking" not in fired(rows)[0]


def test_grad_norm_spike_once_per_episode_and_rearms():
    rows = with_curve(healthy(1), "actor_grad_norm", lambda t, v: v * 10 if t in (50, 52, 90) else v)
    names, alarms = fired(rows)
    assert [(a.name, a.step) for a in alarms] == [("grad_norm_spike", 50), ("grad_norm_spike", 90)]
    assert alarms[0].data["grad_norm"] > 5 * alarms[0].data["median"]


def test_non_finite_grad_norm_fires_at_once():
    rows = with_curve(healthy(1), "actor_grad_norm", lambda t, v: float("nan") if t == 3 else v)
    assert fired(rows)[0] == {"grad_norm_spike": 3}


# ------------------------------------------------------------------ baseline, stop, scan, thresholds
@pytest.mark.parametrize("val,names", [(0.0, ["baseline_zero"]), (0.97, ["baseline_saturated"]), (0.4, []),
                                       (float("nan"), [])])
def test_baseline_checks(val, names):
    mon = HealthMonitor()
    assert [a.name for a in mon.check_baseline(val)] == names
    assert all(a.step == 0 and a.level == "warning" for a in mon.alarms)
    assert mon.check_baseline(val) == []  # once
    assert [a.name for a in HealthMonitor(baseline_val=val).alarms] == names


def test_stop_on_makes_should_stop():
    rows = with_curve(healthy(1), "actor_grad_norm", lambda t, v: v * 10 if t == 50 else v)
    mon = HealthMonitor(HealthThresholds(stop_on=["grad_norm_spike"]))
    for r in rows:
        mon.update(r)
        if mon.should_stop:
            break
    assert r["step"] == 50 and mon.stop_alarm.name == "grad_norm_spike"
    assert mon.summary()["stopped_by"] == "grad_norm_spike" and mon.summary()["ok"] is False
    # an alarm not in stop_on does not stop
    mon2 = HealthMonitor(HealthThresholds(stop_on=["reward_hacking"]))
    for r in rows:
        mon2.update(r)
    assert mon2.alarms and not mon2.should_stop


def test_scan_equals_streaming_update_and_summary_is_json():
    rows = with_curve(healthy(1), "actor_grad_norm", lambda t, v: v * 10 if t == 50 else v)
    rows = with_curve(rows, "response_length_clip_ratio", lambda t, v: 0.35 if t >= 70 else v)
    mon = HealthMonitor(baseline_val=0.97)
    streamed = list(mon.alarms)
    for r in rows:
        streamed += mon.update(r)
    assert [a.as_dict() for a in scan(rows, baseline_val=0.97)] == [a.as_dict() for a in streamed]
    assert [a.name for a in streamed] == ["baseline_saturated", "grad_norm_spike", "response_length_clipped"]
    assert json.loads(json.dumps(mon.summary()))["alarms"][1]["step"] == 50


def test_thresholds_override_and_disable():
    rows = healthy(1)  # its 2.5x grad-norm blip at step 50 is noise at the default factor 5
    assert scan(rows, thresholds=HealthThresholds(grad_spike_factor=2.0)) and \
        {a.name for a in scan(rows, thresholds=HealthThresholds(grad_spike_factor=2.0))} == {"grad_norm_spike"}
    assert {a.name for a in scan(rows, thresholds=HealthThresholds(reward_stuck_below=0.6))} == {"reward_stuck"}
    spiky = with_curve(rows, "actor_grad_norm", lambda t, v: v * 10 if t == 50 else v)
    assert scan(spiky, thresholds=HealthThresholds(disable=["grad_norm_spike"])) == []


def test_missing_metrics_do_not_fire_or_crash():
    rows = [{"step": i, "total_steps": 50} for i in range(1, 51)]
    assert scan(rows) == []
    rows = [{"step": i, "critic_rewards_mean": None, "actor_entropy": float("inf")} for i in range(1, 51)]
    assert scan(rows) == []


def test_bad_threshold_config_names_the_field():
    with pytest.raises(ValueError, match=r"engine.health.stop_on: unknown alarm 'reward_stuk'"):
        HealthThresholds(stop_on=["reward_stuk"])
    with pytest.raises(ValueError, match="engine.health.hack_evals"):
        HealthThresholds(hack_evals=2)
    assert health.check_alarm_names(("reward_flat",), "x") == ["reward_flat"]
    assert len(set(ALARM_NAMES)) == 12


def test_thresholds_embed_in_a_strict_pydantic_config():
    # the config can hold HealthThresholds as it is: pydantic validates the types, unknown keys, and names
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class Engine(BaseModel):
        model_config = ConfigDict(extra="forbid")
        health: HealthThresholds = Field(default_factory=HealthThresholds)

    assert Engine(health={"grad_spike_factor": 3, "stop_on": ["reward_hacking"]}).health == \
        HealthThresholds(grad_spike_factor=3.0, stop_on=["reward_hacking"])
    assert Engine().health == HealthThresholds()
    for bad, where in [({"stop_on": ["nope"]}, "engine.health.stop_on"), ({"grad_spike_factr": 3}, "grad_spike_factr"),
                       ({"window": "x"}, "window")]:
        with pytest.raises(ValidationError, match=where):
            Engine(health=bad)

def test_false_alarm_rate_over_many_seeded_healthy_runs():
    runs = [scan(healthy(**{**cfg, "seed": 1000 + s})) for cfg in HEALTHY for s in range(40)]
    assert sum(bool(a) for a in runs) <= 2, [[(x.name, x.step) for x in a] for a in runs if a]


def _rates(n=200):
    """False-alarm and detection rates over seeds (python tests/test_health.py; figures in docs/health.md)."""
    def valnoise(s, sd):
        rng, rows = random.Random(s), healthy(s)
        for r in rows:
            if "val_score_rewards_mean" in r:
                r["val_score_rewards_mean"] += rng.gauss(0, sd)
        return rows

    def flat(s, sd):
        rng = random.Random(s)
        return with_curve(healthy(s), "critic_rewards_mean", lambda t, v: clamp(0.5 + rng.gauss(0, sd)))

    def hack(s):
        rows, rng = healthy(s), random.Random(s)
        for r in rows:
            if "val_score_rewards_mean" in r and r["step"] >= 30:
                r["val_score_rewards_mean"] = 0.7 - 0.03 * (r["step"] - 30) / 10 + rng.gauss(0, 0.02)
        return rows

    def grad(s, sd):
        rng = random.Random(s)
        return with_curve(healthy(s), "actor_grad_norm", lambda t, v: 0.5 * math.exp(rng.gauss(0, sd)))

    cases = {**{f"healthy {c}": (lambda s, c=c: healthy(**{**c, "seed": s})) for c in HEALTHY},
             "healthy, slow rise (tau=80)": lambda s: healthy(s, tau=80.0),
             "healthy, 300 steps, 30 evals": lambda s: healthy(s, steps=300, tau=60.0, noise=0.08),
             "healthy, extra val noise sd 0.03": lambda s: valnoise(s, 0.03),
             "healthy, grad norm lognormal sd 0.4": lambda s: grad(s, 0.4),
             "FAILURE flat reward 0.5, noise sd 0.05": lambda s: flat(s, 0.05),
             "FAILURE flat reward 0.5, noise sd 0.1": lambda s: flat(s, 0.1),
             "FAILURE val -0.03/eval (noise 0.02) while train rises": hack}
    for label, gen in cases.items():
        alarms = [scan(gen(s)) for s in range(n)]
        names = sorted({a.name for run in alarms for a in run})
        print(f"{label}: {sum(bool(a) for a in alarms)}/{n} runs with an alarm {names}")


if __name__ == "__main__":
    _rates()
