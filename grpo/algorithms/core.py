"""GRPO math as pure tensor functions, with verl's semantics (no I/O, no model).

Reference: verl ``verl/trainer/ppo/core_algos.py`` and ``verl/utils/torch_functional.py`` (the project
pins verl 0.9.1, see /work/shared/BEDROCK_RFT.md section 5). Every formula is written out in the
docstring of the function that computes it. Shapes: B sequences, T response tokens (padded), V vocab.

Registries (name -> function): the trainer and actor look ``engine.algorithm``'s names up here, and the config
validates them here. A new estimator or loss is a function decorated with ``@register_adv_est("name")`` /
``@register_policy_loss("name")`` (verl's ``core_algos`` style; calling conventions at the registries). Each
``get_*`` accessor raises ValueError naming the known names:
  ADVANTAGE_ESTIMATORS  grpo (grpo_outcome_advantage), rloo, opo, reinforce_plus_plus, reinforce_plus_plus_baseline,
                        remax, gpg, grpo_passk: verl 0.9.1's, verl's calling convention
  POLICY_LOSSES         vanilla (policy_loss_clipped), gspo, sapo, cispo, gpg, clip_cov, kl_cov, geo_mean, dro,
                        dppo_tv, dppo_kl: verl 0.9.1's (docs/algorithms.md has the table and every difference)
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

#: name -> advantage estimator, verl's calling convention: fn(token_level_rewards [B, T], response_mask [B, T],
#: index [B] (group ids: a tensor or a list of hashables), *, <knobs>) -> (advantages [B, T], returns [B, T]),
#: detached. The knobs a function declares as keyword arguments (norm_adv_by_std, gamma, epsilon,
#: reward_baselines [B]) are the only ones it is given (``call_with_knobs``).
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}
#: name -> policy loss: fn(old_log_prob, log_prob, advantages, response_mask, *, loss_agg_mode, global_tokens,
#: global_seqs, loss_scale_factor, rollout_is_weights, <knobs>) -> PolicyLossOutput; all tensors [B, T],
#: advantages token-level. The knobs (clip_ratio_low, clip_ratio_high, clip_ratio_c, tau_pos, tau_neg,
#: clip_cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_ratio, ppo_kl_coef, dro_beta) are passed only to the
#: functions that declare them (``call_with_knobs``).
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


def call_with_knobs(fn: Callable, *args, knobs: dict | None = None, **kwargs):
    """``fn(*args, **kwargs, **k)`` where k is the part of ``knobs`` that ``fn`` declares as parameters (all of
    it when fn takes ``**kwargs``): each registered function is given the settings it reads and no others."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        picked = dict(knobs or {})
    else:
        picked = {k: v for k, v in (knobs or {}).items() if k in params}
    return fn(*args, **kwargs, **picked)


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


# ----------------------------------------------------------------------------- advantage estimators (registry)
# verl's calling convention (verl/trainer/ppo/core_algos.py, 0.9.1): token-level rewards [B, T] (an outcome
# reward sits on the response's last token, so token_level_rewards.sum(-1) is the sequence's score), the
# response mask [B, T], the group index [B], and keyword knobs; each returns (advantages, returns) [B, T].
def _groups(index, n: int) -> list[Tensor]:
    """Row indices of each group, groups in order of first appearance (verl's defaultdict order)."""
    ids = index.tolist() if isinstance(index, Tensor) else list(index)
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} group ids for {n} rows")
    members: dict = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)
    return [torch.tensor(v, dtype=torch.long) for v in members.values()]


def _outcome_scores(token_level_rewards: Tensor, response_mask: Tensor) -> Tensor:
    """verl's ``scores = token_level_rewards.sum(dim=-1)``, after checking shapes and finiteness."""
    _same_shape(token_level_rewards, response_mask, "token_level_rewards", "response_mask")
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards must have shape [B, T], got {tuple(token_level_rewards.shape)}")
    if not bool(torch.isfinite(token_level_rewards).all()):
        raise ValueError("token_level_rewards must be finite")
    return token_level_rewards.detach().sum(dim=-1)


