"""`grpo train CONFIG.yaml [--set key=value ...] [--output-dir DIR] [--resume] [--dry-run]`."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path


def add_arguments(p):
    p.description = ("Run a GRPO job. CONFIG is the body of Bedrock's fine_tuning.jobs.create (model, training_file, "
                     "validation_file, method.reinforcement.grader/hyperparameters) plus a local-only `engine:` section. "
                     "Works the same under `accelerate launch -m grpo train ...`.")
    p.add_argument("config", type=Path, help="job YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path, e.g. --set method.reinforcement.hyperparameters.batch_size=8")
    p.add_argument("--output-dir", type=Path, default=None, help="run directory (default runs/<config>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir "
                   "(default: the newest runs/<config>-* directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the plan (model, parameter "
                   "counts, trainable parameters, memory per GPU, steps, and the time plan: tokens and FLOPs per "
                   "step, seconds predicted on this CPU from a measured probe of a few seconds, and on GPUs from "
                   "datasheet peaks and stated MFU assumptions) without loading any weights")
    p.add_argument("--lengths", type=Path, default=None, metavar="FILE",
                   help="with --dry-run: response lengths for the time plan from `grpo eval ... --out FILE` (the "
                        "samples file) or `grpo eval ... --json` output (default: every response at "
                        "inference_max_tokens, an upper bound)")
    p.add_argument("--gpu", choices=["h100", "h200", "a100", "l40s"], action="append", default=None,
                   help="with --dry-run: price the job on this GPU (GPU-hours; repeatable; default: all four)")


def default_run_dir(config: Path, resume: bool) -> Path:
    """runs/<config stem>-<YYYYmmdd-HHMMSS>; with `resume`, the newest such directory of this config that holds
    a checkpoint (else the newest one). Only this config's own stamped names match: `gsm8k` does not pick up
    `gsm8k-v2-...`."""
    if resume:
        stamp = re.compile(re.escape(config.stem) + r"-\d{8}-\d{6}")
        found = sorted(d for d in Path("runs").glob(f"{config.stem}-*") if d.is_dir() and stamp.fullmatch(d.name))
        with_ckpt = [d for d in found if (d / "checkpoints").is_dir()]
        if with_ckpt or found:
            return (with_ckpt or found)[-1]
    return Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_and_report(cfg, run_dir: Path, *, resume: bool = False, progress: bool = True) -> int:
    """Run the job; print where the run, metrics, plot and adapter are (the last line). Exit status.
    Refuses a directory that already holds a run unless `resume` (every caller: train, quickstart)."""
    from grpo.errors import UserError
    from grpo.reward.runner import RewardError
    from grpo.rundir import RunDir, read_jsonl
    from grpo.training.trainer import Trainer

    if not resume and RunDir(run_dir).metrics.exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or another --output-dir")
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    try:
        summary = trainer.train()
    except RewardError as err:
        print(f"error: {err}\nthe job failed; the run so far is in {run_dir} (--resume continues from its last "
              "checkpoint once the handler is fixed)", file=sys.stderr)
        return 1
    if trainer.is_main:
        from grpo.remote.plot import plot_run

        png = plot_run(run_dir)
        final = summary["final"]
        base, val = summary["baseline_val_score_rewards_mean"], final.get("val_score_rewards_mean")

        tail = [r["critic_rewards_mean"] for r in read_jsonl(RunDir(run_dir).metrics)][-10:]
        line = (f"done: {summary['steps']} steps, critic_rewards_mean {final.get('critic_rewards_mean', float('nan')):.3f} "
                f"(mean of the last {len(tail)} steps {sum(tail) / max(len(tail), 1):.3f})")
        if base is not None and val is not None:
            line += f", validation reward {base:.3f} -> {val:.3f}"
        print(line + (" (stopped early)" if summary["stopped_early"] else "")
              + (f" (paused: {RunDir(run_dir).pause_request.name} was asked for; remove it and --resume to continue)"
                 if summary["status"] == "paused" else ""))
        print(f"run: {run_dir}  metrics: {RunDir(run_dir).metrics}  plot: {png}  adapter: {summary['adapter']}")
    return 0


def run(args) -> int:
    from grpo.config import load_config, print_warnings

    from grpo.errors import UserError

    if (args.lengths is not None or args.gpu) and not args.dry_run:
        raise UserError("--lengths and --gpu are for the time plan: add --dry-run")
    cfg = load_config(args.config, args.overrides)
    print_warnings(cfg)
    if args.dry_run:
        from grpo.training.dry_run import dry_run

        print(dry_run(cfg, str(args.config), lengths=args.lengths, gpus=args.gpu))
        return 0
    run_dir = args.output_dir or default_run_dir(args.config, args.resume)
    return train_and_report(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
