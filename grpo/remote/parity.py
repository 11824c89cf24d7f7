"""The parity check: do two runs (local, or pulled from Bedrock with `grpo pull`) train alike?

Both runs' `metrics.jsonl` are aligned by step when their `total_steps` agree, else by fraction of
training (step / total_steps, each curve interpolated onto a common grid). A run that stopped early is
compared over the steps (or the fraction) both have. Per metric: the start, end and mean level of each
run, the largest gap between the two (smoothed) curves and their correlation.

The verdict per metric uses one number, the *level gap*: the largest of |start A - start B|,
|mean A - mean B| and |end A - end B|, where start and end are the means of the first and last 10% of
the overlap (at least one point), so one noisy step decides nothing. Rewards, advantages and the policy
loss (advantage units) are compared in absolute terms; entropy, grad norm and response length depend on
the model's scale, so their gap is divided by the larger of the two levels compared (relative).
The largest gap and the correlation are reported to explain a verdict, not to decide it.

The default tolerances are k x the seed-to-seed spread of local runs of one config (docs/parity.md
says how, scripts/parity_tolerances.py computes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grpo.errors import UserError
from grpo.remote.runs import Run
from grpo.training.metrics import BEDROCK_STEP_METRICS

VAL_METRIC = "val_score_rewards_mean"


ABS, REL = "abs", "rel"


# How a metric's gap is measured when it has no default tolerance entry: abs for [0, 1]-scale metrics.
METRIC_KINDS = {"critic_rewards_mean": ABS, "critic_advantages_mean": ABS, "actor_pg_loss": ABS,
                VAL_METRIC: ABS, "actor_entropy": REL, "actor_grad_norm": REL, "response_length_mean": REL}


EDGE_FRACTION = 0.1  # start / end = mean of this share of the overlap (at least one point)


@dataclass(frozen=True)
class Tolerance:
    value: float
    kind: str  # "abs" or "rel"

    def __str__(self) -> str:
        return f"{self.value:.3g}" if self.kind == ABS else f"{100 * self.value:.3g}%"


# Derived with scripts/parity_tolerances.py --config configs/quickstart.yaml --seeds 0 1 2 3 (k = 2 x the
# largest seed-to-seed level gap over the 6 pairs, floors 0.02 abs / 5% rel; docs/parity.md has the table).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "critic_rewards_mean": Tolerance(0.051, ABS),
    "actor_pg_loss": Tolerance(0.02, ABS),
    "actor_entropy": Tolerance(0.41, REL),
    "actor_grad_norm": Tolerance(0.55, REL),
    "critic_advantages_mean": Tolerance(0.02, ABS),
    "response_length_mean": Tolerance(0.12, REL),
    VAL_METRIC: Tolerance(0.18, ABS),
}


def parse_tolerances(items: list[str]) -> dict[str, Tolerance]:
    """`METRIC=VALUE` keeps the metric's kind; `METRIC=abs:VALUE`, `METRIC=rel:VALUE` or `VALUE%` set it."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        kind = DEFAULT_TOLERANCES[name].kind if name in DEFAULT_TOLERANCES else METRIC_KINDS.get(name, REL)
        if text[:4] in ("abs:", "rel:"):
            kind, text = text[:3], text[4:]
        scale = 1.0
        if text.endswith("%"):
            kind, text, scale = REL, text[:-1], 0.01
        try:
            value = float(text) * scale
        except ValueError:
            value = -1.0
        if not sep or not name or not value >= 0 or not math.isfinite(value):
            raise UserError(f"--tolerance {item!r}: expected METRIC=VALUE with VALUE >= 0, e.g. "
                            "critic_rewards_mean=0.05, actor_grad_norm=30% or actor_entropy=abs:0.1")
        out[name] = Tolerance(value, kind)
    return out


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or len(y) < 3:
        return y
    k = np.ones(w)
    return np.convolve(y, k, "same") / np.convolve(np.ones(len(y)), k, "same")