def masked_whiten(values: Tensor, mask: Tensor) -> Tensor:
    """verl ``masked_whiten``: (x - mean) / sqrt(var + 1e-8) with the masked mean and the unbiased masked
    variance (n / (n - 1)) over every masked-in element of the batch. Fewer than 2 elements (verl raises):
    zeros, nothing to whiten against."""
    n = float(mask.sum())
    if n < 2:
        return torch.zeros_like(values)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask) * (n / (n - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


@register_adv_est("grpo")
def grpo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, *,
                           norm_adv_by_std: bool = True, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """verl ``compute_grpo_outcome_advantage``: group_normalized_advantages of the sequence scores, on every
    response token (``norm_adv_by_std`` is verl's ``norm_adv_by_std_in_grpo``; false is Dr. GRPO)."""
    scores = _outcome_scores(token_level_rewards, response_mask)
    adv = broadcast_to_tokens(group_normalized_advantages(scores, index, norm_by_std=norm_adv_by_std, eps=epsilon),
                              response_mask)
    return adv, adv


@register_adv_est("rloo")
def rloo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index) -> tuple[Tensor, Tensor]:
    """RLOO (arXiv 2402.14740; verl ``compute_rloo_outcome_advantage``): each score minus the mean of the OTHER
    members of its group, A_i = s_i n/(n-1) - mean_g n/(n-1). A group of one keeps its raw score (as verl)."""
    scores = _outcome_scores(token_level_rewards, response_mask).clone()
    with torch.no_grad():
        for idx in _groups(index, scores.shape[0]):
            n = len(idx)
            if n > 1:
                mean = torch.mean(scores[idx])
                scores[idx] = scores[idx] * n / (n - 1) - mean * n / (n - 1)
    adv = broadcast_to_tokens(scores, response_mask)
    return adv, adv


@register_adv_est("opo")
def opo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index) -> tuple[Tensor, Tensor]:
    """OPO (arXiv 2505.23585; verl ``compute_opo_outcome_advantage``): the baseline is the length-weighted
    mean score of the group, b_g = sum(|y_j| s_j) / sum(|y_j|), |y| = response tokens; A_i = s_i - b_g.
    A group of one has baseline 0."""
    scores = _outcome_scores(token_level_rewards, response_mask).clone()
    lengths = response_mask.to(scores.dtype).sum(dim=-1)
    with torch.no_grad():
        for idx in _groups(index, scores.shape[0]):
            if len(idx) > 1:
                s, ln = scores[idx], lengths[idx]
                scores[idx] = s - (ln * s).sum() / ln.sum()
    adv = broadcast_to_tokens(scores, response_mask)
    return adv, adv


