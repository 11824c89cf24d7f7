"""The job worker: a thread in the server that moves jobs validating_files -> queued -> running ->
succeeded | failed (or cancelled; or pausing -> paused -> queued by pause and resume), running each job's
trainer as a subprocess.

The trainer is `python -m grpo.api.runner train <job>/job.yaml --output-dir <job>/run --no-progress`
(`--resume` when the run already has a checkpoint), in its own session, at most `max_jobs` at once
(the rest wait in `queued`, oldest first), on the devices it asked for (`engine.num_processes`; a job
whose devices are busy waits queued, and the jobs behind it too: grpo.api.devices; several processes run
under `accelerate launch` inside the job's group leader). Its events.jsonl is mirrored into SQLite while it runs.
A cancel SIGKILLs the trainer's process group and every process below it (the reward workers lead
groups of their own). When the server stops, running trainers are stopped but stay `running` in
SQLite; the next start re-queues them and they resume from their last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path

from grpo.api import jobs as J
from grpo.api.devices import DevicePool, launch_command
from grpo.api.errors import ApiError
from grpo.api.store import Store
from grpo.rundir import RunDir, make_event, read_jsonl


def descendants(root: int) -> list[int]:
    """Every process below `root` (Linux /proc; elsewhere none are known)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("utf-8", "replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL the process group led by `pid` and every process below it, each one's group too when
    it leads one (never the server's own group)."""
    below = descendants(pid)
    own = os.getpgrp()
    for p in [pid, *below]:
        try:
            pgid = os.getpgid(p)
            if pgid == p and pgid != own:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode("utf-8", "replace").rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_leftover(pid: int, job_id: str, timeout_s: float = 10.0) -> None:
    """A trainer a previous server started for `job_id` (checked on its command line, so a reused pid
    is left alone): kill it and wait until it is gone, before its job resumes."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode("utf-8", "replace")
    except OSError:
        if not os.path.isdir("/proc"):
            time.sleep(1.0)  # no /proc: the runner's own watcher stops it within a fraction of that
        return
    if job_id not in cmd:
        return
    kill_tree(pid)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


class JobManager:
    def __init__(self, store: Store, *, max_jobs: int = 1, poll_s: float = 0.25, env: dict | None = None,
                 devices: DevicePool | None = None, accelerate_config: str | None = None):
        self.store, self.max_jobs, self.poll_s = store, max_jobs, poll_s
        self.devices = devices or DevicePool("cpu", [f"cpu{i}" for i in range(max_jobs)])
        self.accelerate_config = accelerate_config
        self._waiting: set[str] = set()  # queued jobs already told that their devices are busy
        self.env = dict(os.environ if env is None else env)
        self.env.pop("GRPO_API_KEY", None)  # a trainer (and the handlers it starts) never holds the server's key
        self.procs: dict[str, tuple[subprocess.Popen, object]] = {}
        self.lock = threading.RLock()  # status transitions: the worker vs cancel
        self._sync_lock = threading.Lock()
        self._seen: dict[str, tuple | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for job in self.store.jobs_with_status("running", "pausing"):
            if job.get("pid"):
                kill_leftover(job["pid"], job["id"])
            if job["status"] == "pausing":  # stopped before its pause was done: it is paused at its last checkpoint
                self.store.update_job(job["id"], status="paused", pid=None)
                self.store.add_event(job["id"], make_event("The server restarted while the job was pausing; it is "
                                                           "paused and resumes from its last checkpoint"))
                continue
            self.store.update_job(job["id"], status="queued", pid=None)
            self.store.add_event(job["id"], make_event("The server restarted; the job is queued again and will "
                                                       "resume from its last checkpoint"))
        self._thread = threading.Thread(target=self._loop, name="grpo-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker and the trainers; their jobs stay `running`, to resume at the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self.lock:
            for job_id, (proc, log) in list(self.procs.items()):
                kill_tree(proc.pid)
                proc.wait()
                log.close()
                self.sync_events(job_id, force=True)
                self.devices.release(job_id)
            self.procs.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the worker must outlive one bad job; say what happened
                traceback.print_exc()
            self._stop.wait(self.poll_s)

    def tick(self) -> None:
        for job in self.store.jobs_with_status("validating_files"):
            self._validate(job)
        with self.lock:
            for job_id, (proc, log) in list(self.procs.items()):
                self.sync_events(job_id)
                code = proc.poll()
                if code is not None:
                    self._finish(job_id, log, code)
            free = self.max_jobs - len(self.procs)
            for job in self.store.jobs_with_status("queued")[:max(0, free)]:
                if not self._launch(job):
                    break  # its devices are busy: it waits, and so do the jobs behind it (oldest first)

    # -- steps -----------------------------------------------------------------------------
    def _validate(self, job: dict) -> None:
        """validating_files -> queued, or failed naming the file's problems. A file the upload validated
        (all files from this server) is not read again; others (an older server's) are checked here."""
        from grpo.data import validate_file
        from grpo.errors import UserError

        d, problems = J.job_dir(self.store, job["id"]), []
        trusted = set(job.get("validated_at_upload") or ())
        for field, name in (("training_file", "training.jsonl"), ("validation_file", "validation.jsonl")):
            if job.get(field) is None:
                continue
            self.store.add_event(job["id"], make_event(f"Validating {field.replace('_file', '')} file: {job[field]}"))
            if field in trusted:  # the upload validated these very bytes (the job's file links to them)
                continue
            try:
                rep = validate_file(d / name, allow_small=True, keep_records=False)
                problems += [(field, f"{job[field]}:{p.line}: {p.field}: {p.message}" if p.line else
                              f"{job[field]}: {p.field}: {p.message}") for p in rep.problems[:20]]
            except UserError as e:
                problems.append((field, f"{job[field]}: {e}"))
        with self.lock:
            if self.store.get_job(job["id"])["status"] != "validating_files":
                return  # cancelled meanwhile
            if problems:
                message = "invalid data: " + "; ".join(m for _, m in problems)
                self._fail(job["id"], message, code=f"invalid_{problems[0][0]}", param=problems[0][0])
                return
            self.store.update_job(job["id"], status="queued")
            self.store.add_event(job["id"], make_event("Files validated, moving job to queued state"))

    def _place(self, job: dict) -> list[str] | None:
        """The devices for a queued job (None while they are busy, said once in its events)."""
        import yaml

        d = J.job_dir(self.store, job["id"])
        try:
            raw = yaml.safe_load((d / "job.yaml").read_text(encoding="utf-8")) or {}
            n = int((raw.get("engine") or {}).get("num_processes") or 1)
            devices = self.devices.assign(job["id"], n)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            self._fail(job["id"], f"cannot place the job: {e}")
            return None
        if devices is None and job["id"] not in self._waiting:
            self._waiting.add(job["id"])
            self.store.add_event(job["id"], make_event(
                f"Waiting for {n} free {'GPUs' if self.devices.kind == 'cuda' else 'CPU slots'} "
                f"({len(self.devices.free())} of {self.devices.describe()} free)"))
        return devices

    def _launch(self, job: dict) -> bool:
        """Start a queued job's trainer; False when it must keep waiting for devices."""
        from grpo.training.checkpoint import latest_checkpoint

        devices = self._place(job)
        if devices is None:
            return self.store.get_job(job["id"])["status"] != "queued"  # failed to place: the next may go
        self._waiting.discard(job["id"])
        d = J.job_dir(self.store, job["id"])
        run = d / "run"
        RunDir(run).pause_request.unlink(missing_ok=True)
        ckpt = latest_checkpoint(run)
        if ckpt is None and run.exists():  # stopped before its first checkpoint: start over, cleanly
            shutil.rmtree(run)
            self.store.add_event(job["id"], make_event("No checkpoint was saved before the job stopped; "
                                                       "training starts again from step 0"))
        train = ["train", str(d / "job.yaml"), "--output-dir", str(run), "--no-progress"] + (
            ["--resume"] if ckpt is not None else [])
        cmd, placed_env = launch_command(train, self.devices.kind, devices, accelerate_config=self.accelerate_config)
        log = open(d / "train.log", "ab")  # noqa: SIM115 - closed when the trainer ends
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=d, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(self.env, **placed_env, GRPO_SERVER_PID=str(os.getpid())),
                                    start_new_session=True)
        except OSError as e:
            log.close()
            self.devices.release(job["id"])
            self._fail(job["id"], f"could not start the trainer: {e}")
            return True
        self.procs[job["id"]] = (proc, log)
        self.store.add_event(job["id"], make_event(
            f"Placed on {len(devices)} {'GPU' if self.devices.kind == 'cuda' else 'CPU slot'}"
            f"{'s' if len(devices) > 1 else ''}: {','.join(devices)}"))
        self.store.update_job(job["id"], status="running", pid=proc.pid,
                              started_at=job.get("started_at") or int(time.time()))
        return True

    def _finish(self, job_id: str, log, code: int) -> None:
        self.procs.pop(job_id, None)
        self.devices.release(job_id)
        log.close()
        self.sync_events(job_id, force=True)
        job = self.store.get_job(job_id)
        if job["status"] not in ("running", "pausing"):
            return
        try:
            summary = json.loads(RunDir(J.run_dir(self.store, job_id)).summary.read_text())
        except (OSError, ValueError):
            summary = {}
        if code == 0 and summary.get("status") == "paused":
            self.store.update_job(job_id, status="paused", pid=None)
            self.store.add_event(job_id, make_event(f"Fine-tuning job paused after step {summary.get('steps')}; "
                                                    "resume continues from its checkpoint"))
        elif code == 0 and summary.get("status") == "succeeded":
            self.store.update_job(job_id, status="succeeded", fine_tuned_model=J.fine_tuned_model_id(job), pid=None,
                                  trained_tokens=J.trained_tokens(self.store, job_id), finished_at=int(time.time()))
        else:
            self._fail(job_id, J.failure_message(self.store, job_id, code))

    def _fail(self, job_id: str, message: str, *, code: str = "training_failed", param: str | None = None) -> None:
        self.store.update_job(job_id, status="failed", pid=None, finished_at=int(time.time()),
                              error={"code": code, "message": message, "param": param})
        self.store.add_event(job_id, make_event(f"Fine-tuning job failed: {message}", level="error"))

    def cancel(self, job_id: str) -> dict:
        with self.lock:
            job = self.store.get_job(job_id)
            if job["status"] in J.TERMINAL:
                raise ApiError(400, f"Fine-tuning job {job_id} is already {job['status']}; it cannot be cancelled",
                               param="fine_tuning_job_id", code="job_not_cancellable")
            entry = self.procs.pop(job_id, None)
            if entry is not None:
                proc, log = entry
                kill_tree(proc.pid)
                proc.wait()
                log.close()
                self.sync_events(job_id, force=True)
            self.devices.release(job_id)
            self._waiting.discard(job_id)
            job = self.store.update_job(job_id, status="cancelled", pid=None, finished_at=int(time.time()))
            self.store.add_event(job_id, make_event("Fine-tuning job cancelled"))
            return job

    def pause(self, job_id: str) -> dict:
        """queued -> paused; running -> pausing (the trainer checkpoints after its current step and stops, then
        the job is paused). Anything else is a 400."""
        with self.lock:
            job = self.store.get_job(job_id)
            if job["status"] == "queued":
                job = self.store.update_job(job_id, status="paused")
                self._waiting.discard(job_id)  # it holds no devices yet; queued again, it waits anew
                self.store.add_event(job_id, make_event("Fine-tuning job paused before it started"))
            elif job["status"] == "running":
                request = RunDir(J.run_dir(self.store, job_id)).pause_request
                request.parent.mkdir(parents=True, exist_ok=True)
                request.write_text(f"{int(time.time())}\n")
                job = self.store.update_job(job_id, status="pausing")
                self.store.add_event(job_id, make_event("Pausing fine-tuning job: it saves a checkpoint after the "
                                                        "current step and stops"))
            else:
                raise ApiError(400, f"Fine-tuning job {job_id} is {job['status']}; only a queued or running job can "
                               "be paused", param="fine_tuning_job_id", code="job_not_pausable")
            return job

    def resume(self, job_id: str) -> dict:
        """paused -> queued: the worker starts its trainer again with --resume, from the last checkpoint."""
        with self.lock:
            job = self.store.get_job(job_id)
            if job["status"] != "paused":
                raise ApiError(400, f"Fine-tuning job {job_id} is {job['status']}; only a paused job can be resumed"
                               + (" (it is saving its checkpoint: resume once it is paused)" if job["status"] == "pausing"
                                  else ""), param="fine_tuning_job_id", code="job_not_resumable")
            RunDir(J.run_dir(self.store, job_id)).pause_request.unlink(missing_ok=True)
            job = self.store.update_job(job_id, status="queued")
            self.store.add_event(job_id, make_event("Fine-tuning job resumed; it is queued and continues from its "
                                                    "last checkpoint"))
            return job

    def sync_events(self, job_id: str, force: bool = False) -> None:
        """Mirror the run's events.jsonl into SQLite (skipped when the file has not changed)."""
        path = RunDir(J.run_dir(self.store, job_id)).events
        with self._sync_lock:
            try:
                st = path.stat()
                key = (st.st_size, st.st_mtime_ns)
            except OSError:
                key = None
            if not force and job_id in self._seen and self._seen[job_id] == key:
                return
            rows = [r for r in read_jsonl(Path(path)) if isinstance(r, dict) and isinstance(r.get("id"), str)]
            self.store.mirror_events(job_id, rows)
            self._seen[job_id] = key