def align(a: Run, b: Run, metric: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(mode, x, ya, yb): both curves on one grid over their overlap; mode is "step" or "fraction"."""
    mode = "step" if a.total_steps == b.total_steps else "fraction"
    (xa, ya), (xb, yb) = a.series(metric), b.series(metric)
    if mode == "fraction":
        xa, xb = xa / a.total_steps, xb / b.total_steps
    lo, hi = max(xa.min(), xb.min()), min(xa.max(), xb.max())
    if lo > hi:
        return mode, np.array([]), np.array([]), np.array([])
    ina, inb = xa[(xa >= lo) & (xa <= hi)], xb[(xb >= lo) & (xb <= hi)]
    if mode == "step":
        common = np.intersect1d(ina, inb)
        grid = common if len(common) == max(len(ina), len(inb)) else np.union1d(ina, inb)
    else:
        grid = np.linspace(lo, hi, max(1, min(len(ina), len(inb)))) if hi > lo else np.array([lo])
    return mode, grid, np.interp(grid, xa, ya), np.interp(grid, xb, yb)


def _gap(x: float, y: float, rel: bool) -> float:
    """|x - y|, or relative: divided by the larger of |x| and |y| (0 when both are 0)."""
    d = abs(x - y)
    return d / max(abs(x), abs(y)) if rel and d > 0 else d


def metric_stats(ya: np.ndarray, yb: np.ndarray, kind: str) -> dict:
    """Levels of both curves and the gaps between them (a relative gap is divided by the larger level)."""
    n = len(ya)
    w = max(1, math.ceil(EDGE_FRACTION * n))
    lv = {"start_a": ya[:w].mean(), "start_b": yb[:w].mean(), "end_a": ya[-w:].mean(), "end_b": yb[-w:].mean(),
          "mean_a": ya.mean(), "mean_b": yb.mean()}
    rel = kind == REL
    sa, sb = _smooth(ya, w), _smooth(yb, w)
    corr = None
    if n >= 3 and sa.std() > 1e-12 and sb.std() > 1e-12:
        corr = float(np.corrcoef(sa, sb)[0, 1])
    gaps = {f"gap_{k}": _gap(lv[f"{k}_a"], lv[f"{k}_b"], rel) for k in ("start", "mean", "end")}
    out = {k: float(v) for k, v in {**lv, **gaps}.items()}
    out.update(points=n, max_gap=float(max(_gap(x, y, rel) for x, y in zip(sa, sb))), corr=corr, kind=kind,
               level_gap=max(gaps.values()))
    return out


def default_metrics(a: Run, b: Run) -> tuple[list[str], list[str]]:
    """The six Bedrock step metrics plus the validation reward, those both runs have; and those skipped."""
    wanted = list(BEDROCK_STEP_METRICS) + [VAL_METRIC]
    both = [m for m in wanted if a.has(m) and b.has(m)]
    skipped = [m for m in wanted if m not in both and (m != VAL_METRIC or a.has(m) or b.has(m))]
    return both, skipped


def compare_runs(a: Run, b: Run, metrics: list[str] | None = None,
                 overrides: dict[str, Tolerance] | None = None) -> dict:
    """The full comparison as a JSON-ready dict: per-metric stats and verdicts, the overall verdict."""
    skipped: list[str] = []
    if metrics is None:
        metrics, skipped = default_metrics(a, b)
    else:
        for m in metrics:
            for run in (a, b):
                if not run.has(m):
                    raise UserError(f"{run.path}: metrics.jsonl has no values of {m!r}")
    tolerances = {**DEFAULT_TOLERANCES, **(overrides or {})}
    unknown = [m for m in metrics if m not in tolerances]
    if unknown:
        raise UserError(f"no default tolerance for {', '.join(unknown)}: give one with --tolerance "
                        f"{unknown[0]}=VALUE (abs:VALUE or VALUE% to choose absolute or relative)")
    results, mode = {}, None
    for m in metrics:
        m_mode, x, ya, yb = align(a, b, m)
        mode = mode or m_mode
        tol = tolerances[m]
        if not len(x):
            results[m] = {"verdict": "no overlap", "tolerance": tol.value, "kind": tol.kind, "points": 0}
            continue
        s = metric_stats(ya, yb, tol.kind)
        s.update(tolerance=tol.value, x_first=float(x[0]), x_last=float(x[-1]),
                 verdict="within" if s["level_gap"] <= tol.value else "outside")
        results[m] = s
    if not results:
        raise UserError(f"{a.path} and {b.path} have none of the default metrics in common; name some with --metrics")
    failing = [m for m, r in results.items() if r["verdict"] != "within"]
    report = {"run_a": _run_info(a), "run_b": _run_info(b), "alignment": mode or "step",
              "overlap": _overlap_text(a, b, mode or "step"), "metrics": results, "skipped": skipped,
              "failing": failing, "verdict": "within" if not failing else "outside"}
    return report


def _run_info(r: Run) -> dict:
    return {"path": str(r.path), "label": r.label, "steps": r.last_step, "total_steps": r.total_steps,
            "stopped_early": r.last_step < r.total_steps}


def _overlap_text(a: Run, b: Run, mode: str) -> str:
    early = [f"{r.label} stopped at step {r.last_step}/{r.total_steps}" for r in (a, b) if r.last_step < r.total_steps]
    if mode == "step":
        text = f"aligned by step: steps {max(a.rows[0]['step'], b.rows[0]['step'])}-{min(a.last_step, b.last_step)} of {a.total_steps}"
    else:
        lo = max(a.rows[0]["step"] / a.total_steps, b.rows[0]["step"] / b.total_steps)
        hi = min(a.last_step / a.total_steps, b.last_step / b.total_steps)
        text = (f"aligned by fraction of training ({a.label}: {a.total_steps} steps, {b.label}: {b.total_steps}): "
                f"{lo:.2f}-{hi:.2f}")
    return text + (f"; {'; '.join(early)}, so only the overlap is compared" if early else "")


def _fmt(v, kind: str = ABS) -> str:
    if v is None:
        return "n/a"
    if kind == REL:
        return f"{100 * v:.1f}%"
    return f"{v:.4g}"


def format_report(report: dict) -> str:
    """A plain-text table and the overall verdict line."""
    a, b = report["run_a"], report["run_b"]
    lines = [f"parity: A = {a['path']}  B = {b['path']}", report["overlap"], ""]
    head = ("metric", "start A", "start B", "end A", "end B", "mean A", "mean B", "max gap", "corr", "gap", "tol", "verdict")
    rows = []
    for m, r in report["metrics"].items():
        if "level_gap" not in r:
            rows.append((m, *["-"] * 8, "-", _fmt(r["tolerance"], r["kind"]), r["verdict"]))
            continue
        k = r["kind"]
        rows.append((m, *(_fmt(r[f]) for f in ("start_a", "start_b", "end_a", "end_b", "mean_a", "mean_b")),
                     _fmt(r["max_gap"], k), "n/a" if r["corr"] is None else f"{r['corr']:+.2f}",
                     _fmt(r["level_gap"], k), _fmt(r["tolerance"], k), r["verdict"].upper() if r["verdict"] != "within" else "ok"))
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    fmt_row = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines += [fmt_row(head), "  ".join("-" * w for w in widths), *map(fmt_row, rows), ""]
    lines.append("gap: the largest of the start, mean and end gaps (relative ones in % of the larger level); "
                 "start/end: first/last 10% of the overlap")
    if report["skipped"]:
        lines.append(f"not compared (not in both runs): {', '.join(report['skipped'])}")
    for key in ("run_a", "run_b"):
        alarms = report.get("alarms", {}).get(key)
        if alarms:
            lines.append(f"health alarms in {report[key]['label']}: " + ", ".join(f"{x['name']}@{x['step']}" for x in alarms))
    n = len(report["metrics"])
    if report["verdict"] == "within":
        lines.append(f"verdict: WITHIN tolerance ({n}/{n} metrics)")
    else:
        lines.append(f"verdict: OUTSIDE tolerance ({len(report['failing'])}/{n} metrics: {', '.join(report['failing'])})")
    return "\n".join(lines)


def plot_comparison(a: Run, b: Run, report: dict, out: Path, alarms: dict | None = None) -> Path:
    """One panel per compared metric, both runs on each, outside-the-overlap shaded, verdict in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from grpo.remote.plot import TITLES, save_figure

    metrics = list(report["metrics"])
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.3 * nrows), squeeze=False)
    frac = report["alignment"] == "fraction"
    for ax, m in zip(axes.flat, metrics):
        r = report["metrics"][m]
        for i, run in enumerate((a, b)):
            x, y = run.series(m)
            x = x / run.total_steps if frac else x
            style = dict(marker="o", ms=3, ls="--") if m == VAL_METRIC else {}
            ax.plot(x, y, color=f"C{i}", lw=1.3, label=run.label, **style)
            for alarm in (alarms or {}).get(run.label, []):
                ax.axvline(alarm.step / run.total_steps if frac else alarm.step, color=f"C{i}", ls=":", lw=1, alpha=0.8)
        if "x_last" in r:
            lo, hi = ax.get_xlim()
            if r["x_last"] < hi:
                ax.axvspan(r["x_last"], hi, color="0.85", alpha=0.6, lw=0)
            if r["x_first"] > lo:
                ax.axvspan(lo, r["x_first"], color="0.85", alpha=0.6, lw=0)
            ax.set_xlim(lo, hi)
            verdict = f"{r['verdict']}: gap {_fmt(r['level_gap'], r['kind'])} / tol {_fmt(r['tolerance'], r['kind'])}"
        else:
            verdict = r["verdict"]
        ax.set_title(f"{TITLES.get(m, m)}\n{verdict}", fontsize=9,
                     color="tab:green" if r["verdict"] == "within" else "tab:red")
        ax.set_xlabel("fraction of training" if frac else "step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"parity: {a.label} vs {b.label}: {report['verdict'].upper()} tolerance", fontsize=11)
    return save_figure(fig, out)
