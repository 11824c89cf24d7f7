"""What the console's pages show of runs: chart series, health alarms, step counts, `grpo compare`'s report.

Everything is read under the server's state directory: a job's run is `jobs/<job id>/run` (the id is looked
up in the store first), a pulled run is `runs/<name>` (a plain name; the directory and the files read from
it must resolve inside the state directory, so a symlink cannot point the console elsewhere). Paths on the
server's disk never reach a page: messages name the state directory `$STATE`.

numpy (for the compare report) and the health scan are imported when a page asks, never at server start.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path

from grpo.api import jobs as J
from grpo.api.errors import ApiError, bad_request, not_found
from grpo.api.store import Store
from grpo.errors import UserError
from grpo.rundir import RunDir
from grpo.training.metrics import BEDROCK_STEP_METRICS

RUNS = "runs"  # pulled run directories: <state dir>/runs/<name>
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
VAL_METRIC = "val_score_rewards_mean"  # grpo.remote.parity.VAL_METRIC (imported lazily there)
HANDLER_METRIC = re.compile(r"^reward_(?P<name>.+)_mean$")
MAX_HANDLER_METRICS = 12
TAIL_BYTES = 1 << 16
MAX_CONFIG_BYTES = 256 << 10
SAMPLES_TAIL_BYTES = 1 << 20  # the samples view reads the last MiB of samples.jsonl
MAX_SAMPLES_SHOWN = 16
MAX_TEXT_CHARS = 4000  # per message text on the page (the file keeps all of it)


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class RunReader:
    """Reads runs for the console, caching each run's chart data until its files change."""

    def __init__(self, store: Store, handlers_dir: Path):
        self.store = store
        self.root = Path(os.path.realpath(store.root))
        self.handlers = os.path.realpath(handlers_dir)
        self._cache: dict[str, tuple[tuple, dict]] = {}
        self._lock = threading.Lock()

    # -- paths -------------------------------------------------------------------------------
    def hide_paths(self, text: str) -> str:
        """Server paths out of a message or a config: the state dir as $STATE, handlers as $HANDLERS."""
        return text.replace(str(self.root), "$STATE").replace(self.handlers, "$HANDLERS")

    def _inside(self, path: Path) -> bool:
        return Path(os.path.realpath(path)).is_relative_to(self.root)

    def job(self, job_id: str) -> dict:
        job = self.store.get_job(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_not_found", "fine_tuning_job_id")
        return job

    def pulled_run(self, name: str) -> Path:
        if not RUN_NAME.match(name):
            raise bad_request(f"run: {name!r} is not a run name (letters, digits, '.', '_', '-'; a directory "
                              f"directly under the state directory's {RUNS}/)", "run")
        base = Path(os.path.realpath(self.root / RUNS))
        path = Path(os.path.realpath(base / name))
        if path.parent != base or not path.is_dir():
            raise not_found("run", f"{RUNS}/{name}", "run_not_found", "run")
        return path

    def source(self, spec: str) -> tuple[Path, str]:
        """`job:<job id>` or `run:<name>` -> (run directory, label)."""
        kind, _, ident = (spec or "").partition(":")
        if kind == "job":
            return J.run_dir(self.store, self.job(ident)["id"]), ident
        if kind == "run":
            return self.pulled_run(ident), f"{RUNS}/{ident}"
        raise bad_request(f"expected job:<job id> or run:<name>, got {spec!r}", "run")

    def _files(self, run: Path) -> list[Path]:
        files = [RunDir(run).metrics, RunDir(run).summary, RunDir(run).config]
        for f in files:
            if f.exists() and not self._inside(f):
                raise ApiError(403, f"{self.hide_paths(str(f))} resolves outside the state directory; the console "
                                    "reads nothing there", param="run", code="outside_state_dir")
        return files

    # -- listings ----------------------------------------------------------------------------
    def last_step(self, run: Path) -> tuple[int | None, int | None]:
        """(step, total_steps) of the last metrics line, read from the file's tail."""
        path = RunDir(run).metrics
        if not self._inside(path):
            return None, None
        try:
            lines = _tail_lines(path, TAIL_BYTES)
        except OSError:
            return None, None
        for line in reversed(lines):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                total = row.get("total_steps")
                return row["step"], total if isinstance(total, int) else None
        return None, None

    def job_row(self, job: dict) -> dict:
        step, total = self.last_step(J.run_dir(self.store, job["id"]))
        return {**J.job_object(job), "started_at": job.get("started_at"), "step": step, "total_steps": total}

    def pulled_runs(self) -> list[dict]:
        base = self.root / RUNS
        try:
            entries = sorted(os.scandir(base), key=lambda e: e.name)
        except OSError:
            return []
        out = []
        for e in entries:
            if not RUN_NAME.match(e.name):
                continue
            try:
                path = self.pulled_run(e.name)
            except ApiError:
                continue
            if RunDir(path).metrics.is_file() and self._inside(RunDir(path).metrics):
                step, total = self.last_step(path)
                out.append({"name": e.name, "step": step, "total_steps": total})
        return out

    def config_text(self, job_id: str) -> str:
        path = J.job_dir(self.store, job_id) / "job.yaml"
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_CONFIG_BYTES).decode("utf-8", "replace")
        except OSError:
            return ""
        return self.hide_paths(text)

    # -- chart data ----------------------------------------------------------------------------
    @staticmethod
    def _baseline(run: Path) -> float | None:
        """The base model's validation reward (the trainer's step-0 event, near the top of events.jsonl),
        for a run whose summary.json is not written yet."""
        try:
            with open(RunDir(run).events, "rb") as f:
                head = f.read(TAIL_BYTES).decode("utf-8", "replace").splitlines()
        except OSError:
            return None
        for line in head:
            try:
                data = json.loads(line).get("data")
            except (ValueError, AttributeError):
                continue
            if isinstance(data, dict) and data.get("step") == 0 and _num(data.get(VAL_METRIC)) is not None:
                return _num(data[VAL_METRIC])
        return None

    def _load(self, run: Path, label: str):
        from grpo.remote.runs import health_alarms, load_run

        try:
            r = load_run(run, label=label)
            if r.summary.get("baseline_val_score_rewards_mean") is None and self._inside(RunDir(run).events):
                r.summary["baseline_val_score_rewards_mean"] = self._baseline(run)
            return r, health_alarms(r)
        except UserError as e:
            raise ApiError(400, self.hide_paths(str(e)), param="run", code="invalid_run") from None

    @staticmethod
    def series(run) -> dict:
        """Columns for the charts: steps, the six step metrics, validation reward (the base model's at step
        0 when the run has it), the handler's own `reward_<name>_mean` metrics (null where a step has none)."""
        handler = sorted({k for r in run.rows for k in r if HANDLER_METRIC.match(k) and k != "reward_score_mean"})
        keys = [*BEDROCK_STEP_METRICS, VAL_METRIC, *handler[:MAX_HANDLER_METRICS]]
        rows = run.rows
        base = _num(run.summary.get("baseline_val_score_rewards_mean"))
        if base is not None and rows[0]["step"] > 0:
            rows = [{"step": 0, VAL_METRIC: base}, *rows]
        return {"label": run.label, "total_steps": run.total_steps, "steps": [r["step"] for r in rows],
                "series": {k: [_num(r.get(k)) for r in rows] for k in keys},
                "reward_metrics": handler[:MAX_HANDLER_METRICS]}

    def chart_data(self, job_id: str) -> dict:
        """The job's chart columns and health alarms; empty before its first step."""
        run = J.run_dir(self.store, self.job(job_id)["id"])
        files = self._files(run)
        if not files[0].is_file():
            return {"label": job_id, "total_steps": None, "steps": [], "series": {}, "reward_metrics": [], "alarms": []}
        key = tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else None for f in files)
        with self._lock:
            hit = self._cache.get(job_id)
        if hit and hit[0] == key:
            return hit[1]
        r, alarms = self._load(run, job_id)
        out = {**self.series(r), "alarms": [_alarm(a) for a in alarms]}
        with self._lock:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[job_id] = (key, out)
        return out

    def samples(self, job_id: str, step: int | None = None) -> dict:
        """A logged step's samples (samples.jsonl: engine.log_samples per step), the last one unless `step` is given,
        each with its trajectory's turns (`messages`: assistant turns with their tool calls, tool results) or its
        response; {"steps": the steps in the file's last MiB, "step", "samples"}."""
        path = RunDir(J.run_dir(self.store, self.job(job_id)["id"])).samples
        if not path.is_file():
            return {"steps": [], "step": None, "samples": []}
        if not self._inside(path):
            raise ApiError(403, "samples.jsonl resolves outside the state directory; the console reads nothing there",
                           param="job", code="outside_state_dir")
        by_step: dict[int, list[dict]] = {}
        for line in _tail_lines(path, SAMPLES_TAIL_BYTES):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                by_step.setdefault(row["step"], []).append(row)
        steps = sorted(by_step)
        if not steps:
            return {"steps": [], "step": None, "samples": []}
        if step is None or step not in by_step:
            step = steps[-1]
        return {"steps": steps, "step": step, "samples": [_sample(r) for r in by_step[step][:MAX_SAMPLES_SHOWN]]}

    def compare(self, spec_a: str, spec_b: str) -> dict:
        """`grpo compare A B`'s report (with both runs' health alarms) and both runs' chart columns."""
        from grpo.remote.parity import compare_runs

        (pa, la), (pb, lb) = self.source(spec_a), self.source(spec_b)
        self._files(pa), self._files(pb)
        (a, alarms_a), (b, alarms_b) = self._load(pa, la), self._load(pb, lb)
        if a.label == b.label:
            b.label += " (B)"
        try:
            report = compare_runs(a, b)
        except UserError as e:
            raise ApiError(400, self.hide_paths(str(e)), code="invalid_run") from None
        report["alarms"] = {"run_a": [_alarm(x) for x in alarms_a], "run_b": [_alarm(x) for x in alarms_b]}
        for key, run in (("run_a", a), ("run_b", b)):
            report[key]["path"] = run.label
        return {"report": J.finite(report), "a": self.series(a), "b": self.series(b)}


