"""Draw docs/loop.png: one GRPO step as this engine runs it, and the commands around it.

    python scripts/draw_loop.py [--out docs/loop.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, title, detail)
    "data": (0.16, 0.78, "prompts", "Bedrock RFT JSONL\ngrpo data convert / validate"),
    "sample": (0.50, 0.78, "sample G responses", "the policy (LoRA) samples\neach prompt G times"),
    "reward": (0.84, 0.78, "reward handler", "your Lambda handler\n(the same file Bedrock runs)"),
    "adv": (0.84, 0.36, "group advantages", "(r - mean) / std\nwithin each prompt's G"),
    "update": (0.50, 0.36, "clipped update", "PPO-clip loss + KL to base\none optimizer step"),
    "metrics": (0.16, 0.36, "metrics", "metrics.jsonl, TensorBoard,\nconsole: Bedrock's names"),
}
ARROWS = [("data", "sample"), ("sample", "reward"), ("reward", "adv"), ("adv", "update"), ("update", "metrics"),
          ("update", "sample")]


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9.6, 4.2), dpi=110)
    ax.set_xlim(0, 1)
    ax.set_ylim(0.05, 1.0)
    ax.axis("off")
    w, h = 0.27, 0.2
    for x, y, title, detail in BOXES.values():
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.012", fc="#eef3fb",
                                    ec="#3a6fb0", lw=1.4))
        ax.text(x, y + 0.045, title, ha="center", va="center", fontsize=11.5, weight="bold", color="#1d3b66")
        ax.text(x, y - 0.035, detail, ha="center", va="center", fontsize=8.6, color="#333333")
    for a, b in ARROWS:
        (xa, ya), (xb, yb) = BOXES[a][:2], BOXES[b][:2]
        if ya == yb:
            start, end = (xa + w / 2 * (1 if xb > xa else -1), ya), (xb - w / 2 * (1 if xb > xa else -1), yb)
        else:
            start, end = (xa, ya + h / 2 * (1 if yb > ya else -1)), (xb, yb - h / 2 * (1 if yb > ya else -1))
        color = "#c0392b" if (a, b) == ("update", "sample") else "#3a6fb0"
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, lw=1.6, color=color,
                                     connectionstyle="arc3,rad=0"))
    ax.text(0.52, 0.57, "next step:\nthe updated policy", ha="left", va="center", fontsize=8.6, color="#c0392b")
    ax.text(0.5, 0.12, "grpo train JOB.yaml  (one step, repeated; early stopping on validation reward)   |   "
            "the same YAML: grpo submit -> Bedrock", ha="center", va="center", fontsize=9, color="#555555")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "loop.png")
    draw(ap.parse_args().out)
