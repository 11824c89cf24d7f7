"""Persistent worker processes that run a local Lambda handler file, isolated from the trainer.

Each worker is ``python -m grpo.reward.workers PATH FUNCTION TIMEOUT``: it imports the handler once,
then serves calls over its stdin/stdout pipes until stdin closes. A handler that raises is reported
with its own traceback; one that hangs past the timeout is dumped (faulthandler on SIGUSR1, so the
report shows where it hung), killed and replaced; one that kills the interpreter (``os._exit``,
segfault) is noticed by EOF, reported with its exit status and last output, and replaced. Workers
outlive one ``score()`` call: the runner keeps them for the whole training run.

Wire protocol, both directions: one frame = 1 type byte + 8-byte big-endian length + body.
parent -> worker: ``C`` + the event as JSON bytes (exactly what Lambda would deliver).
worker -> parent: ``R`` ready (JSON info) | ``F`` import failed (JSON error) | ``O`` + the handler's
answer as JSON bytes | ``E`` + JSON ``{"errorType", "errorMessage", "stackTrace"}`` (Lambda's shape).
With the entry ``*tools*`` the worker serves an environment file's functions as tools instead
(grpo.reward.tool_functions: the same isolation, timeouts and failure reports).
The handler's prints (fd 1 and 2) go to a per-worker log file, emptied at the start of every call,
whose tail is quoted when a call fails. This module imports only the standard library.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from grpo.reward.environment import handler_env
from grpo.reward.tool_functions import TOOLS_ENTRY, tool_dispatcher

_HEADER = struct.Struct(">cQ")
TAIL_LINES = 20  # lines of handler output / traceback quoted in a failure


# ----------------------------------------------------------------------------------------- framing
def _write_frame(fd: int, kind: bytes, body: bytes) -> None:
    view = memoryview(_HEADER.pack(kind, len(body)) + body)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """n bytes from fd, None on EOF; raises TimeoutError past the deadline (monotonic)."""
    chunks, got = [], 0
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None = None) -> tuple[bytes, bytes] | None:
    header = _read_exact(fd, _HEADER.size, deadline)
    if header is None:
        return None
    kind, size = _HEADER.unpack(header)
    body = _read_exact(fd, size, None if deadline is None else max(deadline, time.monotonic() + 5))
    return None if body is None else (kind, body)


# ------------------------------------------------------------------------------- worker (child)
class LambdaContext:
    """The attributes and method a Lambda handler's ``context`` has (values like the python runtime:
    ``memory_limit_in_mb`` and ``function_version`` are strings). Local ARN uses account 000000000000."""

    def __init__(self, function_name: str, timeout_s: float, region: str):
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:{region}:000000000000:function:{function_name}"
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self.identity = None
        self.client_context = None
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def _error_body(exc: BaseException, error_type: str | None = None, message: str | None = None) -> bytes:
    import traceback

    frames = traceback.format_tb(exc.__traceback__)[1:]  # drop the worker's own frame
    return json.dumps({
        "errorType": error_type or type(exc).__name__,
        "errorMessage": str(exc) if message is None else message,
        "stackTrace": frames,
    }).encode()


def _watch_parent(parent: int) -> None:
    while True:  # a worker whose trainer died (even while its handler hangs) goes away
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def _decimal_default(obj):
    import decimal

    if isinstance(obj, decimal.Decimal):  # what Lambda's python runtime does with Decimal
        return float(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def worker_main(path: str, function: str, timeout_s: float) -> None:
    import faulthandler
    import importlib.util

    fd_in, fd_out = os.dup(0), os.dup(1)  # the protocol's pipes
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # handler output (prints, C-level writes) -> the log file given as stderr
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    faulthandler.enable(file=sys.stderr, all_threads=False)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=False)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    handler_path = Path(path).resolve()
    name = handler_path.stem if handler_path.stem.isidentifier() else "lambda_function"
    region = os.environ.get("AWS_REGION", "us-west-2")
    started = time.monotonic()
    try:
        sys.path.insert(0, str(handler_path.parent))  # sibling modules import, like Lambda's task root
        spec = importlib.util.spec_from_file_location(name, handler_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if function == TOOLS_ENTRY:  # an environment file: its functions are the tools (grpo.reward.tool_functions)
            handler = tool_dispatcher(module)
        elif not hasattr(module, function):
            raise AttributeError(f"{handler_path} defines no function {function!r}")
        else:
            handler = getattr(module, function)
        if not callable(handler):
            raise TypeError(f"{handler_path}: {function!r} is not callable")
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        _write_frame(fd_out, b"F", _error_body(exc))
        return
    _write_frame(fd_out, b"R", json.dumps({"pid": os.getpid(), "import_s": time.monotonic() - started}).encode())

    while True:
        frame = _read_frame(fd_in)
        if frame is None:
            return  # parent closed the pipe: shut down
        sys.stdout.flush()
        os.ftruncate(2, 0)  # the log holds this call's output only
        context = LambdaContext(name, timeout_s, region)
        try:
            answer = handler(json.loads(frame[1]), context)
        except SystemExit as exc:
            body = _error_body(exc, "Runtime.ExitError",
                               f"RequestId: {context.aws_request_id} Error: Runtime exited with error: "
                               f"exit status {exc.code}")
            _write_frame(fd_out, b"E", body)
            continue
        except BaseException as exc:  # noqa: BLE001
            _write_frame(fd_out, b"E", _error_body(exc))
            continue
        try:
            out = json.dumps(answer, default=_decimal_default).encode()
        except (TypeError, ValueError) as exc:
            _write_frame(fd_out, b"E", _error_body(exc, "Runtime.MarshalError",
                                                   f"Unable to marshal response: {exc}"))
            continue
        _write_frame(fd_out, b"O", out)


# ------------------------------------------------------------------------------ pool (parent side)
@dataclass
class CallOutcome:
    """What one call gave: ``answer`` (JSON bytes) when ``kind`` is None, else a failure."""

    answer: bytes | None = None
    kind: str | None = None  # "error" | "timeout" | "crash"
    message: str = ""


class HandlerLoadError(Exception):
    """The handler file could not be imported (message carries the handler's own error)."""


def format_lambda_error(err: dict) -> str:
    """``errorType: errorMessage`` plus the last lines of the stack trace (Lambda's error payload)."""
    head = f"{err.get('errorType', 'Error')}: {err.get('errorMessage', '')}"
    trace = err.get("stackTrace") or []
    lines = "".join(trace if isinstance(trace, list) else [str(trace)]).rstrip().splitlines()
    return head + ("\n" + "\n".join(lines[-TAIL_LINES:]) if lines else "")


class _Worker:
    def __init__(self, path: str, function: str, timeout_s: float, log_path: Path, env: dict):
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - the child's fd 2, O_APPEND so truncation works
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "grpo.reward.workers", path, function, repr(timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, close_fds=True,
            start_new_session=True,  # its own process group: Ctrl-C goes to the trainer, which closes
        )                            # us; kill() takes the handler's own subprocesses down with it
        self.ready = False

    def tail(self, lines: int = TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def wait_ready(self, timeout_s: float) -> None:
        """Raises HandlerLoadError with the handler's import error, or if the worker dies first."""
        try:
            frame = _read_frame(self.proc.stdout.fileno(), time.monotonic() + timeout_s)
        except TimeoutError:
            self.kill()
            raise HandlerLoadError(f"importing the handler took longer than {timeout_s:g} s") from None
        if frame is None:
            code = self.proc.wait()
            raise HandlerLoadError(f"worker exited (status {code}) while importing the handler"
                                   + (f"; its output:\n{self.tail()}" if self.tail() else ""))
        if frame[0] == b"F":
            self.kill()
            raise HandlerLoadError(format_lambda_error(json.loads(frame[1])))
        self.ready = True

    def call(self, payload: bytes, timeout_s: float) -> CallOutcome:
        deadline = time.monotonic() + timeout_s
        try:
            _write_frame(self.proc.stdin.fileno(), b"C", payload)
            frame = _read_frame(self.proc.stdout.fileno(), deadline)
        except TimeoutError:
            os.kill(self.proc.pid, signal.SIGUSR1)  # faulthandler: where is it stuck?
            time.sleep(0.2)
            self.kill()
            where = self.tail()
            return CallOutcome(kind="timeout", message=(
                f"handler did not answer within {timeout_s:g} s; worker killed and replaced"
                + (f"\nits output and stack when killed:\n{where}" if where else "")))
        except (OSError, ValueError):  # broken pipe, or its file closed by WorkerPool.close()
            frame = None
        if frame is None:
            code = self.proc.wait()
            what = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            tail = self.tail()
            return CallOutcome(kind="crash", message=(
                f"worker process died while running the handler ({what}); replaced"
                + (f"\nits last output:\n{tail}" if tail else "")))
        kind, body = frame
        if kind == b"O":
            return CallOutcome(answer=body)
        message = format_lambda_error(json.loads(body))
        tail = self.tail()
        return CallOutcome(kind="error", message=message + (f"\nhandler output:\n{tail}" if tail else ""))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker leads its group (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._close_files()

    def _close_files(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            try:
                f.close()
            except OSError:
                pass


class WorkerPool:
    """``n`` persistent workers for one handler; ``call`` is thread-safe (one call per worker at once)."""

    def __init__(self, path: str, function: str, n: int, timeout_s: float, log_dir: Path,
                 startup_timeout_s: float = 120.0, env: dict[str, str] | None = None,
                 pass_env: list[str] | tuple = ()):
        import queue

        self.path, self.function, self.timeout_s = path, function, timeout_s
        self.log_dir, self.startup_timeout_s = log_dir, startup_timeout_s
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._serial, self._closed = 0, False
        self.env = handler_env(Path(path), env, pass_env)
        workers = [self._spawn() for _ in range(n)]
        try:
            for w in workers:
                w.wait_ready(startup_timeout_s)
        except HandlerLoadError:
            self.close()
            raise
        for w in workers:
            self._idle.put(w)

    def _spawn(self) -> _Worker:
        with self._lock:
            self._serial += 1
            env = dict(self.env, AWS_LAMBDA_LOG_STREAM_NAME=self.env.get("AWS_LAMBDA_LOG_STREAM_NAME")
                       or time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex)
            w = _Worker(self.path, self.function, self.timeout_s,
                        self.log_dir / f"worker-{self._serial}.log", env)
            self._all.append(w)
        return w

    def call(self, payload: bytes) -> CallOutcome:
        if self._closed:
            return CallOutcome(kind="crash", message="the reward runner was closed before the call")
        worker = self._idle.get()
        try:
            outcome = worker.call(payload, self.timeout_s)
        except BaseException:
            worker.kill()
            raise
        finally:
            if not worker.alive() and not self._closed:
                with self._lock:
                    if worker in self._all:
                        self._all.remove(worker)
                worker.kill()
                worker = self._spawn()
                try:
                    worker.wait_ready(self.startup_timeout_s)
                except HandlerLoadError:
                    pass  # its next call reports the dead worker, with the reason in its log
            self._idle.put(worker)
        if self._closed and outcome.kind is not None:
            outcome.message = "the reward runner was closed during the call; " + outcome.message
        return outcome

    def close(self, grace_s: float = 2.0) -> None:
        """EOF to every worker, a shared grace period to finish, then kill what is left (a busy or
        hung handler does not hold up a Ctrl-C for its whole timeout)."""
        with self._lock:
            self._closed = True
            workers, self._all = list(self._all), []
        for w in workers:
            try:
                w.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for w in workers:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            w.kill()


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
