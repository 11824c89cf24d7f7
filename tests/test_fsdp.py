"""FSDP2 on two CPU processes over gloo, through accelerate's own FSDP2 preparation (`fsdp2_prepare_model`,
reached by `grpo.training.distributed.make_accelerator` from `accelerate launch --config_file
configs/accelerate/fsdp2.yaml`, the file a GPU run uses; only `--mixed_precision no` is added, fp32 on CPU).

- the same update as one process, in every loss-aggregation mode, with a binding grad-norm clip too, and with LoRA
  on lm_head after a reference pass, on the tied-embedding model and on an untied one;
- each rank starts from its own random LoRA init and the update still agrees (rank 0's is broadcast);
- the parameters really are sharded (each rank holds half of each LoRA matrix);
- a checkpoint written under FSDP2 holds a plain peft adapter: loaded in this one process, it gives the
  sharded model's log-probs;
- a `generate` call under `gathered_for_generation` all-gathers each layer once, not once per decoded token
  (all-gather calls counted);
- SIGKILL of the launcher's process group kills the ranks too, and `--resume` under FSDP2 ends with the same
  adapter, optimizer state and metrics as an uninterrupted run (`grpo train` with LoRA on the tied lm_head, as the
  quickstart's job has it).
"""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import (
    LM_HEAD_TARGETS,
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
from helpers_engine import build_model_dir
from safetensors.torch import load_file

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def updates(tmp_path_factory) -> dict:
    """The update script with one process (micro-batch 5) and under FSDP2 with two (micro-batch 3)."""
    d = tmp_path_factory.mktemp("fsdp")
    model = build_model_dir(d / "model", seed=3)
    models = {"untied": str(untied_model(d / "untied"))}
    script = d / "update.py"
    script.write_text(UPDATE_SCRIPT, encoding="utf-8")
    out = {"model": model, "dir": d}
    cmds = []
    for world, micro in ((1, 5), (2, 3)):
        plan = write_plan(d / f"plan{world}.json", update_runs(micro), probe="token-mean",
                          ckpt_dir=str(d / f"ckpt{world}"), new_tokens=NEW_TOKENS, models=models)
        args = [str(script), str(model), str(plan), str(d / f"out{world}.pt")]
        cmds.append(launch_cmd(args, world=world, config="fsdp2.yaml" if world == 2 else None))
    run_checked(cmds, d, timeout=240)
    for world in (1, 2):
        out[world] = torch.load(d / f"out{world}.pt", weights_only=False)
    return out


def test_two_processes_really_ran_fsdp2_sharded(updates):
    assert updates[1]["mode"] == "single" and updates[1]["world"] == 1
    assert updates[2]["mode"] == "fsdp2" and updates[2]["world"] == 2
    local, full = updates[2]["runs"]["token-mean"]["shard"]
    assert local[0] * 2 == full[0] and local[1:] == full[1:], (local, full)


@pytest.mark.parametrize("name", list(update_runs(1)))
def test_same_update_with_one_process_or_fsdp2_over_two(updates, name):
    one, two = updates[1]["runs"][name], updates[2]["runs"][name]
    assert_same_update(one, two, name)


def test_fsdp2_checkpoint_is_a_plain_peft_adapter(updates):
    """Written by two FSDP2 processes, loaded here in one plain process with peft: the same weights as the
    sharded run's gathered ones, and the same log-probs as the sharded model computed."""
    from grpo.batch import pack
    from grpo.models.loading import load_for_inference
    from grpo.training.actor import compute_logprobs

    run = updates[2]["runs"]["token-mean"]
    ckpt = updates["dir"] / "ckpt2" / "checkpoints" / "step-000001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter", "rng_0.pt", "rng_1.pt", "state.json", "trainer_state.pt"]
    saved = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(run["after"]) and all(".default." not in k for k in saved)
    for k, v in run["after"].items():
        torch.testing.assert_close(saved[k.replace(".default.", ".")], v, rtol=0, atol=0)
    trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert trainer_state["mode"] == "fsdp2"

    policy = load_for_inference(str(updates["model"]), str(ckpt / "adapter"))
    g = torch.Generator().manual_seed(123)  # the script's batch, rebuilt
    prompts = [torch.randint(3, 300, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(16)]
    responses = [torch.randint(3, 300, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist() for _ in range(16)]
    logp = compute_logprobs(policy, pack(prompts, responses, pad_id=0), 0.9, 16)
    assert float(logp.abs().sum()) > 1
    torch.testing.assert_close(logp, run["logp"], rtol=1e-5, atol=1e-5)


def test_generation_gathers_each_layer_once_per_call(updates):
    """Counted all-gathers of one `generate` call (2 prompts x 2 samples, 6 new tokens) on the 2-layer model:
    plain FSDP2 gathers both decoder layers for every forward (prefill + each decoded token), inside
    `gathered_for_generation` each layer once. Sampling is unchanged by it (same log-probs after)."""
    run = updates[2]["runs"]["token-mean"]
    counts = run["all_gathers"]
    assert counts["plain"] >= 2 * NEW_TOKENS, counts
    assert 1 <= counts["gathered"] <= run["fsdp_units"], counts
    assert counts["gathered"] * NEW_TOKENS <= counts["plain"], counts
    torch.testing.assert_close(run["logp_after_generation"], run["logp"], rtol=0, atol=0)


# -- SIGKILL + --resume under FSDP2, through the CLI --------------------------------------------------------

def test_fsdp2_sigkill_and_resume_ends_with_the_same_adapter(tmp_path):
    """`accelerate launch` (FSDP2, two ranks) SIGKILLed as a whole process group once step 2's checkpoint is
    written: the ranks die with it, and `--resume` under FSDP2 ends with the same adapter, optimizer state and
    metrics as an uninterrupted run, bit for bit (distributed_helpers.killed_and_resumed)."""
    a, b = killed_and_resumed(tmp_path, "fsdp2.yaml", micro_batch_size=3,  # LoRA on the tied lm_head too (quickstart)
                              engine={"lora": {"rank": 4, "alpha": 8, "target_modules": LM_HEAD_TARGETS}})
    final = b / f"checkpoints/step-{RESUME_STEPS:06d}"
    state = torch.load(final / "trainer_state.pt", weights_only=False)
    assert state["mode"] == "fsdp2" and all(".default." in k for k in state["optimizer"]["state"])
    assert sorted(p.name for p in final.iterdir()) == ["adapter", "rng_0.pt", "rng_1.pt", "state.json", "trainer_state.pt"]
    wa = load_file(str(a / final.relative_to(b) / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and any(float(v.abs().sum()) > 0 for k, v in wb.items() if "lora_B" in k)
    assert float(wb["base_model.model.lm_head.lora_B.weight"].abs().sum()) > 0, "the LoRA on lm_head did not train"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"adapter tensor {k} differs after an FSDP2 resume"
    sa = torch.load(a / final.relative_to(b) / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    for name, st in sa.items():
        for key, t in st.items():
            assert torch.equal(t, state["optimizer"]["state"][name][key]), f"optimizer state {name}.{key} differs"
