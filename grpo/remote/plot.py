"""The walkthrough's six panels from a run's metrics.jsonl (reward, pg loss, entropy, grad norm,
advantages, response length), with the validation reward on the reward panel."""

from __future__ import annotations

from pathlib import Path

from grpo.training.metrics import BEDROCK_STEP_METRICS

TITLES = {
    "critic_rewards_mean": "reward (critic_rewards_mean)",
    "actor_pg_loss": "policy loss (actor_pg_loss)",
    "actor_entropy": "entropy (actor_entropy)",
    "actor_grad_norm": "grad norm (actor_grad_norm)",
    "critic_advantages_mean": "advantages (critic_advantages_mean)",
    "response_length_mean": "response length (response_length_mean)",
}


def plot_runs(runs: list[tuple[str, list[dict]]], out: Path, *, title: str | None = None,
              alarms: dict[str, list] | None = None) -> Path:
    """Six panels; `alarms` (run label -> health alarms) draws a dotted line where each one fired."""
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
        for i, (label, _) in enumerate(runs):
            for a in (alarms or {}).get(label, []):
                ax.axvline(a.step, color=f"C{i}", ls=":", lw=1, alpha=0.8)
                if key == "critic_rewards_mean":
                    ax.annotate(a.name, (a.step, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=6,
                                va="top", ha="right", color=f"C{i}")
        ax.set_title(TITLES[key], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "critic_rewards_mean":
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """Lay out, write the PNG (making its folder), and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """A run directory's panels (default RUN/metrics.png), its health alarms marked. The run is read as
    `grpo compare` reads it (grpo.remote.runs.load_run, health_alarms): a bad file is a UserError naming it."""
    from grpo.remote.runs import health_alarms, load_run

    run = load_run(run_dir, label=Path(run_dir).resolve().name)
    return plot_runs([(run.label, run.rows)], out or run.path / "metrics.png", title=run.label,
                     alarms={run.label: health_alarms(run)})
