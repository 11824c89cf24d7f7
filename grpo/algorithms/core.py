"""GRPO math as pure tensor functions, with verl's semantics (no I/O, no model).

Reference: verl ``verl/trainer/ppo/core_algos.py`` and ``verl/utils/torch_functional.py`` (the project
pins verl 0.9.1, see /work/shared/BEDROCK_RFT.md section 5). Every formula is written out in the
docstring of the function that computes it. Shapes: B sequences, T response tokens (padded), V vocab.

Registries (name -> function): the trainer and actor look ``engine.algorithm``'s names up here, and the config
validates them here. A new estimator or loss is a function decorated with ``@register_adv_est("name")`` /
``@register_policy_loss("name")`` (verl's ``core_algos`` style; calling conventions at the registries). Each
``get_*`` accessor raises ValueError naming the known names:
  ADVANTAGE_ESTIMATORS  "grpo" -> group_normalized_advantages
  POLICY_LOSSES         "vanilla" -> policy_loss_clipped
  KL_PENALTIES          k1/kl, abs, k2/mse, k3/low_var_kl, and each name + "+" (straight-through k2 grad)
  LOSS_AGG_MODES        token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm

Micro-batches and data parallelism: how the trainer uses ``global_tokens`` / ``global_seqs``
  The *mini-batch value* of a loss is ``agg_loss`` applied to the whole mini-batch (every micro-batch on
  every rank) at once. To get exactly that value and its gradient with gradient accumulation:
  1. Before the micro-batch loop: ``counts = loss_denominators([mb_mask for each micro-batch])`` on each
     rank; with several ranks, all-reduce (sum) ``counts.tokens`` and ``counts.seqs``.
     tokens = number of response tokens (mask sum); seqs = number of sequences with >= 1 response token.
  2. Per micro-batch: ``loss = agg_loss(..., global_tokens=counts.tokens, global_seqs=counts.seqs)`` (same
     keywords for ``policy_loss_clipped``), then ``loss.backward()``. Do NOT divide by the number of
     micro-batches: each micro-batch loss is its exact share (local sum / global count), so the micro-batch
     losses sum to the mini-batch value (report that sum as the step's loss) and the gradients accumulate
     to the mini-batch gradient.
  3. With DDP, which averages gradients over W ranks, multiply each micro-batch loss by W before backward
     (verl's ``dp_size`` factor). The averaged gradient is then exactly the mini-batch value's gradient.
  ``seq-mean-token-sum-norm`` is ``seq-mean-token-sum`` further divided by a constant horizon
  ``loss_scale_factor``, default ``loss_mat.shape[-1]`` (the padded response width, verl's default).
  Micro-batches may be padded to different widths, so when global counts are given this mode requires an
  explicit ``loss_scale_factor`` (e.g. the configured max response length) and raises ValueError without one.

Differences from verl, all deliberate and numerically tiny or confined to degenerate input:
  - seq-mean-token-mean divides each sequence sum by max(count, 1) (verl: count + 1e-8).
  - sequences with no response token are left out of the local sequence count (as newer verl does).
  - a denominator of 0 (nothing to average) gives a loss of exactly 0 that stays in the graph.
  - entropy and log-probs are computed in at least float32 (verl keeps the logits' dtype for entropy).
  - statistics (clip fractions, ppo_kl) of an all-masked batch are NaN (torch.mean of nothing), not 0.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_old| and |log pi_ref - log pi| are clamped here before exp()
K3_CLAMP = 10.0  # the k3 (low_var_kl) estimate is clamped to [-10, 10]

#: name -> advantage estimator: fn(scores [B], group_ids [B] (tensor or list of hashables), *, norm_by_std: bool)
#: -> per-sequence advantages [B] (detached); the trainer broadcasts them over each response's tokens.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {}
#: name -> policy loss: fn(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low, clip_ratio_high,
#: clip_ratio_c, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor, rollout_is_weights)
#: -> PolicyLossOutput; all tensors [B, T], advantages token-level.
POLICY_LOSSES: dict[str, Callable[..., "PolicyLossOutput"]] = {}


def _register(registry: dict, kind: str, name: str) -> Callable[[Callable], Callable]:
    """A decorator that puts its function in ``registry`` under ``name`` (a name taken by another is an error)."""

    def deco(fn: Callable) -> Callable:
        if name in registry and registry[name] is not fn:
            raise ValueError(f"{kind} {name!r} is already registered ({registry[name].__name__})")
        registry[name] = fn
        return fn

    return deco


def register_adv_est(name: str) -> Callable[[Callable], Callable]:
    return _register(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def register_policy_loss(name: str) -> Callable[[Callable], Callable]:
    return _register(POLICY_LOSSES, "policy loss", name)


# ----------------------------------------------------------------------------- masked reductions
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) over ``dim`` (all dims if None). Masked positions are zeroed with ``where`` first,
    so inf/NaN garbage in padding cannot leak into the result. ``mask``: 0/1 (bool, int or float)."""
    m = mask.to(x.dtype)
    vals = torch.where(mask.bool(), x * m, torch.zeros((), dtype=x.dtype, device=x.device))
    return vals.sum() if dim is None else vals.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """masked_sum(x, mask, dim) / sum(mask, dim). An all-masked reduction is NaN (0/0), like torch.mean
    of an empty tensor: a statistic of nothing is reported as missing, never as 0."""
    m = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / (m.sum() if dim is None else m.sum(dim=dim))


