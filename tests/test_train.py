"""`grpo train` end to end on a tiny random Qwen3: Bedrock's metric names, the events, checkpoints in
peft's format, the plot, and `grpo eval` on the trained adapter."""

import json

import pytest
from helpers_engine import (
    build_model_dir,
    read_jsonl,
    run_grpo,
    train_with_handler,
    write_data,
    write_job,
    write_varied_handler,
)

REQUIRED = [
    "step", "total_steps", "critic_rewards_mean", "critic_rewards_max", "critic_rewards_min", "critic_score_mean",
    "critic_score_max", "critic_score_min", "critic_advantages_mean", "critic_advantages_max",
    "critic_advantages_min", "actor_pg_loss", "actor_pg_clipfrac", "actor_pg_clipfrac_lower", "actor_ppo_kl",
    "actor_kl_loss", "actor_entropy", "actor_grad_norm", "actor_lr", "response_length_mean", "response_length_max",
    "response_length_min", "response_length_clip_ratio", "prompt_length_mean", "prompt_length_max",
    "prompt_length_min", "timing_s_gen", "timing_s_reward", "timing_s_update_actor", "timing_s_step",
    "perf_throughput", "perf_time_per_step", "reward_length_mod3_mean",
    # verl's metrics added under Bedrock's flattened names (docs/metrics.md)
    "training_global_step", "training_epoch", "critic_returns_mean", "critic_returns_max", "critic_returns_min",
    "response_aborted_ratio", "response_length_non_aborted_mean", "response_length_non_aborted_max",
    "response_length_non_aborted_min", "response_length_non_aborted_clip_ratio", "prompt_length_clip_ratio",
    "timing_per_token_ms_gen", "timing_per_token_ms_ref", "timing_per_token_ms_adv",
    "timing_per_token_ms_update_actor", "perf_cpu_memory_used_gb", "perf_mfu_actor", "global_seqlen_min",
    "global_seqlen_max", "global_seqlen_minmax_diff", "global_seqlen_balanced_min", "global_seqlen_balanced_max",
    "global_seqlen_mean",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    model = build_model_dir(tmp / "model")
    train, val = write_data(tmp / "data", n_train=8, n_val=4)
    handler = write_varied_handler(tmp / "varied.py")
    job = write_job(tmp / "job.yaml", model, train, val, handler=handler,
                    hyper={"eval_interval": 2, "batch_size": 2}, engine={"checkpoint_interval": 3})
    res = run_grpo("train", job, "--output-dir", tmp / "run", "--no-progress")
    assert res.returncode == 0, res.stderr
    return tmp, res


def test_every_step_logs_bedrock_metric_names(trained):
    tmp, _ = trained
    rows = read_jsonl(tmp / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["total_steps"] == 4 for r in rows)
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
    # validation every eval_interval=2 steps (and at the end), each timed; checkpoints at 3 and 4, each timed
    assert [r["step"] for r in rows if "val_score_rewards_mean" in r] == [2, 4]
    assert [r["step"] for r in rows if "timing_s_testing" in r] == [2, 4]
    assert [r["step"] for r in rows if "timing_s_save_checkpoint" in r] == [3, 4]
    events = {e["data"]["step"]: e["data"] for e in read_jsonl(tmp / "run" / "events.jsonl") if e["type"] == "metrics"}
    assert [s for s, d in sorted(events.items()) if "timing_s_save_checkpoint" in d] == [3, 4]
    assert [r["training_global_step"] for r in rows] == [1, 2, 3, 4] and {r["training_epoch"] for r in rows} == {0}
    assert all(r["critic_returns_mean"] == r["critic_advantages_mean"] and 0 < r["perf_mfu_actor"] < 1 for r in rows)
    # the varied handler spreads scores inside groups, so the update did something
    assert any(r["actor_grad_norm"] > 0 for r in rows)
    assert all(0 <= r["response_length_clip_ratio"] <= 1 for r in rows)


def test_events_are_openai_fine_tuning_events(trained):
    tmp, _ = trained
    events = read_jsonl(tmp / "run" / "events.jsonl")
    assert all(e["object"] == "fine_tuning.job.event" and e["id"].startswith("ftevent-") for e in events)
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [e["message"] for e in metrics] == [f"Step {i}/4: training metrics" for i in range(1, 5)]
    assert metrics[0]["data"]["step"] == 1 and "critic_rewards_mean" in metrics[0]["data"]
    kinds = [e["message"] for e in events if e["type"] != "metrics"]
    assert kinds[0] == "Fine-tuning job started" and kinds[-1] == "The job has successfully completed"
    assert sum(e["type"] == "checkpoint" for e in events) == 2  # step 3 (interval) and step 4 (end)


def test_checkpoint_is_a_peft_adapter_and_eval_runs_on_it(trained):
    tmp, res = trained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp / "run" / "checkpoints" / "step-000004" / "adapter"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp / "model"), adapter)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["adapter"] == str(adapter) and summary["steps"] == 4
    assert (tmp / "run" / "metrics.png").stat().st_size > 10_000
    assert "adapter:" in res.stdout.splitlines()[-1]

    out = run_grpo("eval", "--model", tmp / "model", "--adapter", adapter, "--data", tmp / "data" / "validation.jsonl",
                   "--handler", tmp / "varied.py", "--max-tokens", "8", "--json", "--seed", "1")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["records"] == 4 and result["samples"] == 4 and result["failures"] == 0
    assert 0.0 <= result["reward_mean"] <= 1.0
    # the same through transformers' continuous batching, two samples per record, every sample written out
    samples = tmp / "cb_samples.jsonl"
    out = run_grpo("eval", "--model", tmp / "model", "--adapter", adapter, "--data", tmp / "data" / "validation.jsonl",
                   "--handler", tmp / "varied.py", "--max-tokens", "8", "--json", "--backend", "continuous",
                   "--samples", "2", "--out", samples)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["records"] == 4 and result["samples"] == 8 and result["failures"] == 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 8 and sorted(r["id"][-2:] for r in rows) == ["#0"] * 4 + ["#1"] * 4


