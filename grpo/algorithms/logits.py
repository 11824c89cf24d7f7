"""Logits -> token log-probs and entropy, in fp32 (upcast from bf16/fp16) and in chunks of positions, so a large
vocabulary never holds a second full-size copy (verl's `logprobs_from_logits`, `entropy_from_logits`)."""

from __future__ import annotations

import torch
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Token entropy of softmax(logits) over the last dim (verl ``entropy_from_logits``):
        H = logsumexp(z) - sum_v softmax(z)_v z_v
    shape [..., V] -> [...]; computed in at least float32."""
    z = _upcast(logits)
    return torch.logsumexp(z, dim=-1) - torch.sum(torch.softmax(z, dim=-1) * z, dim=-1)


def entropy_from_logits_chunked(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """entropy_from_logits over ``chunk_size`` positions at a time, so a half-precision [..., V] tensor is
    never upcast or softmaxed whole (peak extra memory ~ chunk_size * V floats without autograd)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])
    parts = [entropy_from_logits(flat[i:i + chunk_size]) for i in range(0, flat.shape[0], chunk_size)]
    out = torch.cat(parts) if parts else flat.new_empty(0, dtype=_upcast(flat[:0]).dtype)
    return out.reshape(logits.shape[:-1])


def log_probs_from_logits(logits: Tensor, labels: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """log softmax(logits)[label] per position: z[label] - logsumexp(z), shape [B, T, V] + [B, T] -> [B, T].
    Computed in at least float32, ``chunk_size`` positions at a time, so the full [B, T, V] log_softmax
    (and, for half-precision logits, a full fp32 copy) is never materialized outside autograd."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be logits shape without the vocab dim "
                         f"{tuple(logits.shape[:-1])}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])
    lab = labels.reshape(-1, 1).long()
    parts = []
    for i in range(0, flat.shape[0], chunk_size):
        z = _upcast(flat[i:i + chunk_size])
        parts.append(z.gather(-1, lab[i:i + chunk_size]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    out = torch.cat(parts) if parts else flat.new_empty(0, dtype=_upcast(flat[:0]).dtype)
    return out.reshape(labels.shape)
