"""Plot a tool-calling run (configs/tools.yaml): validation reward and the share of trajectories that call a tool,
per step, from the run's metrics.jsonl and its baseline event.

    python scripts/plot_tools_run.py runs/tools_seed0 runs/tools_seed1 [--out docs/tools.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(run: Path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    base = next((e["data"] for e in map(json.loads, (run / "events.jsonl").read_text().splitlines())
                 if e.get("message", "").startswith("Baseline validation reward")), {})
    val = [(0, base["val_score_rewards_mean"])] if "val_score_rewards_mean" in base else []
    val += [(r["step"], r["val_score_rewards_mean"]) for r in rows if "val_score_rewards_mean" in r]
    vcall = [(0, base["val_tools_call_ratio"])] if "val_tools_call_ratio" in base else []
    vcall += [(r["step"], r["val_tools_call_ratio"]) for r in rows if "val_tools_call_ratio" in r]
    return rows, val, vcall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run directories (metrics.jsonl, events.jsonl), e.g. one per seed")
    ap.add_argument("--out", type=Path, default=Path("docs/tools.png"), help="PNG to write")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, run in enumerate(a.runs):
        rows, val, vcall = _load(run)
        steps = [r["step"] for r in rows]
        c, name = f"C{k}", run.name
        ax1.plot(steps, [r["critic_score_mean"] for r in rows], color=c, alpha=0.35, label=f"{name}: training reward")
        ax1.plot(*zip(*val), "o-", color=c, label=f"{name}: validation reward")
        ax2.plot(steps, [r["tools_call_ratio"] for r in rows], color=c, alpha=0.35, label=f"{name}: training, calls a tool")
        if vcall:
            ax2.plot(*zip(*vcall), "o-", color=c, label=f"{name}: validation, calls a tool")
        ax2.plot(steps, [r["response_tool_call_parse_error_ratio"] for r in rows], ":", color=c,
                 label=f"{name}: malformed calls")
    for ax, title in ((ax1, "reward (final answer right)"), (ax2, "tool use")):
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.legend(loc="center right", fontsize=7)
    fig.suptitle("grpo:tiny-tools + envs/calculator.py (configs/tools.yaml)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
