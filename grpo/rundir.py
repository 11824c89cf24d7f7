"""A run directory's layout, owned here: the trainer writes it, and `grpo plot`, `grpo compare`, `grpo pull`
and the server read it.

    <run>/config.json      the job config the run was started with (engine section included)
    <run>/metrics.jsonl    one line per step: Bedrock's metric names (verl's keys, `/` -> `_`)
    <run>/events.jsonl     OpenAI `fine_tuning.job.event` objects, as Bedrock's `list_events` returns them
    <run>/samples.jsonl    a few responses per step, with their scores
    <run>/summary.json     status, steps, baseline/best validation reward, final metrics, adapter path
    <run>/checkpoints/     step-NNNNNN/ (grpo.training.checkpoint)
    <run>/reward_errors.log  a failing handler's own error texts, one JSON line each, when they are withheld from
                           the step's error (engine.reward.error_detail: withheld; grpo serve's jobs)
    <run>/pause.request    present: the trainer checkpoints after its current step and stops, status "paused"
                           (the server's POST /v1/fine_tuning/jobs/{id}/pause writes it; resume removes it)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CONFIG, METRICS, EVENTS, SAMPLES, SUMMARY = "config.json", "metrics.jsonl", "events.jsonl", "samples.jsonl", "summary.json"
PAUSE_REQUEST, REWARD_ERRORS = "pause.request", "reward_errors.log"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory's files (nothing is read or made here)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def events(self) -> Path:
        return self.path / EVENTS

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def reward_errors(self) -> Path:
        return self.path / REWARD_ERRORS

    @property
    def pause_request(self) -> Path:
        return self.path / PAUSE_REQUEST


def make_event(message: str, *, type: str = "message", level: str = "info", data: dict | None = None) -> dict:
    ev = {"object": "fine_tuning.job.event", "id": f"ftevent-{uuid.uuid4().hex[:24]}", "created_at": int(time.time()),
          "level": level, "type": type, "message": message}
    if data is not None:
        ev["data"] = data
    return ev


def _append_lines(path: Path, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write: drop it
                continue
    return rows
