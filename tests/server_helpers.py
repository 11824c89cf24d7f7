"""Start the real `grpo serve` (uvicorn) on 127.0.0.1 in a subprocess, for tests that drive it over
loopback with the real `openai` package.

    with start_server(state_dir, handlers_dir, "test-key") as (base_url, api_key, process):
        client = openai.OpenAI(base_url=base_url, api_key=api_key)

The server runs in its own session (`os.killpg(process.pid, SIGKILL)` kills it and only it: its trainers
lead sessions of their own and stop by themselves once it is gone). Its output is appended to
`<state_dir>/server.log`; `server_log(state_dir)` reads it for failure messages. The environment is
`helpers_engine.cli_env()` (one torch thread) plus `env`; trainers inherit it.

Also: `wait_for` (poll until truthy), `pids_with` (live processes whose command line contains a text, e.g.
a job id: a job's trainer runs `python -m grpo.api.runner train <state>/jobs/<job id>/job.yaml ...`),
`gone(pid)`, and `sse_data` (the JSON payloads of a server-sent event stream).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from helpers_engine import PYTHON, REPO, cli_env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_log(state_dir: str | os.PathLike) -> str:
    path = Path(state_dir) / "server.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def _wait_ready(base_url: str, api_key: str, proc: subprocess.Popen, timeout: float) -> bool:
    """True once /v1/models answers 200; False if the process exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            r = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=2)
            if r.status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"grpo serve did not answer within {timeout:g} s")


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (uvicorn shuts down, the job worker stops its trainers), then SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()


@contextmanager
def start_server(state_dir, handlers_dir, api_key, extra_args=(), *, env: dict | None = None,
                 timeout: float = 60, key_file: bool = False):
    """Yield (base_url, api_key, process) of a running server; stop it on exit. `key_file`: the key is given
    with --api-key-file (a file next to the state directory), not on the command line."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    key_args = ["--api-key", api_key]
    if key_file:
        path = state_dir.parent / f"{state_dir.name}.key"
        path.write_text(api_key + "\n")
        key_args = ["--api-key-file", str(path)]
    for _attempt in range(3):  # a free port can be taken between the probe and the bind: try another
        port = free_port()
        cmd = [PYTHON, "-m", "grpo", "serve", "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(state_dir),
               "--handlers-dir", str(handlers_dir), *key_args, *map(str, extra_args)]
        log = open(state_dir / "server.log", "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(**(env or {})), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            ready = _wait_ready(base_url, api_key, proc, timeout)
        except BaseException:
            stop_server(proc)
            log.close()
            raise
        if ready:
            break
        log.close()
        if "address already in use" not in server_log(state_dir).lower():
            raise RuntimeError(f"grpo serve exited with status {proc.returncode}:\n{server_log(state_dir)[-4000:]}")
    else:
        raise RuntimeError("grpo serve could not bind a free port in 3 attempts")
    try:
        yield base_url, api_key, proc
    finally:
        stop_server(proc)
        log.close()


def wait_for(fn, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def pids_with(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `text`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmd and state != "Z":
                out.append(int(entry))
    return out


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def sse_data(text: str) -> list[dict]:
    """The JSON payloads of a server-sent event stream (without chat's closing [DONE])."""
    blocks = [b for b in text.strip().split("\n\n") if "data: " in b]
    return [json.loads(b.split("data: ", 1)[1]) for b in blocks if not b.endswith("data: [DONE]")]
