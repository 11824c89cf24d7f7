"""DeepSpeed ZeRO-3 on two CPU processes (DeepSpeed's CPU accelerator, gloo), launched with the accelerate config a
GPU run uses (`configs/accelerate/zero3.yaml`; only `--mixed_precision no` is added):

- `grpo train` samples with the partitioned weights, scores, updates and writes a checkpoint whose adapter is a
  plain peft adapter that loads in one process;
- the same update as one process (tests/distributed_helpers.py's script, as tests/test_fsdp.py runs it under
  FSDP2): every loss-aggregation mode, two micro-batches per optimizer step on each rank (DeepSpeed accumulates
  them and steps once, inside accelerate's `backward`), a binding grad-norm clip (DeepSpeed clips inside its own
  step, at engine.algorithm.max_grad_norm), AdamW (DeepSpeed's ZeRO-3 optimizer wraps torch's), with the chunked
  log-probs (lm_head in chunks of positions, its partitioned weights gathered once per call);
- a checkpoint written under ZeRO-3 loads in one process and gives the partitioned model's log-probs;
- SIGKILL mid-run and `--resume` under ZeRO-3 end with the same adapter, optimizer partitions and metrics as an
  uninterrupted run, bit for bit.

Needs `pip install 'grpo[deepspeed]'`: skipped without it (it is not in the `dev` extra)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from distributed_helpers import (
    RESUME_STEPS,
    UPDATE_SCRIPT,
    assert_same_update,
    killed_and_resumed,
    launch_cmd,
    run_checked,
    untied_model,
    update_runs,
    write_plan,
)
from helpers_engine import REPO, build_model_dir, read_jsonl, write_data, write_job, write_varied_handler
from safetensors.torch import load_file

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


# -- the same update as one process ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def updates(tmp_path_factory) -> dict:
    """The update script with one process (micro-batch 5) and under ZeRO-3 with two (micro-batch 3: each rank's
    4 sequences per mini-batch are two micro-batches); lm_head applied 4 positions at a time (the chunked
    log-probs, so each micro-batch takes several chunks, and the ranks different numbers of them)."""
    d = tmp_path_factory.mktemp("zero3")
    model = build_model_dir(d / "model", seed=3)
    models = {"untied": str(untied_model(d / "untied"))}
    script = d / "update.py"
    script.write_text(UPDATE_SCRIPT, encoding="utf-8")
    cmds = []
    for world, micro in ((1, 5), (2, 3)):
        plan = write_plan(d / f"plan{world}.json", update_runs(micro), probe="token-mean",
                          ckpt_dir=str(d / f"ckpt{world}"), new_tokens=2, logprob_chunk=4, models=models)
        cmds.append(launch_cmd([str(script), str(model), str(plan), str(d / f"out{world}.pt")], world=world,
                               config="zero3.yaml" if world == 2 else None))
    run_checked(cmds, d, timeout=400)
    return {"model": model, "dir": d, **{w: torch.load(d / f"out{w}.pt", weights_only=False) for w in (1, 2)}}


def test_two_processes_really_ran_zero3_partitioned(updates):
    assert updates[1]["mode"] == "single" and updates[2]["mode"] == "deepspeed-zero3" and updates[2]["world"] == 2
    local, full = updates[2]["runs"]["token-mean"]["shard"]  # this rank's flat partition of a LoRA matrix
    assert 2 * local[0] == full[0] * full[1], (local, full)
    # the ranks made different numbers of lm_head chunks (their response tokens differ): a head gathered per chunk
    # would have paired the ranks' all-gathers wrongly; it is gathered once per forward_logprobs call
    chunks = updates[2]["runs"]["token-mean"]["head_chunks"]
    assert chunks[0] != chunks[1], chunks


@pytest.mark.parametrize("name", list(update_runs(1)))
def test_same_update_with_one_process_or_zero3_over_two(updates, name):
    one, two = updates[1]["runs"][name], updates[2]["runs"][name]
    assert_same_update(one, two, name)
    if "targets" in update_runs(1)[name]:  # a trained lm_head under ZeRO-3 takes the model's own full-logits path
        assert two["head_chunks"] == [0, 0], two["head_chunks"]
    else:  # the chunked log-probs ran, several chunks per micro-batch
        assert min(two["head_chunks"]) > 8, two["head_chunks"]


def test_zero3_checkpoint_is_a_plain_peft_adapter(updates):
    """Written by two ZeRO-3 processes, loaded in this one plain process with peft: the partitioned run's gathered
    weights, and the log-probs the partitioned model computed."""
    from grpo.batch import pack
    from grpo.models.loading import load_for_inference
    from grpo.training.actor import compute_logprobs

    run = updates[2]["runs"]["token-mean"]
    ckpt = updates["dir"] / "ckpt2" / "checkpoints" / "step-000001"
    saved = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(run["after"])
    for k, v in run["after"].items():
        torch.testing.assert_close(saved[k.replace(".default.", ".")], v, rtol=0, atol=0)
    policy = load_for_inference(str(updates["model"]), str(ckpt / "adapter"))
    g = torch.Generator().manual_seed(123)  # the script's batch, rebuilt
    prompts = [torch.randint(3, 300, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(16)]
    responses = [torch.randint(3, 300, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist() for _ in range(16)]
    logp = compute_logprobs(policy, pack(prompts, responses, pad_id=0), 0.9, 16)
    assert float(logp.abs().sum()) > 1
    torch.testing.assert_close(logp, run["logp"], rtol=1e-5, atol=1e-5)


# -- SIGKILL + --resume under ZeRO-3, through the CLI ---------------------------------------------------------

def _tensors(obj, prefix=""):
    """Every tensor in a nested dict/list (an optimizer partition's state), keyed by its path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, val in items for k, v in _tensors(val, f"{prefix}/{key}").items()}


def test_zero3_sigkill_and_resume_ends_with_the_same_adapter(tmp_path):
    """`accelerate launch` (ZeRO-3, two ranks, two micro-batches per optimizer step) SIGKILLed as a whole process
    group once step 2's checkpoint is written, then `--resume` under ZeRO-3: the same adapter, the same optimizer
    partitions (each rank's AdamW moments and fp32 master weights) and metrics as an uninterrupted run."""
    a, b = killed_and_resumed(tmp_path, "zero3.yaml", micro_batch_size=3)
    final = b / f"checkpoints/step-{RESUME_STEPS:06d}"
    assert torch.load(final / "trainer_state.pt", weights_only=False)["mode"] == "deepspeed-zero3"
    assert sorted(p.name for p in final.iterdir()) == ["adapter", "optimizer_0.pt", "optimizer_1.pt", "rng_0.pt",
                                                        "rng_1.pt", "state.json", "trainer_state.pt"]
    wa = load_file(str(a / final.relative_to(b) / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and any(float(v.abs().sum()) > 0 for k, v in wb.items() if "lora_B" in k)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"adapter tensor {k} differs after a ZeRO-3 resume"
    for rank in (0, 1):
        sa = _tensors(torch.load(a / final.relative_to(b) / f"optimizer_{rank}.pt", weights_only=False))
        sb = _tensors(torch.load(final / f"optimizer_{rank}.pt", weights_only=False))
        assert sa.keys() == sb.keys() and any("exp_avg_sq" in k for k in sa), sorted(sa)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"rank {rank}'s optimizer partition {k} differs"
