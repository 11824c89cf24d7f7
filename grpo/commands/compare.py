"""`grpo compare RUN_A RUN_B [--metrics ...] [--tolerance METRIC=VALUE ...] [--out PNG] [--json]`.

Exit status 0 when every compared metric is within tolerance, 1 when one is not (so it can gate a CI
job), 2 on a user error (a missing run directory, a bad --tolerance).
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p):
    p.description = ("Compare two run directories (local runs, or Bedrock jobs pulled with `grpo pull`): align by "
                     "step (or by fraction of training when the step counts differ), report per metric the start, "
                     "end, mean, largest gap and correlation, and judge each against a tolerance derived from the "
                     "seed-to-seed spread of local runs (docs/parity.md). Exit 0 within tolerance, 1 outside.")
    p.add_argument("run_a", type=Path, help="first run directory (holds metrics.jsonl)")
    p.add_argument("run_b", type=Path, help="second run directory")
    p.add_argument("--metrics", nargs="+", default=None, metavar="METRIC",
                   help="metrics to compare (default: the six Bedrock step metrics, plus val_score_rewards_mean "
                        "when both runs have it)")
    p.add_argument("--tolerance", action="append", default=[], metavar="METRIC=VALUE",
                   help="override a tolerance: METRIC=0.05 (the metric's own kind), METRIC=abs:0.05, METRIC=30%%")
    p.add_argument("--out", type=Path, default=None, help="PNG with both runs on each panel (default: none)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    from grpo.remote.parity import compare_runs, format_report, parse_tolerances, plot_comparison
    from grpo.remote.runs import health_alarms, load_run

    overrides = parse_tolerances(args.tolerance)
    a, b = load_run(args.run_a), load_run(args.run_b)
    if a.label == b.label:
        a.label, b.label = str(args.run_a), str(args.run_b)
    if a.label == b.label:
        b.label += " (B)"
    report = compare_runs(a, b, args.metrics, overrides)
    alarms = {a.label: health_alarms(a), b.label: health_alarms(b)}
    report["alarms"] = {key: [x.as_dict() for x in alarms[run.label]] for key, run in (("run_a", a), ("run_b", b))}
    if args.out:
        report["png"] = str(plot_comparison(a, b, report, args.out, alarms=alarms))
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        if args.out:
            print(f"plot: {report['png']}")
    return 0 if report["verdict"] == "within" else 1
