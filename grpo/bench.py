"""What every `scripts/bench_*.py` prints beside its figures, so that nobody records a figure taken on a busy
machine: the load before and after, the other processes that were busy while it ran, a warning when the
measurement was contended, and the spread (min / median / max) of per-round ratios rather than one pooled
median.

Two OpenMP threads against one other busy process on a 2-core machine run up to 10x slower (a 2.35 s step was
seen at 26 s), so a benchmark's figure is only worth recording when the machine held nothing else:

    watch = LoadWatch(threads=2)          # before the work: load and busy processes now
    ...                                   # the benchmark
    print(watch.report())                 # after: "load 0.12 -> 2.01 ...; quiet" or a WARNING line
    print(spread_line("ours/TRL", [2.6, 2.7, 2.9]))

Only the standard library and psutil (a dependency already) are used.
"""

from __future__ import annotations

import os
import statistics
import time

QUIET_LOAD = 0.5  # load (1-minute average) above the benchmark's own threads that counts as contention
BUSY_CPU = 20.0  # a process using more than this % of one core while sampled counts as busy


def busy_processes(sample_s: float = 0.5, exclude: set[int] | None = None) -> dict[int, tuple[str, float]]:
    """Other processes using more than BUSY_CPU % of a core over `sample_s` seconds: pid -> (name, %)."""
    try:
        import psutil
    except ImportError:
        return {}
    mine = {os.getpid(), *(exclude or set())}
    try:
        mine |= {c.pid for c in psutil.Process().children(recursive=True)}
    except psutil.Error:
        pass
    procs = []
    for p in psutil.process_iter(["pid", "name"]):
        if p.info["pid"] in mine:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            pass
    time.sleep(sample_s)
    out = {}
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct > BUSY_CPU:
            out[p.info["pid"]] = (p.info["name"], pct)
    return out


class LoadWatch:
    """The machine's state before a benchmark, compared with after it in `report()`."""

    def __init__(self, threads: int, sample_s: float = 0.5):
        self.threads, self.sample_s = threads, sample_s
        self.load_before = os.getloadavg()[0]
        self.busy_before = busy_processes(sample_s)

    def contended(self, load_after: float, busy_after: dict[int, tuple[str, float]]) -> list[str]:
        """Why the measurement was not taken on a quiet machine (empty: it was)."""
        why = []
        if self.load_before > QUIET_LOAD:
            why.append(f"load {self.load_before:.2f} before it started (above {QUIET_LOAD})")
        if load_after > self.threads + QUIET_LOAD:
            why.append(f"load {load_after:.2f} after it, above its own {self.threads} thread(s) + {QUIET_LOAD}")
        seen = {pid: max([x for x in (self.busy_before.get(pid), busy_after.get(pid)) if x], key=lambda x: x[1])
                for pid in {*self.busy_before, *busy_after}}
        busy = [f"{name} ({pid}, {pct:.0f}%)" for pid, (name, pct) in sorted(seen.items(), key=lambda kv: -kv[1][1])]
        if busy:
            why.append("other busy processes: " + ", ".join(busy[:6]) + (" ..." if len(busy) > 6 else ""))
        return why

    def at_exit(self) -> "LoadWatch":
        """Print `report()` when the process exits, whichever way main() returns."""
        import atexit

        atexit.register(lambda: print(self.report(), flush=True))
        return self

    def report(self) -> str:
        """One line to print after the benchmark: the loads, and a WARNING when it was contended."""
        load_after = os.getloadavg()[0]
        why = self.contended(load_after, busy_processes(self.sample_s))
        head = f"load {self.load_before:.2f} before -> {load_after:.2f} after ({os.cpu_count()} cores, {self.threads} " \
               f"thread(s) of ours)"
        if not why:
            return head + "; quiet: the figures above can be recorded"
        return head + "\nWARNING: measured under contention (" + "; ".join(why) + "): do not record these figures; " \
                      "rerun with nothing else running"


def spread(values: list[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def spread_line(name: str, values: list[float], unit: str = "x") -> str:
    """"NAME per round: 2.61 2.74 2.90 (min 2.61 / median 2.74 / max 2.90)"."""
    lo, mid, hi = spread(values)
    each = " ".join(f"{v:.2f}" for v in values)
    return f"{name} per round: {each} (min {lo:.2f}{unit} / median {mid:.2f}{unit} / max {hi:.2f}{unit})"
