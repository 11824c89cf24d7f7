"""Where the server's jobs run: a pool of devices (`grpo serve --devices`) and what each job holds.

A job asks for `engine.num_processes` processes (one device each). The pool gives it a set of free
devices, a contiguous run when there is one (GPUs next to each other usually share the fastest links),
else any free ones; a job that does not fit waits queued (the worker asks again each tick, oldest job
first) until another job releases its devices (finished, failed, cancelled, or stopped with the server).

Devices are GPU ids (`--devices 0,1,2,3,4,5,6,7`; default: the GPUs of `CUDA_VISIBLE_DEVICES`, else
`torch.cuda.device_count()`) handed to the job as `CUDA_VISIBLE_DEVICES`, or, on a machine without GPUs,
CPU slots (`--devices cpu:4`: four processes' worth; each job's processes share the CPU cores, as gloo
ranks), so that placement and multi-process jobs run on CPU the way they run on GPUs.

`launch_command` builds the trainer's command: one process is `python -m grpo.api.runner train ...`;
several are `python -m grpo.api.runner launch <accelerate launch args> -m grpo.api.runner train ...`, which
runs `accelerate launch` inside the job's process-group leader (so cancel and restart recovery still kill
one tree). The pool itself is pure bookkeeping: no process, no torch.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grpo.errors import UserError


@dataclass
class DevicePool:
    kind: str                     # "cuda" (GPU ids) or "cpu" (slots)
    devices: list[str]            # in order; a job gets a subset
    held: dict[str, list[str]] = field(default_factory=dict)  # job id -> its devices

    @property
    def size(self) -> int:
        return len(self.devices)

    def free(self) -> list[str]:
        busy = {d for ds in self.held.values() for d in ds}
        return [d for d in self.devices if d not in busy]

    def assign(self, job_id: str, n: int) -> list[str] | None:
        """`n` free devices for `job_id` (contiguous in the pool's order when possible), or None while too
        few are free. Asking again for a job that holds devices returns what it holds."""
        if job_id in self.held:
            return self.held[job_id]
        if not 1 <= n <= self.size:
            raise ValueError(f"a job asks for {n} processes; this server has {self.size} "
                             f"{'GPUs' if self.kind == 'cuda' else 'CPU slots'} (grpo serve --devices)")
        free = set(self.free())
        if len(free) < n:
            return None
        chosen = None
        for start in range(self.size - n + 1):  # first contiguous run of n free devices
            run = self.devices[start:start + n]
            if all(d in free for d in run):
                chosen = run
                break
        chosen = chosen or [d for d in self.devices if d in free][:n]
        self.held[job_id] = chosen
        return chosen

    def release(self, job_id: str) -> None:
        self.held.pop(job_id, None)

    def describe(self) -> str:
        what = "GPU" if self.kind == "cuda" else "CPU slot"
        return f"{self.size} {what}{'s' if self.size != 1 else ''}" + (
            f" ({','.join(self.devices)})" if self.kind == "cuda" else "")


def parse_devices(spec: str | None, *, min_cpu_slots: int = 1, env: dict | None = None) -> DevicePool:
    """`--devices`: "0,1,2,3" (GPU ids), "cpu:N" (N CPU slots), or None: this machine's GPUs
    (`CUDA_VISIBLE_DEVICES` when set, else all torch sees), or without any, one CPU slot per core (at
    least `min_cpu_slots`, so that --max-jobs one-process jobs always fit)."""
    env = os.environ if env is None else env
    if spec is None:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip():
            return parse_devices(visible, env=env)
        count = _cuda_device_count()
        if count:
            return DevicePool("cuda", [str(i) for i in range(count)])
        return DevicePool("cpu", [f"cpu{i}" for i in range(max(os.cpu_count() or 1, min_cpu_slots))])
    spec = spec.strip()
    if spec.lower().startswith("cpu"):
        _, _, n = spec.partition(":")
        if not n.strip().isdigit() or int(n) < 1:
            raise UserError(f"--devices {spec}: expected cpu:N with N >= 1 CPU slots, e.g. --devices cpu:4")
        return DevicePool("cpu", [f"cpu{i}" for i in range(int(n))])
    ids = [s.strip() for s in spec.split(",")]
    if not ids or not all(ids) or len(set(ids)) != len(ids) or not all(
            s.isdigit() or s.startswith(("GPU-", "MIG-")) for s in ids):
        raise UserError(f"--devices {spec}: expected GPU ids separated by commas (e.g. 0,1,2,3), each once, "
                        "or cpu:N")
    return DevicePool("cuda", ids)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(train_args: list[str], kind: str, devices: list[str], *,
                   accelerate_config: str | None = None, port: int | None = None) -> tuple[list[str], dict]:
    """The trainer's command line and the environment it adds, for a job placed on `devices`."""
    env = {"CUDA_VISIBLE_DEVICES": ",".join(devices)} if kind == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}
    runner = [sys.executable, "-m", "grpo.api.runner"]
    if len(devices) == 1:
        return [*runner, *train_args], env
    accel = ["--num_processes", str(len(devices)), "--num_machines", "1", "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port or _free_port())]
    if accelerate_config:
        accel = ["--config_file", accelerate_config, "--gpu_ids", "all", *accel]  # a config's gpu_ids would
        # replace the job's CUDA_VISIBLE_DEVICES: "all" keeps the server's placement
    else:
        accel = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", *accel]
        if kind == "cpu":  # DDP over gloo (as tests/test_distributed.py launches it). Not with a config file:
            env["ACCELERATE_USE_CPU"] = "true"  # it would switch DeepSpeed off; the trainer handles CPU there
    return [*runner, "launch", *accel, "-m", "grpo.api.runner", *train_args], env


def _cuda_device_count() -> int:
    """The GPUs torch sees, counted in a child process: the server itself never loads torch (its memory and start
    time stay small; jobs load it in their own processes). 0 when there is no usable CUDA or torch."""
    import shutil
    import subprocess
    import sys

    if not (Path("/proc/driver/nvidia").exists() or Path("/dev/kfd").exists() or shutil.which("nvidia-smi")):
        return 0  # no NVIDIA or ROCm driver: no child process (and no torch import) at every server start
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0
