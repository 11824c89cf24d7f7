"""Training-health detectors: pure functions of the step metrics (metrics.jsonl rows), no I/O.

AWS's RFT best practices (spec section 7) say what to watch for: a base-model reward of 0 or above 95%,
`critic_rewards_mean` stuck below 0.15, reward hacking, length spikes, entropy collapse or flat high
entropy. `HealthMonitor` watches for them step by step; `scan` runs it over a finished run.
The rules, their defaults and the reasons for them are in docs/health.md.

Each alarm name fires once when its condition starts. It may fire again only after the condition has
been clear for `rearm_steps` consecutive evaluated steps (so two grad-norm spikes 50 steps apart are two
alarms; one sustained collapse is one). A step that lacks a detector's metric leaves it as it was.
Rewards are assumed to be on the 0-1 scale of AWS's thresholds; change the levels for other scales.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from grpo.health_thresholds import ALARM_NAMES, HealthThresholds

_STEP_ALARMS = ALARM_NAMES[2:]


_SMOOTH = 3  # steps in the short median that keeps one noisy step from deciding entropy and length levels


@dataclass
class Alarm:
    name: str      # one of ALARM_NAMES
    step: int      # the step at which the condition started (0: before training)
    message: str   # a sentence with the numbers and what to do
    level: str = "warning"
    data: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "step": self.step, "level": self.level, "message": self.message, "data": self.data}


def _num(x) -> float | None:
    """A finite float, or None for a missing, non-numeric or non-finite value."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _mean(xs):
    return sum(xs) / len(xs)


def _median(xs):
    s = sorted(xs)
    k = len(s) // 2
    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2


