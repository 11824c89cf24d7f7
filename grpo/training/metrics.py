"""Step metrics with Bedrock's names (verl's keys, `/` -> `_`) and where they go.

Sinks: `<run>/metrics.jsonl` (one line per step), `<run>/events.jsonl` (OpenAI
`fine_tuning.job.event` objects, as Bedrock's `list_events` returns them), and TensorBoard through
accelerate's trackers. Only the main process writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the trainer; `grpo compare`/`plot` do not pay for it
    import torch
from grpo.rundir import RunDir, _append_lines, make_event, read_jsonl

# The six the OpenAI-compatible path reports per step (spec section 3), in the walkthrough's order.
BEDROCK_STEP_METRICS = ("critic_rewards_mean", "actor_pg_loss", "actor_entropy", "actor_grad_norm",
                        "critic_advantages_mean", "response_length_mean")


# Fields that differ run to run even with the same seed (wall-clock), left out of equality checks.
VOLATILE_PREFIXES = ("timing_s_", "perf_", "reward_seconds")


def _stats(prefix: str, x: "torch.Tensor") -> dict[str, float]:
    x = x.float()
    if not x.numel():  # nothing graded this step (every trajectory failed under on_failure=skip)
        return {f"{prefix}_{k}": float("nan") for k in ("mean", "max", "min")}
    return {f"{prefix}_mean": float(x.mean()), f"{prefix}_max": float(x.max()), f"{prefix}_min": float(x.min())}


def data_metrics(*, scores: "torch.Tensor", token_advantages: "torch.Tensor", response_lengths: "torch.Tensor",
                 prompt_lengths: "torch.Tensor", truncated: "torch.Tensor", frac_zero_std: float) -> dict:
    """verl's `compute_data_metrics` for one step: sequence scores, token-level advantages, lengths.

    `critic_rewards_*` equals `critic_score_*` here, since no KL is folded into the reward (KL is a loss).
    `token_advantages` holds the advantage of every response token (1-D), so `critic_advantages_*` are
    over tokens: with unequal lengths their mean is not exactly 0.
    `response_length_clip_ratio` is the share of responses that hit `inference_max_tokens`.
    `critic_frac_reward_zero_std` is the share of groups whose rewards are all equal (no gradient from them).
    """
    m = {}
    m.update(_stats("critic_score", scores))
    m.update(_stats("critic_rewards", scores))
    if token_advantages.numel():
        m.update(_stats("critic_advantages", token_advantages))
    m["critic_frac_reward_zero_std"] = frac_zero_std
    m.update(_stats("response_length", response_lengths))
    m["response_length_clip_ratio"] = float(truncated.float().mean())
    m.update(_stats("prompt_length", prompt_lengths))
    return m


def reward_metrics(summary: dict) -> dict:
    """The handler's own `metrics_list` means, as `reward_<name>_mean`, plus the failure count."""
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and k != "reward_seconds"}  # wall-clock: timing_s_reward has it


class RunLog:
    """metrics.jsonl + events.jsonl (+ TensorBoard via the accelerator), main process only."""

    def __init__(self, run_dir: Path, accelerator=None, *, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = RunDir(self.run_dir).metrics
        self.events_path = RunDir(self.run_dir).events
        self.accelerator = accelerator
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: keep exactly the lines of steps up to the checkpoint (one line per step)."""
        if not self.enabled:
            return
        for path, get in ((self.metrics_path, lambda r: r.get("step")), (RunDir(self.run_dir).samples, lambda r: r.get("step")),
                          (self.events_path, lambda r: (r.get("data") or {}).get("step"))):
            rows = [r for r in read_jsonl(path) if get(r) is None or get(r) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, path)

    def clear(self) -> None:
        """On a resume with no checkpoint to resume from: the run starts over, its logs with it."""
        if self.enabled:
            for path in (self.metrics_path, self.events_path, RunDir(self.run_dir).samples, RunDir(self.run_dir).summary):
                path.unlink(missing_ok=True)

    def event(self, message: str, **kw) -> None:
        if self.enabled:
            _append_lines(self.events_path, [make_event(message, **kw)])

    def step(self, metrics: dict) -> None:
        if not self.enabled:
            return
        step, total = metrics["step"], metrics["total_steps"]
        _append_lines(self.metrics_path, [metrics])
        _append_lines(self.events_path, [make_event(f"Step {step}/{total}: training metrics", type="metrics", data=metrics)])
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
