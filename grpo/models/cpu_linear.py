"""Frozen float32 Linear layers on the CPU through oneDNN instead of the BLAS behind `torch.mm`.

LoRA training keeps every base weight frozen, and on the CPU nearly all of a step's time is those layers'
matrix products: the decode steps of generation (a few rows at a time), the reference pass, and the
update's forward and input-gradient products. PyTorch's x86 wheels run float32 `torch.mm` through MKL,
which on AMD processors takes its AVX2 code path even where AVX-512 is present; oneDNN (also in the wheel,
what PyTorch already uses for bfloat16 products on the CPU) uses what the processor has. Measured on the
2-core AMD EPYC (Zen 4, AVX-512) this project is developed on, one thread: a 16-row product with a
1536 x 512 weight 47-81 -> 200 GFLOP/s (pre-packed weight), a 2048-row one 59-67 -> 150-220 GFLOP/s,
forward and input gradient alike (scripts/bench_vs_trl.py shows what it does to a whole step).

`use_onednn_linears(model)` gives every `torch.nn.Linear` of the model (peft's base layers included) a
forward that takes the oneDNN product when it applies (CPU, float32, 2-D weight that does not require a
gradient, a plain tensor: not a DTensor of FSDP2 nor a ZeRO-3 parameter) and `torch.nn.functional.linear`
otherwise; trainable weights (LoRA's A and B) keep the standard path. The values equal `F.linear`'s to
float32 rounding (different summation order, about 1e-6 relative); gradients flow to the input (the
product with the transposed weight, also through oneDNN), never to the frozen weight. Without grad
(generation, reference and old log-probs) the weight is used in oneDNN's packed layout, packed once and
re-packed only when the weight tensor is replaced or written to (grpo.models.merge swaps in merged copies
for each `generate` call). Memory: the packed copy stays with its module, so a run holds about one more copy of
the frozen Linear weights (not in grpo.training.dry_run's estimate; docs/scale.md). `engine.cpu_linear: aten` (or
GRPO_CPU_LINEAR=aten, which overrides the job's setting) turns all of this off.

bfloat16 (engine.dtype bfloat16), where oneDNN computes bf16 natively (AVX512-BF16 or AMX; `bf16_native`): frozen
bf16 Linear layers without grad (decoding, reference and old log-probs) take the same packed oneDNN product, bit
for bit F.linear's (aten already runs bf16 products through oneDNN; the packed weight saves its re-layout per
call: measured 1.6-1.8x at decode shapes, scripts/bench_bf16.py); with grad they stay on F.linear, whose backward
product reaches ~1 TFLOP/s on one AMX core where the transposed-weight oneDNN call gave half that. float16 and
emulated bf16 keep the standard path.
"""

from __future__ import annotations

import functools
import os
import types
import weakref

import torch
import torch.nn.functional as F


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op (x86 and arm64 wheels do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W (and b) frozen: forward and input gradient through oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _onednn(grad.contiguous(), weight.t(), None), None, None


@functools.cache
def bf16_native() -> bool:
    """Whether oneDNN computes bfloat16 products natively here (AVX512-BF16 or AMX), not by emulation."""
    return onednn_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _dtypes() -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) if bf16_native() else (torch.float32,)


def _applies(weight: torch.Tensor, bias, x: torch.Tensor) -> bool:
    return (type(weight) is torch.nn.Parameter or type(weight) is torch.Tensor) and weight.device.type == "cpu" \
        and weight.dtype in _dtypes() and x.dtype == weight.dtype and weight.dim() == 2 \
        and not weight.requires_grad and not hasattr(weight, "ds_id") and x.dim() >= 2 \
        and (bias is None or (not bias.requires_grad and bias.dtype == weight.dtype))


def _packed(module, weight: torch.Tensor) -> torch.Tensor:
    """The module's weight in oneDNN's packed layout, re-packed when the tensor is another or was written to."""
    slot = module.__dict__.get("_onednn_packed")
    if slot is not None and slot[0]() is weight and slot[1] == weight._version:
        return slot[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
    module.__dict__["_onednn_packed"] = (weakref.ref(weight), weight._version, packed)
    return packed


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias
    if not _applies(weight, bias, x):
        return F.linear(x, weight, bias)
    x = x if x.is_contiguous() else x.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        if weight.dtype == torch.bfloat16:  # aten already runs bf16 products (and their backward) through oneDNN
            return F.linear(x, weight, bias)
        return _FrozenLinear.apply(x, weight, bias)
    return _onednn(x, _packed(self, weight), bias)


def configured_choice(configured: str | None) -> str:
    """The kernel choice a job runs with: GRPO_CPU_LINEAR when it is set (it overrides the job's
    engine.cpu_linear, for a run or a benchmark without editing the file), else `configured`, else "onednn"."""
    env = os.environ.get("GRPO_CPU_LINEAR")
    if env and env not in ("onednn", "aten"):
        from grpo.errors import UserError

        raise UserError(f"GRPO_CPU_LINEAR={env}: must be 'onednn' or 'aten' (or unset, to use engine.cpu_linear)")
    return env or configured or "onednn"


def use_onednn_linears(model: torch.nn.Module, choice: str | None = None) -> int:
    """Route the model's frozen float32 Linear layers through oneDNN (see the module docstring); returns how
    many Linear modules got the forward. `choice` ("onednn" or "aten"; None: `configured_choice(None)`):
    "aten" changes nothing. Idempotent."""
    choice = choice or configured_choice(None)
    if choice not in ("onednn", "aten"):
        raise ValueError(f"cpu_linear must be 'onednn' or 'aten', got {choice!r}")
    if choice == "aten" or not onednn_available():
        return 0
    n = 0
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:
            if "forward" not in mod.__dict__:
                mod.forward = types.MethodType(_forward, mod)
            n += 1
    return n
