"""DeepSpeed ZeRO-3 on two CPU processes (DeepSpeed's CPU accelerator, gloo), launched with the accelerate config a
GPU run uses (`configs/accelerate/zero3.yaml`; only `--mixed_precision no` is added): `grpo train` samples with the
partitioned weights, scores, updates and writes a checkpoint whose adapter is a plain peft adapter that loads in
one process. What this does not show: that the update equals one process's (DeepSpeed's own optimizer wrapper,
clipping and accumulation run it; docs/scale.md, "Launch modes"). Needs `pip install 'grpo[deepspeed]'`: skipped
without it (it is not in the `dev` extra)."""

from __future__ import annotations

import importlib.util

import pytest
from distributed_helpers import launch_cmd, run_checked
from helpers_engine import REPO, build_model_dir, read_jsonl, write_data, write_job, write_varied_handler

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (pip install 'grpo[deepspeed]')")


def test_grpo_train_under_zero3_on_two_cpu_processes(tmp_path):
    import json

    from grpo.models.loading import load_for_inference

    model = build_model_dir(tmp_path / "model", seed=1)
    train, val = write_data(tmp_path, n_train=4, n_val=2)
    handler = write_varied_handler(tmp_path / "varied.py")
    job = write_job(tmp_path / "job.yaml", model, train, val, handler=handler,
                    hyper={"n_epochs": 1, "batch_size": 2, "eval_interval": 2},
                    engine={"checkpoint_interval": 2, "micro_batch_size": 8, "seed": 7})
    run = tmp_path / "run"
    run_checked([launch_cmd(["-m", "grpo", "train", str(job), "--output-dir", str(run), "--no-progress"], world=2,
                            config="zero3.yaml")], REPO, timeout=400)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["actor_grad_norm"] >= 0 and r["response_length_mean"] > 0 for r in rows)
    assert json.loads((run / "summary.json").read_text())["status"] == "succeeded"
    ckpt = run / "checkpoints" / "step-000002"
    assert (ckpt / "trainer_state.pt").is_file() and json.loads((ckpt / "state.json").read_text())["step"] == 2
    policy = load_for_inference(str(model), str(ckpt / "adapter"))  # a plain peft adapter, one process
    assert any("lora_A" in n for n, _ in policy.named_parameters())