class HealthMonitor:
    """Feed it one metrics dict per step with `update`; it returns the alarms that start at that step."""

    def __init__(self, thresholds: HealthThresholds | None = None, *, baseline_val: float | None = None):
        self.th = thresholds or HealthThresholds()
        self.alarms: list[Alarm] = []
        self._active: dict[str, int] = {}  # firing alarm name -> consecutive clear steps since
        self._n = 0
        self._total = 0
        self._r: list[float] = []    # critic_rewards_mean
        self._best_roll: float | None = None
        self._zstd: list[float] = []
        self._const: list[bool] = []  # every reward of the step's batch equal (max == min)
        self._ent: list[float] = []
        self._len: list[float] = []
        self._clip: list[float] = []
        self._gn: list[float] = []
        self._val: list[tuple[int, float, float]] = []  # (step, val reward, rolling train reward then)
        self._rkl: list[float] = []  # rollout_kl_k3 (a continuous/vllm sampler against the trained policy)
        self._rclip: list[float] = []  # rollout_tis_clipfrac
        if baseline_val is not None:
            self.check_baseline(baseline_val)

    # ------------------------------------------------------------------ public
    def check_baseline(self, val: float) -> list[Alarm]:
        """AWS's pre-training check on the base model's validation reward (step 0). Each fires once."""
        v, th, new = _num(val), self.th, []
        if v is None:
            return new  # no number to judge (the trainer reports a failed evaluation itself)
        if v <= th.baseline_low:
            new += self._fire("baseline_zero", 0, (
                f"Baseline validation reward is {v:.3f} (<= {th.baseline_low:g}): the base model never earns a "
                "reward, so its groups will mostly score all 0 and give GRPO no gradient. AWS best practice: if "
                "the base model's reward is 0, do supervised fine-tuning first; also check that a correct answer "
                "gets the maximum score and that the prompts ask for the format the grader parses.", {"baseline_val": v}))
        if v > th.baseline_high:
            new += self._fire("baseline_saturated", 0, (
                f"Baseline validation reward is {v:.3f} (> {th.baseline_high:g}): the base model already solves "
                "this task. AWS best practice: above 95%, reinforcement fine-tuning is unnecessary; use harder "
                "prompts or a stricter grader if you still want to train.", {"baseline_val": v}))
        return new

    def update(self, metrics: dict) -> list[Alarm]:
        """Take one step's metrics (a metrics.jsonl row); return the alarms that start at this step."""
        self._n += 1
        step = _num(metrics.get("step"))
        step = int(step) if step is not None else self._n
        total = _num(metrics.get("total_steps"))
        self._total = int(total) if total is not None else self._total
        now = {k: _num(metrics.get(k)) for k in ("critic_rewards_mean", "actor_entropy", "response_length_mean",
                                                 "response_length_clip_ratio", "val_score_rewards_mean",
                                                 "rollout_kl_k3", "rollout_tis_clipfrac", "rollout_tis_weight_mean")}
        # with DAPO's dynamic sampling the trained groups never tie; the share among the groups sampled is the signal
        zstd = _num(metrics.get("dynamic_sampling_frac_tied_before", metrics.get("critic_frac_reward_zero_std")))
        rmax, rmin = _num(metrics.get("critic_rewards_max")), _num(metrics.get("critic_rewards_min"))
        if zstd is None and rmax is not None and rmax == rmin:
            zstd = 1.0  # rows without the key: all rewards of the batch equal, so every group is constant
        now["zstd"] = zstd
        if rmax is not None and rmin is not None:
            self._const.append(rmax == rmin)
        gn_raw = metrics.get("actor_grad_norm")
        now["grad"] = None if isinstance(gn_raw, bool) or not isinstance(gn_raw, (int, float)) else float(gn_raw)

        W = self.th.window
        for key, hist in (("critic_rewards_mean", self._r), ("zstd", self._zstd), ("actor_entropy", self._ent),
                          ("response_length_mean", self._len), ("response_length_clip_ratio", self._clip),
                          ("rollout_kl_k3", self._rkl), ("rollout_tis_clipfrac", self._rclip)):
            if now[key] is not None:
                hist.append(now[key])
        if now["critic_rewards_mean"] is not None and len(self._r) >= W:
            roll = _mean(self._r[-W:])
            self._best_roll = roll if self._best_roll is None else max(self._best_roll, roll)
        if now["val_score_rewards_mean"] is not None and self._r:
            self._val.append((step, now["val_score_rewards_mean"], _mean(self._r[-W:])))

        new = []
        for name in _STEP_ALARMS:
            res = getattr(self, "_" + name)(now)
            if res is None or name in self.th.disable:
                continue
            if res is False:
                if name in self._active:
                    self._active[name] += 1
                    if self._active[name] >= self.th.rearm_steps:
                        del self._active[name]
            elif name in self._active:
                self._active[name] = 0
            else:
                self._active[name] = 0
                new += self._fire(name, step, res)
        if now["grad"] is not None and math.isfinite(now["grad"]):
            self._gn.append(now["grad"])  # after the check: a spike compares with the steps before it
        return new

    @property
    def should_stop(self) -> bool:
        """True once an alarm named in `stop_on` has fired."""
        return self.stop_alarm is not None

    @property
    def stop_alarm(self) -> Alarm | None:
        return next((a for a in self.alarms if a.name in self.th.stop_on), None)

    def summary(self) -> dict:
        """The run summary's `health` section."""
        stop = self.stop_alarm
        return {"ok": not self.alarms, "alarms": [a.as_dict() for a in self.alarms],
                "stopped_by": stop.name if stop else None, "thresholds": asdict(self.th)}

    # ------------------------------------------------------------------ helpers
    def _fire(self, name: str, step: int, res) -> list[Alarm]:
        if name in self.th.disable or (name.startswith("baseline") and any(a.name == name for a in self.alarms)):
            return []
        message, data = res
        alarm = Alarm(name, step, message, "warning", data)
        self.alarms.append(alarm)
        return [alarm]

    @property
    def _warmup(self) -> int:
        return max(self.th.warmup_steps, math.ceil(self.th.warmup_frac * self._total))

    @property
    def _flat_start(self) -> int:
        return max(self._warmup, 2 * self.th.window, math.ceil(self.th.flat_after_frac * self._total))

    def _reward_levels(self):
        """(start, current rolling mean, improved): start = mean of the first `window` steps."""
        W = self.th.window
        start, cur = _mean(self._r[:W]), _mean(self._r[-W:])
        improved = self._best_roll is not None and self._best_roll - start >= self.th.flat_min_gain
        return start, cur, improved

    # ------------------------------------------------------------------ detectors
    # Each returns None (no data this step: state unchanged), False (clear) or (message, data) (firing).
    def _reward_stuck(self, now):
        if now["critic_rewards_mean"] is None:
            return None
        if len(self._r) < self._warmup:
            return False
        _, cur, _ = self._reward_levels()
        if cur >= self.th.reward_stuck_below:
            return False
        n = min(len(self._r), self.th.window)
        return (f"Reward stuck: critic_rewards_mean averaged {cur:.3f} over the last {n} "
                f"steps, below {self.th.reward_stuck_below:g} after the {self._warmup}-step warm-up. AWS best "
                "practice: the model rarely earns a reward; check that the base model scores above 0 before "
                "training (SFT first if not), that a correct answer gets the maximum score, and that prompts match "
                "the grader's parser.", {"reward_mean": cur, "threshold": self.th.reward_stuck_below})

    def _reward_flat(self, now):
        if now["critic_rewards_mean"] is None:
            return None
        if len(self._r) < self._flat_start:
            return False
        start, cur, improved = self._reward_levels()
        if improved or not self.th.reward_stuck_below <= cur < self.th.reward_saturated:
            return False
        return (f"Reward flat: after {len(self._r)} steps the best {self.th.window}-step mean of critic_rewards_mean "
                f"({self._best_roll:.3f}) is less than {self.th.flat_min_gain:g} above the first {self.th.window} "
                f"steps' mean ({start:.3f}); the policy is not learning from the reward. Check the learning rate "
                "(learning_rate_multiplier), that the grader separates good from bad answers, and the sampling "
                "temperature.", {"start": start, "best": self._best_roll, "current": cur})

    def _reward_variance_collapse(self, now):
        if now["zstd"] is None or not self._r:
            return None
        k, th = self.th.zero_std_steps, self.th
        if len(self._zstd) < k or min(self._zstd[-k:]) < th.zero_std_frac:
            return False
        start, cur, improved = self._reward_levels()
        constant = len(self._const) >= k and all(self._const[-k:])
        if cur >= th.reward_saturated and improved:
            return False  # learned its way to all-correct groups: success, not a broken reward
        if cur < th.reward_stuck_below and not constant:
            return False  # the model rarely succeeds: reward_stuck's case, judged after the warm-up
        if cur < th.reward_stuck_below:
            why = ("every reward in the batch is the same: the grader may return a constant, or the model never "
                   "succeeds (AWS: if the base model's reward is 0, do SFT first)")
        elif cur >= th.reward_saturated:
            why = ("the reward has been this high from the start: the grader may return a constant, or the task "
                   "is already solved (AWS: above 95%, RFT is unnecessary)")
        else:
            why = ("check that the grader's score varies with answer quality (a constant score gives exactly "
                   "this) and that most prompts are neither trivial nor impossible for the model")
        return (f"Reward variance collapse: in each of the last {k} steps at least {th.zero_std_frac:.0%} of "
                f"prompt groups had identical rewards for all samples (now {now['zstd']:.0%}, mean reward "
                f"{cur:.3f}); GRPO's advantages are 0 there, so those groups give no gradient. {why[0].upper()}"
                f"{why[1:]}.", {"frac_reward_zero_std": now["zstd"], "reward_mean": cur, "constant": constant})

    def _entropy_collapse(self, now):
        if now["actor_entropy"] is None:
            return None
        if len(self._ent) < self.th.min_history:
            return False
        start = _median(self._ent[:self.th.min_history])
        cur = _median(self._ent[-_SMOOTH:])
        limit = min(max(self.th.entropy_floor, self.th.entropy_collapse_ratio * start), 0.5 * start)
        if cur >= limit:
            return False
        if self._r and self._reward_levels()[2]:
            return False  # entropy falling while the reward has risen is the policy converging, not collapsing
        return (f"Entropy collapse: actor_entropy fell to {cur:.3f} from {start:.3f} at the start (limit "
                f"{limit:.3f}); the policy is collapsing onto one answer (mode collapse) and stops exploring. "
                "AWS best practice flags this; lower the learning rate, raise the KL coefficient or the sampling "
                "temperature, and read samples for one repeated answer.", {"entropy": cur, "start": start})

    def _entropy_high_flat(self, now):
        if now["actor_entropy"] is None or not self._r:
            return None
        if len(self._r) < self._flat_start or len(self._ent) < self.th.min_history:
            return False
        start_ent = _median(self._ent[:self.th.min_history])
        cur_ent = _median(self._ent[-self.th.window:])
        _, cur, improved = self._reward_levels()
        if improved or cur >= self.th.reward_saturated or cur_ent < self.th.entropy_flat_ratio * start_ent:
            return False
        return (f"Entropy flat and high: after {len(self._r)} steps actor_entropy is {cur_ent:.3f}, still "
                f">= {self.th.entropy_flat_ratio:.0%} of its start ({start_ent:.3f}), and the reward has not "
                f"improved (now {cur:.3f}): the policy is ignoring the reward. AWS best practice flags this; check "
                "that the update reaches the model (learning rate, trainable LoRA) and that rewards differ within "
                "groups.", {"entropy": cur_ent, "start": start_ent, "reward_mean": cur})

    def _response_length_spike(self, now):
        x = now["response_length_mean"]
        if x is None:
            return None
        h, th = self._len, self.th
        if len(h) <= th.min_history:
            return False
        med = _median(h[-th.window - 1:-1])
        if med > 0 and x > th.length_spike_factor * med:
            return (f"Response length spike: response_length_mean jumped to {x:.1f} tokens, "
                    f"{x / med:.1f}x the median of the previous {len(h[-th.window - 1:-1])} steps ({med:.1f}). "
                    "AWS best practice: length spikes often mean loops or reward hacking by length; read the "
                    "longest samples.", {"kind": "spike", "length": x, "median": med})
        start, cur = _median(h[:th.min_history]), _median(h[-_SMOOTH:])
        if start > 0 and cur > th.length_runaway_factor * start:
            return (f"Response length runaway: response_length_mean is now {cur:.1f} tokens, {cur / start:.1f}x its "
                    f"start ({start:.1f}). Responses keep growing: look for repetition or padding that the grader "
                    "rewards (reward hacking by length); if longer reasoning is expected here, raise "
                    "length_runaway_factor.", {"kind": "runaway", "length": cur, "start": start})
        return False

    def _response_length_clipped(self, now):
        if now["response_length_clip_ratio"] is None:
            return None
        k = self.th.clip_steps
        recent = self._clip[-k:]
        if len(recent) < k or min(recent) <= self.th.clip_ratio_max:
            return False
        return (f"Responses hit the max length: response_length_clip_ratio has been above "
                f"{self.th.clip_ratio_max:.0%} for {k} steps (now {now['response_length_clip_ratio']:.0%}). Truncated "
                "answers usually lose their final answer and score 0; raise inference_max_tokens, or look for loops.",
                {"clip_ratio": now["response_length_clip_ratio"]})

    def _reward_hacking(self, now):
        if now["val_score_rewards_mean"] is None:
            return None  # judged at evaluation steps only
        k, th = self.th.hack_evals, self.th
        pts = self._val[-k:]
        if len(pts) < k:
            return False
        vals = [v for _, v, _ in pts]
        falling = all(b <= a for a, b in zip(vals, vals[1:]))
        drop, gain = vals[0] - vals[-1], pts[-1][2] - pts[0][2]
        if not (falling and drop >= th.hack_val_drop and gain >= th.hack_train_gain):
            return False
        return (f"Possible reward hacking: validation reward fell at each of the last {k} evaluations, from "
                f"{vals[0]:.3f} (step {pts[0][0]}) to {vals[-1]:.3f} (step {pts[-1][0]}), while the training reward "
                f"rose from {pts[0][2]:.3f} to {pts[-1][2]:.3f}. AWS best practice: reward rising while quality does "
                "not is reward hacking; read samples for exploits of the grader (length, format, keywords), fix the "
                f"grader, and prefer the checkpoint near step {pts[0][0]}.",
                {"val_start": vals[0], "val_end": vals[-1], "train_start": pts[0][2], "train_end": pts[-1][2],
                 "val_steps": [s for s, _, _ in pts]})

    def _grad_norm_spike(self, now):
        g = now["grad"]
        if g is None:
            return None
        if not math.isfinite(g):
            return (f"Gradient norm is {g}: the update is not finite (overflow or a division by zero). Check the "
                    "dtype (bfloat16/float32), lower the learning rate, and look at this step's rewards.",
                    {"grad_norm": str(g)})
        prev = self._gn[-self.th.window:]
        if len(prev) < self.th.min_history:
            return False
        med = _median(prev)
        if med > 0 and g > self.th.grad_spike_factor * med:
            return (f"Gradient-norm spike: actor_grad_norm is {g:.3g}, {g / med:.1f}x the median of the previous "
                    f"{len(prev)} steps ({med:.3g}). Repeated spikes precede divergence: lower the learning rate "
                    "or max_grad_norm, and check this step's rewards for outliers.",
                    {"grad_norm": g, "median": med})
        return False

    def _sampler_drift(self, now):
        """The sampler's distribution moving away from the trained policy's as updates accumulate: its weights
        are not reaching the sampler (a sync that does nothing, an adapter never loaded: verl issue 7495)."""
        if now["rollout_kl_k3"] is None and now["rollout_tis_clipfrac"] is None:
            return None  # the transformers backend samples the policy itself: nothing to compare
        th, k = self.th, self.th.min_history
        found = []
        for name, hist, floor in (("rollout_kl_k3", self._rkl, th.sampler_kl_floor),
                                  ("rollout_tis_clipfrac", self._rclip, th.sampler_clipfrac_floor)):
            if len(hist) > k:  # start: the first steps', before the updates add up (the median keeps noise out)
                start, cur = _median(hist[:_SMOOTH]), _median(hist[-_SMOOTH:])
                if cur > max(floor, th.sampler_drift_factor * start):
                    found.append((name, cur, start))
        if not found:
            return False
        name, cur, start = found[0]
        tis = now["rollout_tis_weight_mean"]
        return (f"Sampler drift: {name} is {cur:.3g} (median of the last {_SMOOTH} steps), up from {start:.3g} at the "
                f"start{f', {cur / start:.0f}x' if start > 0 else ''}, growing with the updates"
                + (f" (rollout_tis_weight_mean {tis:.3f})" if tis is not None else "") + ": the sampler is not "
                "sampling the policy being trained, so every step learns from an older policy's samples. The "
                "rollout backend's sync is not delivering the new weights (a LoRA adapter that never reaches the "
                "sampler looks like staleness: verl issue 7495). Check timing_s_sync_weights and that the sampler "
                "loads the adapter; TIS corrects small numeric mismatches, not this.",
                {"metric": name, "value": cur, "start": start, "rollout_tis_weight_mean": tis})


def scan(metrics_rows: list[dict], baseline_val: float | None = None,
         thresholds: HealthThresholds | None = None) -> list[Alarm]:
    """All alarms of a finished run (its metrics.jsonl rows in order): what plot/compare mark."""
    monitor = HealthMonitor(thresholds, baseline_val=baseline_val)
    for row in metrics_rows:
        monitor.update(row)
    return monitor.alarms
