"""The training-health alarms' names and thresholds (`engine.health`): configuration, so it sits with the
config; the detectors themselves are grpo.training.health."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Stable alarm ids (used in `engine.health.stop_on` / `disable`), in display order.
ALARM_NAMES = ("baseline_zero", "baseline_saturated", "reward_stuck", "reward_flat", "reward_variance_collapse",
               "entropy_collapse", "entropy_high_flat", "response_length_spike", "response_length_clipped",
               "reward_hacking", "grad_norm_spike", "sampler_drift")


def check_alarm_names(names, where: str) -> list[str]:
    """The names as a list, or ValueError naming `where` and the first unknown one (for config validators)."""
    names = list(names)
    for n in names:
        if n not in ALARM_NAMES:
            raise ValueError(f"{where}: unknown alarm {n!r} (known: {', '.join(ALARM_NAMES)})")
    return names


@dataclass(frozen=True)
class HealthThresholds:
    """Every threshold of the detectors (docs/health.md gives the reason for each default)."""

    warmup_steps: int = 10           # reward_stuck waits max(warmup_steps, warmup_frac x total_steps) steps
    warmup_frac: float = 0.1
    window: int = 10                 # steps in the rolling reward mean and in the medians spikes compare to
    min_history: int = 5             # steps seen before spike detectors compare; also the "starting value" span
    rearm_steps: int = 20            # clear steps after which the same alarm may fire again
    reward_stuck_below: float = 0.15  # AWS: critic_rewards_mean stuck below 0.15
    reward_saturated: float = 0.85   # above this, a flat reward or all-equal groups mean success, not failure
    flat_after_frac: float = 0.3     # reward_flat / entropy_high_flat judge after this share of total_steps
    flat_min_gain: float = 0.05      # the best rolling mean must beat the first window's mean by this much
    zero_std_frac: float = 0.8       # share of groups with identical rewards (no gradient) ...
    zero_std_steps: int = 3          # ... for this many consecutive steps
    entropy_floor: float = 0.05      # absolute entropy floor (nats per token)
    entropy_collapse_ratio: float = 0.25  # or below this share of the starting entropy
    entropy_flat_ratio: float = 0.9  # entropy still >= this share of its start while the reward is flat
    length_spike_factor: float = 2.0  # mean length > factor x median of the previous `window` steps
    length_runaway_factor: float = 3.0  # or the recent median > factor x the starting length
    clip_ratio_max: float = 0.2      # share of responses hitting the max length ...
    clip_steps: int = 5              # ... above that for this many consecutive steps
    hack_evals: int = 4              # validation points in the reward-hacking window (at least 3)
    hack_val_drop: float = 0.05      # validation fell at each of them, by this much in all ...
    hack_train_gain: float = 0.05    # ... while the rolling training reward rose by this much
    grad_spike_factor: float = 5.0   # grad norm > factor x median of the previous `window` steps (or not finite)
    sampler_kl_floor: float = 1e-3   # sampler_drift: rollout_kl_k3 (median of 3 steps) above this ...
    sampler_drift_factor: float = 10.0  # ... and above factor x its start (median of the first 3 steps)
    sampler_clipfrac_floor: float = 0.02  # or rollout_tis_clipfrac above this and factor x its start
    baseline_low: float = 0.0        # AWS: baseline reward 0 -> SFT first (fires when baseline <= this)
    baseline_high: float = 0.95      # AWS: above 95% RFT is unnecessary (fires when baseline > this)
    stop_on: list[str] = field(default_factory=list)  # alarms that should stop the run
    disable: list[str] = field(default_factory=list)  # alarms never raised

    def __post_init__(self):
        object.__setattr__(self, "stop_on", check_alarm_names(self.stop_on, "engine.health.stop_on"))
        object.__setattr__(self, "disable", check_alarm_names(self.disable, "engine.health.disable"))
        for name in ("warmup_steps", "window", "min_history", "rearm_steps", "zero_std_steps", "clip_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.health.{name}: must be >= 1, got {getattr(self, name)}")
        if self.hack_evals < 3:
            raise ValueError(f"engine.health.hack_evals: must be >= 3 (a trend needs 3 points), got {self.hack_evals}")