def test_plot_command_redraws_and_rejects_a_non_run(trained, tmp_path):
    tmp, _ = trained
    out = run_grpo("plot", tmp / "run", "--out", tmp_path / "p.png")
    assert out.returncode == 0 and (tmp_path / "p.png").is_file()
    bad = run_grpo("plot", tmp_path)
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr and "Traceback" not in bad.stderr


def test_an_existing_run_is_not_overwritten(trained):
    tmp, _ = trained
    res = run_grpo("train", tmp / "job.yaml", "--output-dir", tmp / "run")
    assert res.returncode == 2 and "--resume" in res.stderr


def test_a_failing_handler_fails_the_job_with_its_own_message(tmp_path):
    res, _ = train_with_handler(tmp_path, "def lambda_handler(event, context):\n"
                                          "    raise KeyError('reference_answer missing from metadata')\n", n_train=4)
    assert res.returncode == 1
    assert "reference_answer missing from metadata" in res.stderr and "--resume" in res.stderr
    assert "grpo/trainer.py" not in res.stderr  # the handler's traceback is quoted; ours is not printed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "KeyError" in summary["error"]
    errors = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["level"] == "error"]
    assert len(errors) == 1 and errors[0]["message"].startswith("Step 1: the reward function failed on 8 trajectories")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was logged as if it had scored


def test_a_job_without_validation_file_runs_and_logs_no_val_metric(tmp_path):
    model = build_model_dir(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=4, n_val=2)
    job = write_job(tmp_path / "job.yaml", model, train, None, handler=write_varied_handler(tmp_path / "h.py"))
    res = run_grpo("train", job, "--output-dir", tmp_path / "run", "--no-progress")
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and not any("val_score_rewards_mean" in r for r in rows)


