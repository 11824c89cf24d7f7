"""bf16 under DDP, FSDP2 and ZeRO-3 on two CPU processes, against one process in bf16 (this CPU computes bf16
products natively: AVX512-BF16/AMX through oneDNN), launched as a GPU run is: `accelerate launch --config_file
configs/accelerate/<mode>.yaml --mixed_precision bf16` with the base weights loaded in bf16 (engine.dtype
bfloat16). What each mode computes in bf16: DDP, accelerate's autocast around the model's forward; FSDP2,
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (grpo.training.distributed.fsdp2_bf16_policy); ZeRO-3,
DeepSpeed's `bf16.enabled` (bf16 module, fp32 master weights in the optimizer). One process: bf16 base, LoRA in
fp32 (peft's default), no autocast (configs/accelerate/single_gpu.yaml). The LoRA weights stay fp32 everywhere.

The tolerance, derived (docs/scale.md, "bf16"): bf16 keeps 8 significant bits, unit roundoff u = 2^-8; products
accumulate in fp32 (oneDNN), whose error (n x 2^-24 for n <= 10^4 terms) is negligible beside u. The one-process
bf16 update differs from the fp32 one by E (the largest relative difference over the LoRA tensors of their
update, measured here on the same plan): the response of this update to perturbing every rounded quantity by
<= u. A sharded bf16 run perturbs a subset of the same kind of quantities by the same u (its base computation is
bit for bit the one-process one: oneDNN's per-row bf16 results do not depend on how rows are batched; it
additionally rounds the LoRA branch, whose output is a small correction), so to first order it lies within E of
the exact update too, and within 2E of the one-process bf16 run (triangle inequality). Tolerance 2E per tensor,
and for the grad norm (| ||g'|| - ||g|| | <= ||g' - g||). First order needs an update that is smooth in the
log-probs: the runs are on-policy (ratio 1: PPO's clip, a discontinuity where one token's rounding flips its
clipped state, measured at 10-20% off, does not apply) with plain SGD (Adam's first step is sign(g) elementwise:
E ~ 18% here, too loose to test anything). The test asserts E is bf16-sized (u/10 < E < 20u) and 2E is far
below what a wrong update gives (a lost process share is 50%, a frozen tensor 100%).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from distributed_helpers import (
    LM_HEAD_TARGETS,
    LR,
    RESUME_STEPS,
    UPDATE_SCRIPT,
    killed_and_resumed,
    launch_cmd,
    lm_head_runs,
    run_checked,
    untied_model,
    write_plan,
)
from helpers_engine import build_model_dir
from safetensors.torch import load_file

U = 2.0 ** -8  # bf16's unit roundoff
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
MODES = {"ddp": None, "fsdp2": "fsdp2.yaml", "zero3": "zero3.yaml"}


def bf16_runs(micro: int) -> dict:
    """On-policy SGD updates (one epoch, two mini-batches) from a bf16-representable LoRA init: token-mean, a
    binding grad-norm clip, and LoRA on lm_head after a reference pass on the tied and the untied model (the
    aggregation modes do not depend on the dtype: tests/test_fsdp.py covers them in fp32)."""
    one = {"micro": micro, "ppo_epochs": 1, "max_grad_norm": 1e4, "on_policy": True, "bf16_init": True}
    runs = {"token-mean": {**one, "mode": "token-mean", "lr": LR["token-mean"]},
            "token-mean-clipped": {**one, "mode": "token-mean", "max_grad_norm": 0.05, "lr": 2.0}}
    runs.update({k: {**v, **one, "max_grad_norm": 1e4} for k, v in lm_head_runs(micro).items()})
    return runs


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> dict:
    """One process: every run in fp32 and in bf16 (micro-batch 5); each mode: two processes in bf16 (micro 3)."""
    d = tmp_path_factory.mktemp("bf16")
    model = build_model_dir(d / "model", seed=3)
    models = {"untied": str(untied_model(d / "untied"))}
    script = d / "update.py"
    script.write_text(UPDATE_SCRIPT, encoding="utf-8")
    one = {f"{name}@{dt}": {**run, "dtype": dt} for name, run in bf16_runs(5).items() for dt in ("float32", "bfloat16")}
    cmds = [launch_cmd([str(script), str(model), str(write_plan(d / "one.json", one, models=models)), str(d / "one.pt")])]
    modes = [m for m in MODES if m != "zero3" or HAS_DEEPSPEED]
    env = {}
    for m in modes:
        plan = write_plan(d / f"{m}.json", bf16_runs(3), models=models, dtype="bfloat16")
        args = [str(script), str(model), str(plan), str(d / f"{m}.pt")]
        cmds.append(launch_cmd(args, world=2, config=MODES[m], mixed_precision="bf16"))
        if m == "ddp":  # without a GPU accelerate needs to be told the CPU (tests/test_distributed.py)
            env["ACCELERATE_USE_CPU"] = "true"
    for cmd in cmds:  # one at a time: ACCELERATE_USE_CPU only for the DDP launch
        ddp = "--multi_gpu" in cmd
        run_checked([cmd], d, timeout=400, **(env if ddp else {}))
    return {"one": torch.load(d / "one.pt", weights_only=False),
            **{m: torch.load(d / f"{m}.pt", weights_only=False) for m in modes}}


def _rel(x: dict, y: dict, k: str) -> float:
    """|| update of x - update of y || / || update of y || for LoRA tensor k (x's weights may be bf16)."""
    dx = x["after"][k].float() - x["before"][k].float()
    dy = y["after"][k] - y["before"][k]
    return float((dx - dy).norm() / dy.norm())


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(bf16_runs(1)))
def test_bf16_update_matches_one_bf16_process_within_derived_tolerance(bf16, mode, name):
    if mode not in bf16:
        pytest.skip("deepspeed is not installed (pip install 'grpo[deepspeed]')")
    expected = {"ddp": "ddp", "fsdp2": "fsdp2", "zero3": "deepspeed-zero3"}[mode]
    assert bf16[mode]["mode"] == expected and bf16[mode]["world"] == 2
    fp32, one = bf16["one"]["runs"][f"{name}@float32"], bf16["one"]["runs"][f"{name}@bfloat16"]
    two = bf16[mode]["runs"][name]
    keys = list(fp32["after"])
    assert keys == list(one["after"]) == list(two["after"])
    for k in keys:  # the same start; the adapter (and its update) kept in fp32 in every mode
        assert torch.equal(fp32["before"][k], one["before"][k]) and torch.equal(one["before"][k], two["before"][k].float())
        assert one["after"][k].dtype == torch.float32 and two["after"][k].dtype == torch.float32, k
    moved = min(float((fp32["after"][k] - fp32["before"][k]).norm()) for k in keys)
    assert moved > 1e-4, f"{name}: a LoRA tensor barely moved ({moved:.1e}); the comparison would prove nothing"
    e = max(_rel(one, fp32, k) for k in keys)
    assert U / 10 < e < 20 * U, f"{name}: the bf16 run is {e:.1e} from the fp32 one, not a bf16 rounding difference"
    tol = 2 * e
    assert tol < 0.1, f"{name}: tolerance {tol:.2f} would let a wrong update through"
    worst = max(keys, key=lambda k: _rel(two, one, k))
    assert _rel(two, one, worst) <= tol, f"{name}/{mode}: {worst} is {_rel(two, one, worst):.2e} off (tol {tol:.2e})"
    g1, g2 = one["metrics"]["actor_grad_norm"], two["metrics"]["actor_grad_norm"]
    assert abs(g2 - g1) <= tol * g1, (g1, g2, tol)
    if name == "token-mean-clipped":
        assert g1 > 0.1, "the clip did not bind"


