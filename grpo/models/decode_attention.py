"""Attention for one new token per row (the decode loop's steps) on the CPU, as plain batched products.

At a decode step each row has one query and a few hundred cached keys: a few MFLOP per layer, so the time is the
kernel's own overhead. PyTorch's CPU SDPA (flash) kernel costs 0.5-1 ms per call at these shapes where two
batched matmuls and a softmax cost 20-30% less (scripts/bench_decode.py measures the whole step). The query heads
that share a key/value head are stacked as rows of one product (no key/value copy per query head), the mask is
the same boolean mask SDPA gets (True: attend), and the result equals SDPA's to float32 rounding.

`decode_attention(model)` is a context manager: inside it the model's attention layers take this path for
one-token queries without grad and SDPA (transformers' own function) for everything else; outside it nothing
changes, so training's forward and backward keep their kernels.
"""

from __future__ import annotations

import contextlib
import functools

import torch

NAME = "grpo_decode"


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or torch.is_grad_enabled() or kwargs.get("softcap") is not None or heads % kv_heads \
            or kwargs.get("position_bias") is not None or getattr(module, "sinks", None) is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    with torch.profiler.record_function(NAME):  # scripts/bench_decode.py counts what runs inside as attention
        rep = heads // kv_heads
        scale = scaling if scaling is not None else d ** -0.5
        scores = torch.matmul(query.view(b, kv_heads, rep, d), key.transpose(-1, -2))  # [b, kv_heads, rep, keys]
        scores.mul_(scale)
        if attention_mask is not None:
            mask = attention_mask[:, :, -1:, :key.shape[2]]  # [b, 1, 1, keys]: one row per sequence
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, float("-inf"))
            else:
                scores.add_(mask)
        out = torch.matmul(scores.softmax(dim=-1), value)  # [b, kv_heads, rep, d]
        return out.view(b, heads, 1, d).transpose(1, 2), None


@functools.cache
def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return True


@contextlib.contextmanager
def decode_attention(model):
    """Inside: one-token attention without grad as batched products, for a model whose attention is SDPA on the
    CPU (others, and transformers without the attention registry, are left as they are)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    device = next(base.parameters()).device
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa" or device.type != "cpu" or not _register():
        yield
        return
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"
