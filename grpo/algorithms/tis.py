"""Truncated importance sampling (TIS): correcting for a sampler that is not exactly the trained policy.

When responses come from a separate inference engine (vLLM, grpo.rollout.vllm) its token probabilities
differ slightly from the training engine's for the same weights: other kernels, another precision (bf16 or
fp8 sampling against an fp32-accumulated training forward), batch-dependent numerics. The "old" policy of
PPO/GRPO is then the training engine's, but the data were drawn from the sampler's distribution, so the
policy gradient is biased. TIS (Yao et al., 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy
RL Training"; verl's `rollout_is` / `tis_imp_ratio_cap`) reweights each token's loss by

    w_t = min( pi_train_old(y_t) / pi_sampler(y_t), C ) = min( exp(logp_old_t - logp_sampler_t), C )

detached (a constant in the gradient), with cap C (2.0 in the paper and verl's default). The truncation
bounds the variance that an untruncated ratio would add; w_t = 1 when the two engines agree.

Pure tensor functions, no model and no I/O. The transformers backend needs none of this (it samples from
the policy it trains, so w_t = 1 exactly); it applies to the continuous and vLLM backends (grpo.rollout.samplers), whose weights multiply each token's
clipped loss in grpo.algorithms.core.policy_loss_clipped (`rollout_is_weights`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from grpo.algorithms.core import LOG_RATIO_CLAMP

TIS_CAP = 2.0  # C: Yao et al. and verl's default


def tis_weights(old_log_prob: Tensor, sampler_log_prob: Tensor, response_mask: Tensor, *, cap: float = TIS_CAP,
                level: str = "token") -> Tensor:
    """Truncated importance weights [B, T], detached, 0 outside the mask.

    level "token": w_t = min(exp(old_t - sampler_t), cap) per token.
    level "sequence": one weight per sequence, min(exp(sum_t (old_t - sampler_t)), cap), broadcast over its
    tokens (the unbiased sequence-level ratio, with higher variance).
    The log-ratio is clamped to [-20, 20] before exp (as verl's PPO ratio) so no weight is inf or NaN.
    """
    if old_log_prob.shape != sampler_log_prob.shape or old_log_prob.shape != response_mask.shape:
        raise ValueError(f"shapes differ: old {tuple(old_log_prob.shape)}, sampler {tuple(sampler_log_prob.shape)}, "
                         f"mask {tuple(response_mask.shape)}")
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    mask = response_mask.to(old_log_prob.dtype)
    log_ratio = (old_log_prob - sampler_log_prob).detach() * mask
    if level == "token":
        w = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    elif level == "sequence":
        w = torch.exp(log_ratio.sum(dim=-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(log_ratio)
    else:
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    return w.clamp(max=cap) * mask


def sampler_mismatch_metrics(old_log_prob: Tensor, sampler_log_prob: Tensor, response_mask: Tensor, *,
                             cap: float = TIS_CAP) -> dict[str, float]:
    """How far the sampler is from the trained policy, over response tokens:
    `rollout_kl_k1` mean(sampler - old) and `rollout_kl_k3` mean(r - 1 - log r) with r = exp(old - sampler)
    (Schulman's k1 and k3 estimates of KL(sampler || old) from the sampled tokens; ~0 when they agree), `rollout_tis_weight_mean` and `rollout_tis_clipfrac` (share of
    tokens whose ratio exceeded the cap). NaN when there is no response token."""
    mask = response_mask.bool()
    n = int(mask.sum())
    if n == 0:
        return {k: float("nan") for k in ("rollout_kl_k1", "rollout_kl_k3", "rollout_tis_weight_mean",
                                          "rollout_tis_clipfrac")}
    d = (old_log_prob - sampler_log_prob).detach()[mask].double().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(d)
    return {"rollout_kl_k1": float(-d.mean()),
            "rollout_kl_k3": float((ratio - 1 - d).mean()),
            "rollout_tis_weight_mean": float(ratio.clamp(max=cap).mean()),
            "rollout_tis_clipfrac": float((ratio > cap).double().mean())}