def test_fsdp2_bf16_sigkill_and_resume_ends_with_the_same_adapter(tmp_path):
    """`accelerate launch --mixed_precision bf16` (FSDP2's MixedPrecisionPolicy, base weights in bf16, LoRA on the
    tied lm_head too) SIGKILLed once step 2's checkpoint is written, then `--resume`: the same metrics as an
    uninterrupted bf16 run and the same adapter and optimizer state, bit for bit; the adapter's LoRA tensors and
    AdamW's moments in fp32 (distributed_helpers.killed_and_resumed)."""
    a, b = killed_and_resumed(tmp_path, "fsdp2.yaml", micro_batch_size=3, mixed_precision="bf16",
                              engine={"dtype": "bfloat16",
                                      "lora": {"rank": 4, "alpha": 8, "target_modules": LM_HEAD_TARGETS}})
    final = b / f"checkpoints/step-{RESUME_STEPS:06d}"
    wa = load_file(str(a / final.relative_to(b) / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    lora = [k for k in wb if "lora_" in k]
    assert wa.keys() == wb.keys() and lora and {wb[k].dtype for k in lora} == {torch.float32}
    assert float(wb["base_model.model.lm_head.lora_B.weight"].abs().sum()) > 0, "the LoRA on lm_head did not train"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"adapter tensor {k} differs after a bf16 FSDP2 resume"
    sa = torch.load(a / final.relative_to(b) / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    sb = torch.load(final / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    moments = [t for st in sb.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    for name, st in sa.items():
        for key, t in st.items():
            assert torch.equal(t, sb[name][key]), f"optimizer state {name}.{key} differs"