def test_warmup_advances_once_per_training_step_and_actor_lr_is_the_rate_used(tmp_path):
    """verl steps the learning-rate schedule once per training step, whatever the number of mini-batches:
    with 2 mini-batches per step and lr_warmup_steps=2 the rate is lr/2 on step 1 and lr from step 2."""
    model = build_model_dir(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=6, n_val=2)
    job = write_job(tmp_path / "job.yaml", model, train, None, handler=write_varied_handler(tmp_path / "varied.py"),
                    hyper={"batch_size": 2, "learning_rate": 0.001},
                    engine={"mini_batch_size": 1, "lr_warmup_steps": 2, "micro_batch_size": 4})
    res = run_grpo("train", job, "--output-dir", tmp_path / "run", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert [r["actor_lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == pytest.approx([0.0005, 0.001, 0.001])


def test_a_non_finite_gradient_norm_skips_the_optimizer_step():
    """One NaN must not poison the adapter or Adam's moments: the step is skipped, the gradients dropped."""
    import math

    import torch
    from accelerate import Accelerator

    from grpo.batch import pack
    from grpo.config import LoraConfig
    from grpo.models.loading import add_lora
    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer
    from grpo.training.actor import UpdateSettings, update_policy

    torch.manual_seed(0)
    policy = add_lora(build_random_qwen3(build_tokenizer()), LoraConfig(rank=4, alpha=8))
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    model, opt = acc.prepare(policy, opt)
    batch = pack([[5, 6, 7], [5, 6, 7]], [[8, 9], [10, 11]], 0)
    s = UpdateSettings(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0,
                       loss_agg_mode="token-mean", kl_coef=0.0, kl_penalty="low_var_kl", entropy_coef=0.0,
                       max_grad_norm=1.0, ppo_epochs=1, mini_batch_seqs=2, loss_scale_factor=2.0, micro_batch_seqs=2)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    adv = torch.full(batch.response_mask.shape, float("nan")) * batch.response_mask
    m = update_policy(model, opt, batch, adv, s, accelerator=acc)
    assert math.isnan(m["actor_grad_norm"])
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters() if p.requires_grad)
    assert not opt.state and all(p.grad is None for p in policy.parameters())
    # a finite step afterwards moves the adapter (B starts at 0 and gets a gradient)
    m = update_policy(model, opt, batch, torch.ones(batch.response_mask.shape) * batch.response_mask * torch.tensor([[1.0], [-1.0]]), s, accelerator=acc)
    assert math.isfinite(m["actor_grad_norm"]) and m["actor_grad_norm"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters() if p.requires_grad)


def test_every_caller_is_refused_a_directory_that_holds_a_run(tmp_path):
    """The check is in train_and_report, which `grpo train` and `grpo quickstart` both call."""
    from grpo.commands.train import train_and_report
    from grpo.errors import UserError

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="already holds a run: pass --resume"):
        train_and_report(None, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_picks_this_configs_newest_run_with_a_checkpoint(tmp_path, monkeypatch):
    from pathlib import Path

    from grpo.commands.train import default_run_dir

    monkeypatch.chdir(tmp_path)
    for name, ckpt in (("gsm8k-20260101-000000", True), ("gsm8k-20260102-000000", False),
                       ("gsm8k-v2-20270101-000000", True), ("gsm8k-notes", False)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        if ckpt:
            (tmp_path / "runs" / name / "checkpoints").mkdir()
    assert default_run_dir(Path("configs/gsm8k.yaml"), resume=True) == Path("runs/gsm8k-20260101-000000")
    fresh = default_run_dir(Path("configs/gsm8k.yaml"), resume=False)
    assert fresh.parent == Path("runs") and fresh.name.startswith("gsm8k-2")


def test_a_missing_handler_fails_before_the_model_loads_and_leaves_no_run_directory(tmp_path):
    train, _ = write_data(tmp_path / "data", n_train=4, n_val=2)
    job = write_job(tmp_path / "job.yaml", tmp_path / "no-such-model", train, None, handler=tmp_path / "missing.py")
    res = run_grpo("train", job, "--output-dir", tmp_path / "run", "--no-progress")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "missing.py" in res.stderr and "no-such-model" not in res.stderr
    assert not (tmp_path / "run").exists()