def _tail_lines(path: Path, limit: int) -> list[str]:
    """The whole lines among a file's last `limit` bytes (a line cut by the limit is left out)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        lines = f.read().decode("utf-8", "replace").splitlines()
    return lines[1:] if size > limit else lines


def _text(v) -> str | None:
    if v is None:
        return None
    v = v if isinstance(v, str) else json.dumps(v)
    return v if len(v) <= MAX_TEXT_CHARS else v[:MAX_TEXT_CHARS] + f" [... {len(v) - MAX_TEXT_CHARS} more characters]"


def _turn(m) -> dict | None:
    """One message of a trajectory for the page: role, content, reasoning, tool calls (name, arguments), the tool
    result's name and call id; strings only, each cut at MAX_TEXT_CHARS."""
    if not isinstance(m, dict):
        return None
    calls = []
    for c in m.get("tool_calls") or []:
        fn = c.get("function") if isinstance(c, dict) else None
        if isinstance(fn, dict):
            calls.append({"id": _text(c.get("id")), "name": _text(fn.get("name")), "arguments": _text(fn.get("arguments"))})
    return {"role": _text(m.get("role")), "content": _text(m.get("content")), "reasoning": _text(m.get("reasoning_content")),
            "tool_calls": calls, "name": _text(m.get("name")), "tool_call_id": _text(m.get("tool_call_id"))}


def _sample(row: dict) -> dict:
    turns = row.get("messages")
    if isinstance(turns, list) and turns:
        turns = [t for t in map(_turn, turns) if t]
    else:  # single turn without tools: the response is the one assistant turn
        turns = [_turn({"role": "assistant", "content": row.get("response"), "reasoning_content": row.get("reasoning_content")})]
    return {"id": _text(row.get("id")), "sample": row.get("sample") if isinstance(row.get("sample"), int) else None,
            "score": _num(row.get("score")), "truncated": bool(row.get("truncated")), "prompt": _text(row.get("prompt")),
            "turns": turns}


def _alarm(a) -> dict:
    return {"name": a.name, "step": a.step, "level": a.level, "message": a.message}

