"""Reading a run directory (local, or pulled from Bedrock with `grpo pull`): its metrics, summary, the health
thresholds it ran with and the alarms they raise. `grpo plot`, `grpo compare` and the console read runs here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grpo.errors import UserError
from grpo.health_thresholds import HealthThresholds
from grpo.rundir import RunDir, read_jsonl
from grpo.training.health import scan


@dataclass
class Run:
    path: Path
    label: str
    rows: list[dict]
    total_steps: int
    summary: dict = field(default_factory=dict)

    @property
    def last_step(self) -> int:
        return int(self.rows[-1]["step"])

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["step"], r[metric]) for r in self.rows if isinstance(r.get(metric), (int, float))
               and not isinstance(r.get(metric), bool) and math.isfinite(r[metric])]
        arr = np.asarray(pts, dtype=float).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    def has(self, metric: str) -> bool:
        return len(self.series(metric)[0]) > 0


def read_json_object(path: Path, what: str) -> dict:
    """A run file holding one JSON object; anything else is a UserError naming the file (and line)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected {what}, got {type(value).__name__}")
    return value


def load_run(path: str | Path, label: str | None = None) -> Run:
    """A run directory's metrics (one row per step, sorted, the last row of a repeated step wins) and
    summary; `grpo plot` and `grpo compare` both read runs with it. A file that cannot be read is a
    UserError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    by_step: dict[int, dict] = {}
    try:
        rows = read_jsonl(RunDir(path).metrics)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{RunDir(path).metrics}: cannot read it: {e}") from None
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    if not by_step:
        raise UserError(f"{path}: no metrics.jsonl with any step in it (is this a run directory? "
                        "`grpo pull JOB --out DIR` makes one from a remote job)")
    rows = [by_step[s] for s in sorted(by_step)]
    summary = {}
    if RunDir(path).summary.is_file():
        summary = read_json_object(RunDir(path).summary, "a JSON object")
    totals = [r["total_steps"] for r in rows if isinstance(r.get("total_steps"), int)]
    planned = summary.get("total_steps")
    total = totals[-1] if totals else planned if isinstance(planned, int) and planned > 0 else rows[-1]["step"]
    return Run(path, label or path.name, rows, int(total), summary)


def run_thresholds(run_dir: str | Path):
    """The thresholds a run was configured with (`engine.health` of its config.json, which the trainer
    writes), else the defaults. UserError naming the file when it is not valid JSON or its thresholds
    are not valid ones."""
    from dataclasses import fields


    path = RunDir(Path(run_dir)).config
    if not path.is_file():
        return HealthThresholds()
    cfg = read_json_object(path, "a JSON object (the run's config)")
    engine = cfg.get("engine")
    health = engine.get("health") if isinstance(engine, dict) else None
    if health is None:
        return HealthThresholds()
    if not isinstance(health, dict):
        raise UserError(f"{path}: engine.health: expected an object, got {type(health).__name__}")
    unknown = sorted(set(health) - {f.name for f in fields(HealthThresholds)})
    if unknown:
        raise UserError(f"{path}: engine.health: unknown field(s) {', '.join(unknown)}")
    try:
        return HealthThresholds(**health)
    except ValueError as e:  # names the field: engine.health.window: must be >= 1, got 0
        raise UserError(f"{path}: {e}") from None
    except TypeError as e:  # a value of the wrong type ("10" < 1)
        raise UserError(f"{path}: engine.health: {e}") from None


def health_alarms(run: Run) -> list:
    """The run's health alarms (grpo.training.health.scan), with the thresholds it ran with when it says."""

    return scan(run.rows, baseline_val=run.summary.get("baseline_val_score_rewards_mean"),
                thresholds=run_thresholds(run.path))
