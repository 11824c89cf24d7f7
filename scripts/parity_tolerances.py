"""Derive `grpo compare`'s default tolerances from the seed-to-seed spread of local runs of one config.

    # train the config once per seed, then measure (what docs/parity.md records):
    python scripts/parity_tolerances.py --config configs/quickstart.yaml --seeds 0 1 2 3 --out-dir runs/parity-seeds
    # or measure runs that already exist (same config, different seeds):
    python scripts/parity_tolerances.py runs/parity-seeds/seed-*

For every pair of runs and every metric, the level gap of `grpo compare` (the largest of the start, mean
and end gaps; relative for entropy, grad norm and length) is computed exactly as the compare command does.
The tolerance is K x the largest gap over all pairs (default K = 2: two runs that differ only by seed
should pass with room; a systematic shift of twice the seed noise should not), rounded up to two
significant digits, never below a floor (0.02 absolute, 5% relative) so a metric that happens to be
identical across seeds does not get a zero tolerance. Prints a table, and the dict to paste into
grpo/remote/parity.py (DEFAULT_TOLERANCES); --json prints everything as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

from grpo.remote.parity import ABS, BEDROCK_STEP_METRICS, METRIC_KINDS, VAL_METRIC, align, metric_stats
from grpo.remote.runs import load_run

FLOORS = {ABS: 0.02, "rel": 0.05}


def round_up(x: float, digits: int = 2) -> float:
    if x <= 0:
        return 0.0
    e = math.floor(math.log10(x)) - digits + 1
    return math.ceil(x / 10 ** e) * 10 ** e


def train_seeds(config: Path, seeds: list[int], out_dir: Path, extra: list[str]) -> list[Path]:
    runs = []
    for s in seeds:
        run = out_dir / f"seed-{s}"
        if not (run / "summary.json").is_file():
            cmd = [sys.executable, "-m", "grpo", "train", str(config), "--set", f"seed={s}", "--output-dir", str(run),
                   "--no-progress", *[x for o in extra for x in ("--set", o)]]
            print("+", " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True, stdout=sys.stderr)  # keep this script's stdout the table
        runs.append(run)
    return runs


def spread(run_dirs: list[Path], k: float) -> dict:
    runs = [load_run(p, label=str(p)) for p in run_dirs]
    metrics = [m for m in (*BEDROCK_STEP_METRICS, VAL_METRIC) if all(r.has(m) for r in runs)]
    out = {}
    for m in metrics:
        kind = METRIC_KINDS[m]
        gaps = []
        for a, b in itertools.combinations(runs, 2):
            _, x, ya, yb = align(a, b, m)
            if len(x):
                gaps.append(metric_stats(ya, yb, kind)["level_gap"])
        worst = max(gaps) if gaps else float("nan")
        tol = max(FLOORS[kind], round_up(k * worst)) if gaps else float("nan")
        out[m] = {"kind": kind, "pairs": len(gaps), "max_level_gap": worst,
                  "mean_level_gap": sum(gaps) / len(gaps) if gaps else float("nan"), "tolerance": tol}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="run directories of one config with different seeds")
    p.add_argument("--config", type=Path, help="train this config once per --seeds first")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--out-dir", type=Path, default=Path("runs/parity-seeds"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="passed to grpo train")
    p.add_argument("-k", type=float, default=2.0, help="tolerance = k x the largest seed-to-seed gap (default 2)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    runs = list(args.runs)
    if args.config:
        runs += train_seeds(args.config, args.seeds, args.out_dir, args.overrides)
    if len(runs) < 2:
        p.error("need at least two runs (or --config with two or more --seeds)")
    res = spread(runs, args.k)
    if args.json:
        print(json.dumps({"runs": [str(r) for r in runs], "k": args.k, "metrics": res}, indent=2))
        return 0
    print(f"{len(runs)} runs, {len(runs) * (len(runs) - 1) // 2} pairs, k = {args.k}")
    print(f"{'metric':24s} {'kind':4s} {'max gap':>10s} {'mean gap':>10s} {'tolerance':>10s}")
    for m, r in res.items():
        print(f"{m:24s} {r['kind']:4s} {r['max_level_gap']:10.4g} {r['mean_level_gap']:10.4g} {r['tolerance']:10.4g}")
    print("\nDEFAULT_TOLERANCES = {")
    for m, r in res.items():
        print(f'    "{m}": Tolerance({r["tolerance"]:g}, {"ABS" if r["kind"] == ABS else "REL"}),')
    print("}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
