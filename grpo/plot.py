"""The walkthrough's six panels from a run's metrics.jsonl (reward, pg loss, entropy, grad norm,
advantages, response length), with the validation reward on the reward panel."""

from __future__ import annotations

from pathlib import Path

from grpo.errors import UserError
from grpo.metrics import BEDROCK_STEP_METRICS, read_jsonl

TITLES = {
    "critic_rewards_mean": "reward (critic_rewards_mean)",
    "actor_pg_loss": "policy loss (actor_pg_loss)",
    "actor_entropy": "entropy (actor_entropy)",
    "actor_grad_norm": "grad norm (actor_grad_norm)",
    "critic_advantages_mean": "advantages (critic_advantages_mean)",
    "response_length_mean": "response length (response_length_mean)",
}


def plot_runs(runs: list[tuple[str, list[dict]]], out: Path, *, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, key in zip(axes.flat, BEDROCK_STEP_METRICS):
        for label, rows in runs:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label if len(runs) > 1 else "train", lw=1.4)
            if key == "critic_rewards_mean":
                val = [(r["step"], r["val_score_rewards_mean"]) for r in rows if r.get("val_score_rewards_mean") is not None]
                if val:
                    ax.plot(*zip(*val), "o--", ms=3, label=f"{label} validation" if len(runs) > 1 else "validation")
        ax.set_title(TITLES[key], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "critic_rewards_mean":
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise UserError(f"{run_dir}: no metrics.jsonl with any step in it (is this a run directory?)")
    return plot_runs([(run_dir.name, rows)], out or run_dir / "metrics.png", title=run_dir.name)