@register_adv_est("reinforce_plus_plus")
def reinforce_plus_plus_advantage(token_level_rewards: Tensor, response_mask: Tensor, index=None, *,
                                  gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (arXiv 2501.03262; verl ``compute_reinforce_plus_plus_outcome_advantage``): the discounted
    return G_t = r_t + gamma G_{t+1} over response tokens (masked-out positions carry G through unchanged),
    then whitened over every response token of the batch (masked_whiten). No group baseline."""
    _outcome_scores(token_level_rewards, response_mask)
    with torch.no_grad():
        r, m = token_level_rewards.detach(), response_mask.to(token_level_rewards.dtype)
        returns = torch.zeros_like(r)
        running = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            new = r[:, t] + gamma * running
            returns[:, t] = new * m[:, t]
            running = new * m[:, t] + running * (1 - m[:, t])
        adv = masked_whiten(returns, m) * m
    return adv, returns


@register_adv_est("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                           index) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (verl ``compute_reinforce_plus_plus_baseline_outcome_advantage``): s_i - mean_g
    (mean 0 for a group of one) on every response token, then whitened over the batch's response tokens."""
    scores = _outcome_scores(token_level_rewards, response_mask).clone()
    with torch.no_grad():
        for idx in _groups(index, scores.shape[0]):
            if len(idx) > 1:
                scores[idx] = scores[idx] - torch.mean(scores[idx])
        m = response_mask.to(scores.dtype)
        tiled = scores.unsqueeze(-1) * m
        adv = masked_whiten(tiled, m) * m
    return adv, adv


@register_adv_est("remax")
def remax_advantage(token_level_rewards: Tensor, response_mask: Tensor, index=None, *,
                    reward_baselines: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ReMax (arXiv 2310.10505; verl ``compute_remax_outcome_advantage``): returns G_t = sum_{t' >= t} r_t'
    (masked), A_t = G_t - b m_t where b [B] is the score of the prompt's GREEDY response (the trainer samples
    and scores one per prompt: ``reward_baselines``)."""
    _outcome_scores(token_level_rewards, response_mask)
    if reward_baselines is None or reward_baselines.shape != token_level_rewards.shape[:1]:
        raise ValueError("remax needs reward_baselines: one greedy-response score per row, shape [B]")
    with torch.no_grad():
        m = response_mask.to(token_level_rewards.dtype)
        returns = (token_level_rewards.detach() * m).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
        adv = returns - reward_baselines.to(returns.dtype).unsqueeze(-1) * m
    return adv, returns


@register_adv_est("gpg")
def gpg_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, *,
                          f_norm: float = 1.0) -> tuple[Tensor, Tensor]:
    """GPG (arXiv 2504.02546; verl ``compute_gpg_outcome_advantage``): A_i = alpha (s_i - mean_g) / f_norm with
    alpha = B / max(1, #nonzero scores in the batch) (mean 0 for a group of one). No std normalisation."""
    scores = _outcome_scores(token_level_rewards, response_mask).clone()
    with torch.no_grad():
        alpha = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
        means = torch.zeros_like(scores)
        for idx in _groups(index, scores.shape[0]):
            if len(idx) > 1:
                means[idx] = torch.mean(scores[idx])
        scores = alpha * (scores - means) / f_norm
    adv = broadcast_to_tokens(scores, response_mask)
    return adv, adv


@register_adv_est("grpo_passk")
def grpo_passk_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, *,
                         norm_adv_by_std: bool = True, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Pass@k (arXiv 2503.19595; verl ``compute_grpo_passk_outcome_advantage``): only the best response of
    each group gets an advantage, r_max - r_second_max (divided by std_g + eps if norm_adv_by_std). verl
    raises on a group of one; here it gets 0 (a skipped reward failure can leave one)."""
    scores = _outcome_scores(token_level_rewards, response_mask)
    adv = torch.zeros_like(scores)
    with torch.no_grad():
        for idx in _groups(index, scores.shape[0]):
            if len(idx) < 2:
                continue
            rewards = scores[idx]
            top, top_idx = torch.topk(rewards, 2)
            a = top[0] - top[1]
            if norm_adv_by_std:
                a = a / (torch.std(rewards) + epsilon)
            adv[idx[top_idx[0]]] = a
    adv = broadcast_to_tokens(adv, response_mask)
    return adv, adv


def outcome_token_rewards(scores: Tensor, response_mask: Tensor) -> Tensor:
    """Token-level rewards [B, T] of outcome scores [B]: each score on its response's last token (verl's
    reward manager places it there); a row with no response token keeps it on column 0 (masked out, but
    ``sum(-1)`` is still the score)."""
    if scores.dim() != 1 or response_mask.dim() != 2 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(f"need scores [B] and response_mask [B, T], got {tuple(scores.shape)} and "
                         f"{tuple(response_mask.shape)}")
    m = response_mask.bool()
    cols = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, cols, torch.full_like(cols, -1)).max(dim=-1).values.clamp(min=0)
    out = torch.zeros(m.shape, dtype=scores.dtype, device=scores.device)
    out[torch.arange(m.shape[0], device=m.device), last] = scores
    return out


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


# ----------------------------------------------------------------------------- more policy losses (registry)
# Each follows verl 0.9.1's function of the same name in core_algos.py, the stop-gradient placement included,
# so gradients w.r.t. log_prob match too. Aggregation goes through agg_loss with the global counts (the
# micro-batch protocol in the module docstring). Statistics verl does not report for a loss are 0 here.
def _agg(loss_mat, mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor):
    return agg_loss(loss_mat, mask, loss_agg_mode, global_tokens=global_tokens, global_seqs=global_seqs,
                    loss_scale_factor=loss_scale_factor)


def _stat(x: Tensor, mask: Tensor, like: Tensor) -> Tensor:
    """A detached masked mean in at least float32 (a loss statistic)."""
    with torch.no_grad():
        return masked_mean(x.detach().to(torch.promote_types(like.dtype, torch.float32)), mask)


def _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights=None) -> None:
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        _same_shape(log_prob, t, "log_prob", name)
    if rollout_is_weights is not None:
        _same_shape(log_prob, rollout_is_weights, "log_prob", "rollout_is_weights")


def _weighted(pg_losses: Tensor, rollout_is_weights: Tensor | None) -> Tensor:
    return pg_losses if rollout_is_weights is None else pg_losses * rollout_is_weights.detach()


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


@register_policy_loss("gspo")
def policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low: float = 0.2,
                     clip_ratio_high: float = 0.2, loss_agg_mode: str = "seq-mean-token-mean", global_tokens=None,
                     global_seqs=None, loss_scale_factor=None, rollout_is_weights=None) -> PolicyLossOutput:
    """GSPO (arXiv 2507.18071; verl ``compute_policy_loss_gspo``): a sequence-level ratio
        log s_i = mean_t (logp - old_logp) over response tokens (no clamp)
        log s_it = logp - sg(logp) + sg(log s_i), clamped above at 10;   s_it = exp(log s_it)
        loss = max(-A s_it, -A clamp(s_it, 1 - clip_low, 1 + clip_high)), aggregated by loss_agg_mode
    The value of s_it is s_i on every token; its gradient is s_i d logp_t (the stop-gradient construction).
    GSPO's clip range is small (the paper: 3e-4 / 4e-4). pg_clipfrac_lower is 0 (no dual clip)."""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    neg_kl = log_prob - old_log_prob
    seq_len = response_mask.to(log_prob.dtype).sum(dim=-1).clamp(min=1)
    neg_kl_seq = masked_sum(neg_kl, response_mask, dim=-1) / seq_len
    log_ratio = torch.clamp(log_prob - log_prob.detach() + neg_kl_seq.detach().unsqueeze(-1), max=10.0)
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = _weighted(torch.maximum(pg_losses1, pg_losses2), rollout_is_weights)
    pg_loss = _agg(pg_losses, response_mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return PolicyLossOutput(pg_loss, _stat(torch.gt(pg_losses2, pg_losses1), response_mask, log_prob),
                            _stat(-neg_kl, response_mask, log_prob), _zero(log_prob))


@register_policy_loss("sapo")
def policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask, *, tau_pos: float = 1.0,
                     tau_neg: float = 1.05, loss_agg_mode: str = "seq-mean-token-mean", global_tokens=None,
                     global_seqs=None, loss_scale_factor=None, rollout_is_weights=None) -> PolicyLossOutput:
    """SAPO (arXiv 2511.20347; verl ``compute_policy_loss_sapo``): a smooth gate in place of the clip,
        r = exp(clamp(logp - old_logp, -20, 20));  tau = tau_pos if A > 0 else tau_neg
        f(r) = sigmoid(tau (r - 1)) 4 / tau;  loss = -f(r) A
    aggregated ALWAYS as seq-mean-token-mean (verl ignores loss_agg_mode here too). No clip statistics (0)."""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(neg_kl)
    taus = torch.where(advantages > 0, torch.as_tensor(tau_pos, dtype=advantages.dtype, device=advantages.device),
                       torch.as_tensor(tau_neg, dtype=advantages.dtype, device=advantages.device))
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    pg_losses = _weighted(-gates * advantages, rollout_is_weights)
    pg_loss = _agg(pg_losses, response_mask, "seq-mean-token-mean", global_tokens, global_seqs, loss_scale_factor)
    return PolicyLossOutput(pg_loss, _zero(log_prob), _stat(-neg_kl, response_mask, log_prob), _zero(log_prob))


@register_policy_loss("cispo")
def policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low: float = 0.2,
                      clip_ratio_high: float = 0.2, loss_agg_mode: str = "token-mean", global_tokens=None,
                      global_seqs=None, loss_scale_factor=None, rollout_is_weights=None) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, arXiv 2506.13585; verl ``compute_policy_loss_cispo``): clip the importance weight,
    not the update, and stop its gradient:
        r = exp(clamp(logp - old_logp, -20, 20));  loss = -sg(clamp(r, 1 - clip_low, 1 + clip_high)) A logp
    Every token keeps a gradient (A logp scaled by the clipped weight). pg_clipfrac: share with r clipped."""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(neg_kl)
    clipped = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = _weighted(-clipped.detach() * advantages * log_prob, rollout_is_weights)
    pg_loss = _agg(pg_losses, response_mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return PolicyLossOutput(pg_loss, _stat(ratio != clipped, response_mask, log_prob),
                            _stat(-neg_kl, response_mask, log_prob), _zero(log_prob))


@register_policy_loss("gpg")
def policy_loss_gpg(old_log_prob, log_prob, advantages, response_mask, *, loss_agg_mode: str = "token-mean",
                    global_tokens=None, global_seqs=None, loss_scale_factor=None,
                    rollout_is_weights=None) -> PolicyLossOutput:
    """GPG (arXiv 2504.02546; verl ``compute_policy_loss_gpg``): plain policy gradient, loss = -logp A, no
    ratio and no clip. verl reports no statistics; ppo_kl here is the usual masked mean of old_logp - logp."""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    pg_losses = _weighted(-log_prob * advantages, rollout_is_weights)
    pg_loss = _agg(pg_losses, response_mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return PolicyLossOutput(pg_loss, _zero(log_prob), _stat(old_log_prob - log_prob, response_mask, log_prob),
                            _zero(log_prob))


@register_policy_loss("clip_cov")
def policy_loss_clip_cov(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low: float = 0.2,
                         clip_ratio_high: float = 0.2, clip_cov_ratio: float = 0.0002, clip_cov_lb: float = 1.0,
                         clip_cov_ub: float = 5.0, loss_agg_mode: str = "token-mean", global_tokens=None,
                         global_seqs=None, loss_scale_factor=None, rollout_is_weights=None) -> PolicyLossOutput:
    """Clip-Cov (arXiv 2505.22617; verl ``compute_policy_loss_clip_cov``): PPO's clipped loss (no log-ratio
    clamp, no dual clip), with the gradient cut on a few high-covariance tokens:
        cov_t = (A_t - mean(A)) (logp_t - mean(logp))  over this (micro-)batch's response tokens
        candidates: response tokens not already clipped with clip_cov_lb < cov_t < clip_cov_ub
        n = max(1, int(clip_cov_ratio x #tokens)); n candidates drawn at random (torch.randperm, the global
        generator) get loss 0.
    pg_clipfrac: share of tokens so cut."""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    if not clip_cov_ratio > 0:
        raise ValueError(f"clip_cov_ratio must be > 0, got {clip_cov_ratio}")
    neg_kl = log_prob - old_log_prob
    ratio = torch.exp(neg_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    valid = response_mask > 0
    with torch.no_grad():
        clip_by_origin = (pg_losses2 > pg_losses1) & valid
        cov = (advantages - masked_mean(advantages, response_mask)) * (
            log_prob.detach() - masked_mean(log_prob.detach(), response_mask))
        cov = cov.masked_fill(~valid | clip_by_origin, -math.inf)
        clip_num = max(int(clip_cov_ratio * float(response_mask.sum())), 1)
        cand = torch.nonzero((cov < clip_cov_ub) & (cov > clip_cov_lb) & valid)
        if len(cand) > 0:
            cand = cand[torch.randperm(len(cand))[:min(clip_num, len(cand))]]
        corr = torch.ones_like(advantages)
        corr[cand[:, 0], cand[:, 1]] = 0
    pg_losses = _weighted(torch.maximum(pg_losses1, pg_losses2) * corr, rollout_is_weights)
    pg_loss = _agg(pg_losses, response_mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return PolicyLossOutput(pg_loss, _stat(corr == 0, response_mask, log_prob), _stat(-neg_kl, response_mask, log_prob),
                            _zero(log_prob))


@register_policy_loss("kl_cov")
def policy_loss_kl_cov(old_log_prob, log_prob, advantages, response_mask, *, kl_cov_ratio: float = 0.0002,
                       ppo_kl_coef: float = 0.1, loss_agg_mode: str = "token-mean", global_tokens=None,
                       global_seqs=None, loss_scale_factor=None, rollout_is_weights=None) -> PolicyLossOutput:
    """KL-Cov (arXiv 2505.22617; verl ``compute_policy_loss_kl_cov``): the unclipped surrogate -A r (r = exp(logp -
    old_logp), no clamp), plus ppo_kl_coef |logp - old_logp| on the top max(1, int(kl_cov_ratio x #tokens))
    response tokens by covariance (A - mean A)(logp - mean logp). ppo_kl is the mean |log-ratio| (as verl);
    pg_clipfrac the share of tokens given the KL term (verl reports none)."""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    if not kl_cov_ratio > 0:
        raise ValueError(f"kl_cov_ratio must be > 0, got {kl_cov_ratio}")
    neg_kl = log_prob - old_log_prob
    ratio = torch.exp(neg_kl)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = pg_losses1 + ppo_kl_coef * neg_kl.abs()
    valid = response_mask > 0
    with torch.no_grad():
        picked = torch.zeros_like(valid)
        flat_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        if len(flat_idx):
            adv_v = advantages[valid].detach().reshape(-1).cpu()
            logp_v = log_prob[valid].detach().reshape(-1).cpu()
            cov = (adv_v - adv_v.mean()) * (logp_v - logp_v.mean())
            k = max(1, int(len(cov) * kl_cov_ratio))
            top = flat_idx[torch.topk(cov, k, largest=True).indices.to(flat_idx.device)]
            picked.view(-1)[top] = True
    pg_losses = _weighted(torch.where(picked, pg_losses_kl, pg_losses1), rollout_is_weights)
    pg_loss = _agg(pg_losses, response_mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return PolicyLossOutput(pg_loss, _stat(picked, response_mask, log_prob), _stat(neg_kl.abs(), response_mask, log_prob),
                            _zero(log_prob))


@register_policy_loss("geo_mean")
def policy_loss_geo_mean(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low: float = 0.2,
                         clip_ratio_high: float = 0.2, loss_agg_mode: str = "token-mean", global_tokens=None,
                         global_seqs=None, loss_scale_factor=None, rollout_is_weights=None) -> PolicyLossOutput:
    """GMPO (arXiv 2507.20673; verl ``compute_policy_loss_geo_mean``): the geometric mean of token ratios, with
    the clip on the log-ratio per token:
        d = logp - old_logp (no clamp); d_c = clamp(d, -clip_low, clip_high); s = sign(A)
        d' = s min(s d, s d_c);  r_i = exp(sum_t d' / (|y_i| + 1e-8));  A_i = sum_t A / (|y_i| + 1e-8)
        loss_i = -A_i r_i;  pg_loss = sum_i loss_i / N_seq   (loss_agg_mode is not used)
    verl takes torch.mean over every row of the micro-batch; here the sum is divided by the global sequence
    count (rows with a response token), the micro-batch protocol's share. Rollout IS weights enter as their
    per-sequence geometric mean. pg_clipfrac / _lower: share of tokens with d clipped where A > 0 / A < 0."""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    m = response_mask.to(log_prob.dtype)
    neg_kl = log_prob - old_log_prob
    sgn = torch.sign(advantages)
    neg_kl_clamp = torch.clamp(neg_kl, -clip_ratio_low, clip_ratio_high)
    neg_kl_min = sgn * torch.min(sgn * neg_kl, sgn * neg_kl_clamp)
    mask_sum = m.sum(dim=-1)
    ratio = torch.exp(masked_sum(neg_kl_min, response_mask, dim=-1) / (mask_sum + 1e-8))
    advantage = masked_sum(advantages, response_mask, dim=-1) / (mask_sum + 1e-8)
    pg_losses = -advantage * ratio
    if rollout_is_weights is not None:
        w = torch.exp(masked_sum(torch.log(rollout_is_weights.detach() + 1e-10), response_mask, dim=-1) / (mask_sum + 1e-8))
        pg_losses = pg_losses * w
    local = float((mask_sum > 0).sum())
    denom = local if global_seqs is None else float(global_seqs)
    pg_loss = pg_losses.sum() / denom if denom else pg_losses.sum() * 0.0
    clipped = torch.ne(neg_kl, neg_kl_clamp)
    return PolicyLossOutput(pg_loss, _stat(clipped & (advantages > 0), response_mask, log_prob),
                            _stat(-neg_kl, response_mask, log_prob), _stat(clipped & (advantages < 0), response_mask, log_prob))


@register_policy_loss("dro")
def policy_loss_dro(old_log_prob, log_prob, advantages, response_mask, *, dro_beta: float | None = None,
                    loss_agg_mode: str = "token-mean", global_tokens=None, global_seqs=None, loss_scale_factor=None,
                    rollout_is_weights=None) -> PolicyLossOutput:
    """DRO (Direct Reward Optimization, arXiv 2405.19107; verl ``compute_policy_loss_dro``): policy gradient with a
    quadratic log-ratio penalty, loss = -(logp A - 0.5 dro_beta (logp - old_logp)^2). dro_beta > 0 is required
    (verl's default is None: it must be set). No clip statistics (0)."""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    if dro_beta is None or not dro_beta > 0:
        raise ValueError(f"dro needs dro_beta > 0, got {dro_beta}")
    log_ratio = log_prob - old_log_prob
    pg_losses = _weighted(-(log_prob * advantages - 0.5 * dro_beta * log_ratio.square()), rollout_is_weights)
    pg_loss = _agg(pg_losses, response_mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return PolicyLossOutput(pg_loss, _zero(log_prob), _stat(-log_ratio, response_mask, log_prob), _zero(log_prob))


def _dppo(valid_pos: Tensor, valid_neg: Tensor, ratio: Tensor, neg_kl: Tensor, log_prob, advantages, response_mask,
          clip_ratio_c, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor, rollout_is_weights):
    truncated = torch.clamp(ratio, max=clip_ratio_c).detach()
    valid = torch.where(advantages > 0, valid_pos, valid_neg).detach().to(log_prob.dtype)
    pg_losses = _weighted(-advantages * truncated * log_prob * valid, rollout_is_weights)
    pg_loss = _agg(pg_losses, response_mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return PolicyLossOutput(pg_loss, _stat(1.0 - valid, response_mask, log_prob), _stat(-neg_kl, response_mask, log_prob),
                            _stat((ratio > clip_ratio_c).to(valid.dtype) * valid, response_mask, log_prob))


@register_policy_loss("dppo_tv")
def policy_loss_dppo_tv(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low: float = 0.2,
                        clip_ratio_high: float = 0.2, clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean",
                        global_tokens=None, global_seqs=None, loss_scale_factor=None,
                        rollout_is_weights=None) -> PolicyLossOutput:
    """DPPO-Binary-TV (arXiv 2602.04879; verl ``compute_policy_loss_dppo_tv``): a trust region on the token's
    probability, not its ratio. clip_ratio_low/high are here the TV thresholds and clip_ratio_c the truncation:
        r = exp(clamp(logp - old_logp, -20, 20));  p = exp(logp), p_old = exp(old_logp)
        valid = (p - p_old <= clip_high) if A > 0 else (p - p_old >= -clip_low)      (no gradient)
        loss = -A sg(min(r, clip_ratio_c)) logp valid
    pg_clipfrac: share of tokens outside the region; pg_clipfrac_lower: share inside it with r > clip_ratio_c."""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(neg_kl)
    diff = torch.exp(log_prob) - torch.exp(old_log_prob)
    return _dppo(diff <= clip_ratio_high, diff >= -clip_ratio_low, ratio, neg_kl, log_prob, advantages, response_mask,
                 clip_ratio_c, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor, rollout_is_weights)


@register_policy_loss("dppo_kl")
def policy_loss_dppo_kl(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low: float = 0.2,
                        clip_ratio_high: float = 0.2, clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean",
                        global_tokens=None, global_seqs=None, loss_scale_factor=None,
                        rollout_is_weights=None) -> PolicyLossOutput:
    """DPPO-Binary-KL (arXiv 2602.04879; verl ``compute_policy_loss_dppo_kl``): as dppo_tv with the binary KL
        KL_b = p_old (old_logp - logp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))
        valid = (KL_b <= clip_high or p <= p_old) if A > 0 else (KL_b <= clip_low or p >= p_old)"""
    _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(neg_kl)
    prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)
    binary_kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
        (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
    return _dppo((binary_kl <= clip_ratio_high) | (prob <= old_prob), (binary_kl <= clip_ratio_low) | (prob >= old_prob),
                 ratio, neg_kl, log_prob, advantages, response_mask, clip_ratio_c, loss_agg_mode, global_tokens,
                 global_seqs, loss_scale_factor, rollout_is_weights)


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
