"""The dry-run's time plan (grpo.training.time_plan) against a finished or running `grpo train` run on this CPU.

    python scripts/check_time_plan.py CONFIG.yaml RUN_DIR [--set key=value ...]

Measured: the run's metrics.jsonl, per phase (timing_s_gen, _ref, _old_log_prob, _update_actor) and per step
without the reward handler (timing_s_step - timing_s_reward), the median over its steps (step 1 included: the
plan does not predict warm-up, so a run of a few steps shows it). Predicted: the plan with the run's own
response lengths (each step's response_length_mean and response_length_clip_ratio, pooled), the probe taken
now; the machine's load is printed beside both (the probe measures the machine as it is at that moment).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    from grpo.config import load_config
    from grpo.training.dry_run import inspect_model, model_config, setup_for
    from grpo.training.time_plan import PHASE_NAMES, make_time_plan

    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        print(f"error: {args.run_dir}/metrics.jsonl has no steps yet", file=sys.stderr)
        return 2
    job = load_config(args.config, args.overrides)
    n = sum(1 for r in rows)
    mean = statistics.fmean(r["response_length_mean"] for r in rows)
    clip = statistics.fmean(r["response_length_clip_ratio"] for r in rows)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"samples": n * job.hyperparameters.batch_size * job.hyperparameters.training_sample_per_prompt,
                   "response_length_mean": mean, "response_length_clip_ratio": clip}, f)
    config, _ = model_config(job.local_model)
    info = inspect_model(config, job.engine.lora)
    plan = make_time_plan(config, info, job, setup_for(job, info), steps=len(rows), lengths_file=Path(f.name),
                          gpus=[], probe=True)
    os.unlink(f.name)
    probe = plan.probe
    print(f"{args.run_dir}: {len(rows)} steps, responses mean {mean:.1f} tokens, {clip:.0%} at the cap")
    print(f"probe: {probe.seconds:.2f} s ({probe.cpu_seconds:.2f} s CPU) at load {probe.load[0]:.2f} / "
          f"{probe.load[1]:.2f} (1 / 5 min), {probe.threads} torch threads")
    print(f"{'phase':<22}{'predicted s':>12}{'measured s (median)':>22}{'ratio':>8}   per step measured")
    total_p = total_m = 0.0
    for key, secs in plan.cpu.items():
        measured = [r.get(f"timing_s_{key}") for r in rows if r.get(f"timing_s_{key}") is not None]
        med = statistics.median(measured) if measured else float("nan")
        total_p += secs
        total_m += med
        print(f"{PHASE_NAMES[key]:<22}{secs:>12.2f}{med:>22.2f}{secs / med:>8.2f}   "
              + " ".join(f"{x:.2f}" for x in measured))
    steps = [r["timing_s_step"] - r.get("timing_s_reward", 0.0) for r in rows]
    med = statistics.median(steps)
    print(f"{'step - reward':<22}{total_p:>12.2f}{med:>22.2f}{total_p / med:>8.2f}   "
          + " ".join(f"{x:.2f}" for x in steps))
    tests = [r["timing_s_testing"] for r in rows if "timing_s_testing" in r]
    if tests and plan.cpu_validation:
        med = statistics.median(tests)
        print(f"{'validation':<22}{plan.cpu_validation:>12.2f}{med:>22.2f}{plan.cpu_validation / med:>8.2f}   "
              + " ".join(f"{x:.2f}" for x in tests))
    print(f"load now: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
