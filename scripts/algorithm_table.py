"""The learning table and picture of docs/algorithms.md from the preset runs and the dynamic-sampling comparison.

Each run is a `grpo train` run directory (metrics.jsonl, summary.json): the quickstart for 30 steps with
validation at steps 0/10/20/30 (runs/learn/<preset>, runs/learn/{grpo_seed1,ds_seed0,ds_seed1}; the commands are
in docs/algorithms.md). Prints the two markdown tables and writes the curves picture.

    python scripts/algorithm_table.py runs/learn --out docs/algorithms.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PRESETS = ("grpo", "dapo", "dr_grpo", "gspo", "cispo", "rloo", "reinforce_pp", "gpg")
DS = {"GRPO": ("grpo", "grpo_seed1"), "GRPO + dynamic sampling": ("ds_seed0", "ds_seed1")}


def load(run: Path) -> dict | None:
    if not (run / "metrics.jsonl").is_file():
        return None
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    val = {0: summary.get("baseline_val_score_rewards_mean")}
    for r in rows:
        if "val_score_rewards_mean" in r:
            val[r["step"]] = r["val_score_rewards_mean"]
    secs = [r["timing_s_step"] for r in rows]
    testing = [r.get("timing_s_testing", 0.0) for r in rows]
    return {"rows": rows, "val": val, "sec_per_step": sum(secs) / len(secs) if secs else math.nan,
            "elapsed": [sum(secs[:i + 1]) + sum(testing[:i + 1]) for i in range(len(secs))], "train_s": sum(secs)}


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else math.nan


def fmt(x, d=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG of the curves")
    p.add_argument("--seconds-from", type=Path, default=None, metavar="DIR",
                   help="the presets' seconds per step from these runs (the same seeded runs repeated on a quiet "
                        "machine: scripts/run_algorithm_table.sh with OUT=DIR); their validation rewards must equal "
                        "ROOT's, or the table says so")
    a = p.parse_args()
    runs = {name: load(a.root / name) for name in (*PRESETS, "grpo_seed1", "ds_seed0", "ds_seed1")}
    quiet = {name: load(a.seconds_from / name) for name in PRESETS} if a.seconds_from else {}

    print(f"| preset | val @0 | @10 | @20 | @30 | s/step{f' (from {a.seconds_from})' if quiet else ''} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in PRESETS:
        r = runs[name]
        if r is None:
            print(f"| {name} | not run | | | | |")
            continue
        v, secs = r["val"], r["sec_per_step"]
        if quiet:
            q = quiet.get(name)
            secs = q["sec_per_step"] if q else math.nan
            if q and q["val"] != v:
                secs_note = f" (rerun's validation differs: {q['val']})"
                print(f"<!-- {name}{secs_note} -->")
        print(f"| {name} | {fmt(v.get(0))} | {fmt(v.get(10))} | {fmt(v.get(20))} | {fmt(v.get(30))} | {fmt(secs, 1)} |")

    print()
    print("| run | seed | tied groups sampled (mean/step) | tied groups trained | generation rounds (mean, max) | cap hit (steps) "
          "| val @0/10/20/30 | train s | val gain per 100 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, names in DS.items():
        for seed, name in enumerate(names):
            r = runs[name]
            if r is None:
                print(f"| {label} | {seed} | not run | | | | | | |")
                continue
            rows, v = r["rows"], r["val"]
            before = mean([x.get("dynamic_sampling_frac_tied_before", x["critic_frac_reward_zero_std"]) for x in rows])
            after = mean([x["critic_frac_reward_zero_std"] for x in rows])
            rounds = [x.get("train_num_gen_batches", 1.0) for x in rows]
            caps = sum(int(x.get("dynamic_sampling_cap_hit", 0)) for x in rows)
            gain = (v.get(30, math.nan) - v.get(0, math.nan)) / r["train_s"] * 100 if r["train_s"] else math.nan
            vals = "/".join(fmt(v.get(s), 2) for s in (0, 10, 20, 30))
            print(f"| {label} | {seed} | {fmt(before, 2)} | {fmt(after, 2)} | {fmt(mean(rounds), 2)}, {max(rounds):.0f} | "
                  f"{caps} | {vals} | {r['train_s']:.0f} | {fmt(gain, 3)} |")

    if a.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(13, 3.6), dpi=72)
        for name in PRESETS:
            r = runs[name]
            if r:
                steps = sorted(r["val"])
                ax[0].plot(steps, [r["val"][s] for s in steps], marker="o", label=name)
        ax[0].set(title="presets: validation reward (seed 0)", xlabel="step", ylabel="val_score_rewards_mean")
        ax[0].legend(fontsize=7, ncol=2)
        for (label, names), color in zip(DS.items(), ("tab:blue", "tab:red")):
            for seed, name in enumerate(names):
                r = runs[name]
                if not r:
                    continue
                steps = sorted(r["val"])
                style = "-" if seed == 0 else "--"
                ax[1].plot(steps, [r["val"][s] for s in steps], style, color=color, marker="o", label=f"{label}, seed {seed}")
                t = [0.0] + [r["elapsed"][s - 1] for s in steps if s > 0]
                ax[2].plot(t, [r["val"][s] for s in steps], style, color=color, marker="o", label=f"{label}, seed {seed}")
        ax[1].set(title="dynamic sampling: per step", xlabel="step")
        ax[2].set(title="per second (as the runs were timed)", xlabel="seconds of training and validation")
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.out)
        print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
