"""Plot a tool-calling run (configs/tools.yaml): validation reward and the share of trajectories that call a tool,
per step, from the run's metrics.jsonl and its baseline event.

    python scripts/plot_tools_run.py runs/tools [--out docs/tools.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="run directory (metrics.jsonl, events.jsonl)")
    ap.add_argument("--out", type=Path, default=Path("docs/tools.png"), help="PNG to write")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (a.run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    base = next((e["data"] for e in map(json.loads, (a.run / "events.jsonl").read_text().splitlines())
                 if e.get("message", "").startswith("Baseline validation reward")), {})
    steps = [r["step"] for r in rows]
    val = [(0, base["val_score_rewards_mean"])] if "val_score_rewards_mean" in base else []
    val += [(r["step"], r["val_score_rewards_mean"]) for r in rows if "val_score_rewards_mean" in r]
    vcall = [(0, base["val_tools_call_ratio"])] if "val_tools_call_ratio" in base else []
    vcall += [(r["step"], r["val_tools_call_ratio"]) for r in rows if "val_tools_call_ratio" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["critic_score_mean"] for r in rows], label="training reward (critic_score_mean)", alpha=0.6)
    ax1.plot(*zip(*val), "o-", label="validation reward (val_score_rewards_mean)")
    ax1.set_xlabel("step")
    ax1.set_ylim(0, 1)
    ax1.set_title("reward (final answer right)")
    ax1.legend(loc="lower right")
    ax2.plot(steps, [r["tools_call_ratio"] for r in rows], label="training: trajectories calling a tool", alpha=0.6)
    if vcall:
        ax2.plot(*zip(*vcall), "o-", label="validation: trajectories calling a tool")
    ax2.plot(steps, [r["response_tool_call_parse_error_ratio"] for r in rows], label="malformed calls", alpha=0.6)
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    ax2.set_title("tool use")
    ax2.legend(loc="center right")
    fig.suptitle(f"grpo:tiny-tools + envs/calculator.py ({a.run})")
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
