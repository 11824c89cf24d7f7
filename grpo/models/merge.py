"""Decoding with the LoRA adapter merged out of place (one matmul per layer instead of three), restored after."""

from __future__ import annotations

import contextlib

import torch

#: Largest total size of merged weight copies `merged_lora` makes (bytes); above it the adapter path runs.
MERGE_LIMIT_BYTES = 1 << 30


@contextlib.contextmanager
def merged_lora(model):
    """Decode with each LoRA Linear's weight merged out of place (W + scale * B @ A), so a decode step is one
    matmul per layer instead of three (on CPU the adapter's small ops cost as much as the base's). Only for
    float32 weights, where the merged product equals the adapter path to float32 rounding (the sampled
    distribution is the policy's); the originals are put back untouched (no subtract-to-unmerge drift),
    tied weights included. Anything else (half precision, quantized or non-Linear bases, a disabled or
    multiple active adapters, copies over MERGE_LIMIT_BYTES) runs the adapter path unchanged."""
    plan = _merge_plan(model)
    if not plan:
        yield
        return
    saved = []
    rows = _fused_rows(model, plan)
    try:
        for mod, name in plan:
            base = mod.base_layer
            saved.append((mod, base.weight))
            with torch.no_grad():  # one layer's delta at a time: the call holds one merged copy, no deltas besides
                delta = (mod.lora_B[name].weight @ mod.lora_A[name].weight) * mod.scaling[name]
                merged = torch.add(base.weight.detach(), delta, out=rows[mod]) if mod in rows else \
                    base.weight.detach() + delta
            base.weight = torch.nn.Parameter(merged, requires_grad=False)
            mod.merged_adapters.append(name)
        yield
    finally:
        for mod, weight in saved:
            mod.base_layer.weight = weight
            mod.merged_adapters.clear()


#: Sibling projections that read the same input; merged, each group's weights are consecutive rows of one
#: buffer, so a decoder may run the group as one product (grpo.models.decode_step).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fused_rows(model, plan) -> dict:
    """{LoRA module: its rows of a new buffer} for the FUSED_GROUPS whose members are all in `plan` with the same
    input width, dtype and device and no bias: their merged copies are written there instead of into separate
    tensors (the same memory, the same numbers)."""
    planned = {m for m, _ in plan}
    rows = {}
    for parent in model.modules():
        for group in FUSED_GROUPS:
            mods = [getattr(parent, n, None) for n in group]
            if not all(m in planned for m in mods):
                continue
            ws = [m.base_layer.weight for m in mods]
            if len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1 or any(m.base_layer.bias is not None for m in mods):
                continue
            buf = ws[0].new_empty((sum(w.shape[0] for w in ws), ws[0].shape[1]))
            start = 0
            for m, w in zip(mods, ws):
                rows[m] = buf[start:start + w.shape[0]]
                start += w.shape[0]
    return rows


def _merge_plan(model):
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return []
    mods = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "merged_adapters")]
    if not mods or any(hasattr(p, "ds_id") for p in model.parameters()):
        return []  # none, or DeepSpeed ZeRO-3's partitioned weights: its hooks fetch only the parameters it made
    plan, total = [], 0
    for m in mods:
        active = [a for a in m.active_adapters if a in m.lora_A]
        if (not isinstance(m, LoraLinear) or type(m.base_layer) is not torch.nn.Linear or m.disable_adapters
                or m.merged_adapters or len(active) != 1 or m.base_layer.weight.dtype != torch.float32
                or getattr(m, "use_dora", {}).get(active[0], False) or m.fan_in_fan_out):
            return []
        total += m.base_layer.weight.numel() * m.base_layer.weight.element_size()
        if total > MERGE_LIMIT_BYTES:
            return []
        plan.append((m, active[0]))
    return plan