def masked_stats(x: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean, max and min of ``x`` over the positions where ``mask`` is 1, as Python floats.

    verl's ``critic/advantages/{mean,max,min}``: the statistics of ``masked_select(adv, response_mask)``,
    i.e. over response *tokens*, so with unequal response lengths the mean of group-normalized advantages is
    not 0 (longer responses weigh more). An empty selection gives NaN for all three."""
    _same_shape(x, mask, "x", "mask")
    sel = torch.masked_select(x.detach(), mask.bool())
    if sel.numel() == 0:
        return {"mean": math.nan, "max": math.nan, "min": math.nan}
    sel = sel.double()
    return {"mean": sel.mean().item(), "max": sel.max().item(), "min": sel.min().item()}


# ----------------------------------------------------------------------------- advantages
@register_adv_est("grpo")
def group_normalized_advantages(
    scores: Tensor, group_ids: Tensor | Sequence, *, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO outcome advantage per sequence (verl ``compute_grpo_outcome_advantage``).

    For sequence i in group g (the responses sampled for one prompt), with n_g members:
        mean_g = mean(scores of g);  std_g = unbiased std = sqrt(sum((s - mean_g)^2) / (n_g - 1))
        A_i = (s_i - mean_g) / (std_g + eps)      if norm_by_std (original GRPO)
        A_i =  s_i - mean_g                       otherwise (Dr. GRPO)
    A group of ONE uses mean_g = 0 and std_g = 1 exactly as verl does, so its advantage is s_i / (1 + eps)
    (or s_i without std): the raw score, not 0. A group whose scores are all equal gets A = 0.
    ``group_ids``: one id per sequence (a long tensor, or a list of any hashable ids, e.g. prompt uids).
    Returns a new detached tensor of shape [B] in the scores' (floating) dtype."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape [B], got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.float()
    ids = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(ids) != scores.shape[0]:
        raise ValueError(f"got {len(ids)} group ids for {scores.shape[0]} scores")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores must be finite, got {scores.tolist()}")
    members: dict = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)
    with torch.no_grad():
        scores = scores.detach()
        out = torch.empty_like(scores)
        for idx_list in members.values():
            idx = torch.tensor(idx_list, dtype=torch.long, device=scores.device)
            s = scores[idx]
            if len(idx_list) == 1:
                mean = torch.zeros((), dtype=s.dtype, device=s.device)
                std = torch.ones((), dtype=s.dtype, device=s.device)
            else:
                mean, std = torch.mean(s), torch.std(s)  # torch.std is unbiased (n - 1)
            out[idx] = (s - mean) / (std + eps) if norm_by_std else s - mean
    return out


def broadcast_to_tokens(adv: Tensor, response_mask: Tensor) -> Tensor:
    """Token-level advantages: A[b, t] = adv[b] * response_mask[b, t] (verl's outcome broadcast)."""
    if adv.dim() != 1 or response_mask.dim() != 2 or adv.shape[0] != response_mask.shape[0]:
        raise ValueError(f"need adv [B] and response_mask [B, T], got {tuple(adv.shape)} and "
                         f"{tuple(response_mask.shape)}")
    return adv.unsqueeze(-1) * response_mask.to(adv.dtype)


# ----------------------------------------------------------------------------- loss aggregation
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class LossCounts(NamedTuple):
    tokens: float  # response tokens (sum of the masks)
    seqs: float  # sequences with at least one response token


def loss_denominators(loss_masks: Sequence[Tensor]) -> LossCounts:
    """The global counts for ``agg_loss`` over the micro-batch masks of one rank's share of a mini-batch
    (see the module docstring; with several ranks, all-reduce-sum both fields)."""
    tokens = sum(float(m.sum().item()) for m in loss_masks)
    seqs = sum(float((m.sum(dim=-1) > 0).sum().item()) for m in loss_masks)
    return LossCounts(tokens, seqs)


def validate_loss_agg_mode(mode: str) -> str:
    """Return ``mode`` if it is a known loss aggregation mode, else raise ValueError listing them."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; known: {', '.join(LOSS_AGG_MODES)}")
    return mode


def agg_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    loss_agg_mode: str,
    *,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Aggregate a [B, T] loss matrix into a scalar (verl ``agg_loss``). With m = loss_mask, for the
    sequences b of this (micro-)batch, S_b = sum_t loss[b,t] m[b,t], n_b = sum_t m[b,t]:
      token-mean               sum_b S_b / N_tok       N_tok = global_tokens or sum_b n_b
      seq-mean-token-mean      sum_b (S_b / n_b) / N_seq
      seq-mean-token-sum       sum_b S_b / N_seq       N_seq = global_seqs or #{b : n_b > 0}
      seq-mean-token-sum-norm  sum_b S_b / N_seq / H   H = loss_scale_factor or T (= loss_mat.shape[-1]),
                               verl's constant horizon (Dr. GRPO), as verl 0.9.1 (seq-mean, then / H)
    Empty sequences (n_b = 0) contribute 0 and are not counted. Given the global counts of the whole
    mini-batch, the result is this micro-batch's exact share; see the module docstring for the protocol
    (and the factor W under DDP). A zero denominator (nothing to average) yields an exact 0 in the graph."""
    validate_loss_agg_mode(loss_agg_mode)
    _same_shape(loss_mat, loss_mask, "loss_mat", "loss_mask")
    if loss_mat.dim() != 2:
        raise ValueError(f"loss_mat must have shape [B, T], got {tuple(loss_mat.shape)}")
    seq_sums = masked_sum(loss_mat, loss_mask, dim=-1)
    counts = loss_mask.to(loss_mat.dtype).sum(dim=-1)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        if loss_scale_factor is None and (global_tokens is not None or global_seqs is not None):
            raise ValueError("seq-mean-token-sum-norm over micro-batches needs loss_scale_factor (a constant "
                             "horizon such as the max response length): micro-batch widths can differ")
        horizon = float(loss_mat.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        if horizon <= 0:
            raise ValueError(f"loss_scale_factor must be > 0, got {horizon}")
        return agg_loss(loss_mat, loss_mask, "seq-mean-token-sum", global_seqs=global_seqs) / horizon
    if loss_agg_mode == "token-mean":
        num, local, denom, name = seq_sums.sum(), float(counts.sum().item()), global_tokens, "global_tokens"
    else:
        per_seq = seq_sums if loss_agg_mode == "seq-mean-token-sum" else seq_sums / counts.clamp(min=1)
        num, local, denom, name = per_seq.sum(), float((counts > 0).sum().item()), global_seqs, "global_seqs"
    if denom is None:
        denom = local
    elif denom < local:
        raise ValueError(f"{name}={denom} is smaller than this micro-batch's own count {local}: it must count "
                         "the whole mini-batch")
    if denom == 0:
        return num * 0.0
    return num / float(denom)


# ----------------------------------------------------------------------------- policy loss
class PolicyLossOutput(NamedTuple):
    pg_loss: Tensor  # scalar, differentiable
    pg_clipfrac: Tensor  # detached scalar: share of response tokens where the ratio clip was active
    ppo_kl: Tensor  # detached scalar: masked mean of (old_log_prob - log_prob), log-ratio clamped
    pg_clipfrac_lower: Tensor  # detached scalar: share of response tokens hit by the dual clip (A < 0)


@register_policy_loss("vanilla")
def policy_loss_clipped(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    loss_scale_factor: float | None = None,
    rollout_is_weights: Tensor | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate with dual clip (verl ``compute_policy_loss_vanilla``), per token:
        d = clamp(logp - old_logp, -20, 20);  r = exp(d)
        L1 = -A r;  L2 = -A clamp(r, 1 - clip_low, 1 + clip_high);  C1 = max(L1, L2)
        L3 = -A clip_ratio_c;  C2 = min(L3, C1)                          (dual clip, arXiv 1912.09729)
        loss = C2 where A < 0 else C1;   loss *= w (if rollout_is_weights);   pg_loss = agg_loss(loss, mask, ...)
      pg_clipfrac = masked_mean(L2 > L1);  pg_clipfrac_lower = masked_mean((C1 > L3) and A < 0)
      ppo_kl = masked_mean(-d)
    All inputs [B, T]; ``advantages`` token-level (see broadcast_to_tokens). clip_ratio_c must be > 1.
    ``rollout_is_weights`` (grpo.algorithms.tis, detached) reweight each token's clipped loss when the responses came
    from a sampler other than the trained policy, as verl's ``rollout_is_weights``; the clip statistics are
    those of the unweighted ratio."""
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual-clip lower bound) must be > 1.0, got {clip_ratio_c}")
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        _same_shape(log_prob, t, "log_prob", name)
    neg_approx_kl = torch.clamp(log_prob - old_log_prob, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(neg_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.minimum(pg_losses3, clip_pg_losses1)
    negative_adv = advantages < 0
    pg_losses = torch.where(negative_adv, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        _same_shape(log_prob, rollout_is_weights, "log_prob", "rollout_is_weights")
        pg_losses = pg_losses * rollout_is_weights.detach()
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, global_tokens=global_tokens,
                       global_seqs=global_seqs, loss_scale_factor=loss_scale_factor)
    with torch.no_grad():
        f = torch.promote_types(log_prob.dtype, torch.float32)
        pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).to(f), response_mask)
        lower = (torch.gt(clip_pg_losses1, pg_losses3) & negative_adv).to(f)
        pg_clipfrac_lower = masked_mean(lower, response_mask)
        ppo_kl = masked_mean(-neg_approx_kl.to(f), response_mask)
    return PolicyLossOutput(pg_loss, pg_clipfrac.detach(), ppo_kl.detach(), pg_clipfrac_lower.detach())


# ----------------------------------------------------------------------------- KL penalties
def kl_k1(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """k1 ("kl"): logp - ref_logp (unbiased KL estimate, high variance, can be negative)."""
    return log_prob - ref_log_prob


def kl_abs(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """abs: |logp - ref_logp|."""
    return (log_prob - ref_log_prob).abs()


def kl_k2(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """k2 ("mse"): 0.5 (logp - ref_logp)^2 (its gradient is the unbiased KL gradient)."""
    return 0.5 * (log_prob - ref_log_prob).square()


def kl_k3(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """k3 ("low_var_kl", Schulman 2020): x = clamp(ref_logp - logp, -20, 20);
    k3 = clamp(exp(x) - x - 1, -10, 10). Non-negative, low variance; the clamps keep exp() finite."""
    x = torch.clamp(ref_log_prob - log_prob, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(x) - x - 1, min=-K3_CLAMP, max=K3_CLAMP)


def _straight_through_k2(forward: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """verl's "<kind>+" variant: the value of ``forward`` with the gradient of k2:
    k2 - stopgrad(k2) + stopgrad(forward)."""

    def fn(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
        fwd = forward(log_prob, ref_log_prob)
        bwd = kl_k2(log_prob, ref_log_prob)
        return bwd - bwd.detach() + fwd.detach()

    fn.__name__ = forward.__name__ + "_plus"
    fn.__doc__ = f"Value of {forward.__name__}, gradient of k2 (straight-through)."
    return fn


_KL_BASE = {"k1": kl_k1, "kl": kl_k1, "abs": kl_abs, "k2": kl_k2, "mse": kl_k2, "k3": kl_k3, "low_var_kl": kl_k3}
KL_PENALTIES: dict[str, Callable[[Tensor, Tensor], Tensor]] = dict(_KL_BASE)
KL_PENALTIES.update({name + "+": _straight_through_k2(fn) for name, fn in _KL_BASE.items()})


def get_kl_penalty(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The KL estimator registered as ``name``; ValueError listing the known names otherwise."""
    if name not in KL_PENALTIES:
        raise ValueError(f"unknown KL penalty {name!r}; known: {', '.join(KL_PENALTIES)}")
    return KL_PENALTIES[name]


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str) -> Tensor:
    """Token-level KL estimate [B, T] of kind ``kind`` (see KL_PENALTIES; verl ``kl_penalty``)."""
    _same_shape(log_prob, ref_log_prob, "log_prob", "ref_log_prob")
    return get_kl_penalty(kind)(log_prob, ref_log_prob)


# ----------------------------------------------------------------------------- registry look-ups
def get_advantage_estimator(name: str) -> Callable[..., Tensor]:
    """The advantage estimator registered as ``name``; ValueError listing the known names otherwise."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def get_policy_loss(name: str) -> Callable[..., PolicyLossOutput]:
    """The policy loss registered as ``name``; ValueError listing the known names otherwise."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; known: {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def _same_shape(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} shape {tuple(a.shape)} != {nb} shape {tuple(b.shape)}")
