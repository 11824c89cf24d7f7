"""Shared helpers for the engine tests: a tiny random Qwen3 model directory, small Bedrock RFT data,
reward handlers, a job YAML, and a `grpo` CLI runner, all written into a test's `tmp_path`.

A random model's answers never match GSM8K references, so its reward is always 0, the advantages are 0
and nothing is learned. Tests that need real updates use `write_varied_handler`: a genuine Lambda-contract
handler whose score depends on the sampled text, so groups have spread and the adapter moves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GSM8K_HANDLER = REPO / "rewards" / "gsm8k.py"
PYTHON = sys.executable
# Wall-clock fields outside grpo.training.metrics.VOLATILE_PREFIXES: the reward runner's seconds per step.
VOLATILE_EXTRA = ("reward_seconds",)

VARIED_HANDLER = '''\
"""Test reward: a deterministic function of the response text with spread inside every group.
Environment: TEST_REWARD_SLEEP_S makes each call that slow (to pace a run a test interrupts);
TEST_REWARD_LOG names a file that gets one line per call: this worker's pid and the trajectory ids."""
import json
import os
import time


def lambda_handler(event, context):
    time.sleep(float(os.environ.get("TEST_REWARD_SLEEP_S", "0")))
    if isinstance(event, dict):
        event = event["trajectories"]
    if os.environ.get("TEST_REWARD_LOG"):
        with open(os.environ["TEST_REWARD_LOG"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "ids": [t["id"] for t in event]}) + "\\n")
    out = []
    for t in event:
        text = t["messages"][-1]["content"]
        score = 0.4 * (len(text) % 3) + (0.2 if any(c.isdigit() for c in text) else 0.0)
        out.append({"id": t["id"], "aggregate_reward_score": score,
                    "metrics_list": [{"name": "length_mod3", "value": float(len(text) % 3), "type": "Metric"}]})
    return out
'''


def build_model_dir(path: Path, *, seed: int = 0, **overrides) -> Path:
    """Save a tiny random Qwen3 (fp32) and its tokenizer into `path`; same seed, same weights."""
    import torch

    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer

    path = Path(path)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = build_random_qwen3(tok, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_data(directory: Path, *, n_train: int = 8, n_val: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and validation.jsonl of synthetic arithmetic records (Bedrock RFT format)."""
    from grpo.models.tiny_data import make_arithmetic_records

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train = write_records(directory / "train.jsonl", make_arithmetic_records(n_train, seed=seed, split="train"))
    val = write_records(directory / "validation.jsonl", make_arithmetic_records(n_val, seed=seed, split="validation"))
    return train, val


def write_varied_handler(path: Path) -> Path:
    path = Path(path)
    path.write_text(VARIED_HANDLER, encoding="utf-8")
    return path


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def job_dict(model_dir: Path, train: Path, val: Path | None, *, handler: Path = GSM8K_HANDLER,
             hyper: dict | None = None, engine: dict | None = None) -> dict:
    """A small job: batch 2 prompts x group 4, 8 new tokens, one reward worker, no trackers."""
    h = {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 4, "inference_max_tokens": 8}
    e = {"checkpoint_interval": 2, "micro_batch_size": 4, "reward": {"concurrency": 1}, "log_with": ["none"],
         "lora": {"rank": 4, "alpha": 8}, "base_learning_rate": 5e-3}
    job = {"model": str(model_dir), "training_file": str(train),
           "method": {"type": "reinforcement", "reinforcement": {
               "grader": {"type": "lambda", "lambda": {"function": str(handler)}},
               "hyperparameters": _merge(h, hyper or {})}},
           "engine": _merge(e, engine or {})}
    if val is not None:
        job["validation_file"] = str(val)
    return job


def write_job(path: Path, model_dir: Path, train: Path, val: Path | None = None, **kw) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(job_dict(model_dir, train, val, **kw), sort_keys=False), encoding="utf-8")
    return path


def cli_env(**extra: str) -> dict:
    """The environment for CLI subprocesses: one torch thread (deterministic, and the machine is small)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra)
    return env


def run_grpo(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m grpo ARGS...` as a real subprocess, text output captured."""
    return subprocess.run([PYTHON, "-m", "grpo", *map(str, args)], cwd=cwd or REPO, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def stable_metrics(row: dict) -> dict:
    """A metrics row without the fields that are wall-clock measurements (grpo.training.metrics.VOLATILE_PREFIXES)."""
    from grpo.training.metrics import VOLATILE_PREFIXES

    return {k: v for k, v in row.items() if not k.startswith(VOLATILE_PREFIXES + VOLATILE_EXTRA)}


def train_with_handler(tmp_path: Path, handler_source: str, *, n_train: int, **job_kw) -> tuple[subprocess.CompletedProcess, Path]:
    """A tiny random model, `n_train` records, a handler file with `handler_source`, and `grpo train` on them
    (no validation file). Returns the finished process and the run directory."""
    model = build_model_dir(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=n_train, n_val=2)
    handler = tmp_path / "handler.py"
    handler.write_text(handler_source, encoding="utf-8")
    job = write_job(tmp_path / "job.yaml", model, train, None, handler=handler, **job_kw)
    run_dir = tmp_path / "run"
    return run_grpo("train", job, "--output-dir", run_dir, "--no-progress"), run_dir
