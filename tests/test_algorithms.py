"""grpo.algorithms against values computed by hand (float64 wherever exact values are compared)."""

import math

import pytest
import torch

from grpo.algorithms import core as alg
from grpo.algorithms.logits import entropy_from_logits, entropy_from_logits_chunked, log_probs_from_logits

torch.set_num_threads(1)
D = torch.float64
EPS = 1e-6


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-12):
    a = a if isinstance(a, torch.Tensor) else t(a)
    b = b if isinstance(b, torch.Tensor) else t(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a.to(D), b.to(D), rtol=tol, atol=tol), (a, b)


# ------------------------------------------------------------------ advantages
def test_grpo_advantage_one_group_unbiased_std():
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.5773502691896258
    adv = alg.group_normalized_advantages(t([1.0, 0.0, 0.0, 1.0]), t([0, 0, 0, 0], torch.long))
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    close(adv, [a, -a, -a, a])


def test_grpo_advantage_interleaved_groups_with_string_ids():
    # group "p": [0, 1, 2] -> mean 1, std sqrt((1+0+1)/2) = 1 -> [-1, 0, 1] / (1 + eps)
    # group "q": [3, 3]    -> std 0 -> advantages 0 (not NaN)
    adv = alg.group_normalized_advantages(t([0.0, 3.0, 1.0, 3.0, 2.0]), ["p", "q", "p", "q", "p"])
    close(adv, [-1 / (1 + EPS), 0.0, 0.0, 0.0, 1 / (1 + EPS)])


def test_grpo_group_of_one_keeps_the_raw_score_like_verl():
    # verl: a single-member group has mean 0, std 1 -> advantage = score / (1 + eps), not 0
    adv = alg.group_normalized_advantages(t([0.7, 1.0, 0.0]), [5, 9, 9])
    s = 1 / (math.sqrt(0.5) + EPS)  # group 9: mean .5, std sqrt((.25+.25)/1)
    close(adv, [0.7 / (1 + EPS), 0.5 * s, -0.5 * s])
    close(alg.group_normalized_advantages(t([0.7]), [0], norm_by_std=False), [0.7])


def test_grpo_no_std_mode_is_score_minus_mean():
    adv = alg.group_normalized_advantages(t([1.0, 0.0, 0.0, 1.0, 0.25]), [0, 0, 0, 0, 1], norm_by_std=False)
    close(adv, [0.5, -0.5, -0.5, 0.5, 0.25])


def test_grpo_advantage_rejects_bad_input():
    with pytest.raises(ValueError, match="group ids"):
        alg.group_normalized_advantages(t([1.0, 0.0]), [0])
    with pytest.raises(ValueError, match="finite"):
        alg.group_normalized_advantages(t([1.0, float("nan")]), [0, 0])
    with pytest.raises(ValueError, match=r"\[B\]"):
        alg.group_normalized_advantages(t([[1.0]]), [0])


def test_broadcast_to_tokens():
    out = alg.broadcast_to_tokens(t([2.0, -1.0]), t([[1, 1, 0], [1, 0, 0]], torch.long))
    close(out, [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


def test_masked_stats_over_tokens_not_sequences():
    # +1 for 3 tokens, -1 for 2 tokens: token mean = 1/5 = 0.2 although the sequence mean is 0;
    # the pad value 100 is outside the mask and must not show up as the max.
    adv = t([[1.0, 1.0, 1.0], [-1.0, -1.0, 100.0]])
    mask = t([[1, 1, 1], [1, 1, 0]], torch.long)
    assert alg.masked_stats(adv, mask) == pytest.approx({"mean": 0.2, "max": 1.0, "min": -1.0}, abs=1e-15)
    empty = alg.masked_stats(adv, torch.zeros_like(mask))
    assert all(math.isnan(v) for v in empty.values())


def test_masked_mean_ignores_nonfinite_padding():
    x = t([[1.0, float("inf")], [3.0, float("nan")]])
    m = t([[1, 0], [1, 0]])
    close(alg.masked_mean(x, m), 2.0)
    close(alg.masked_mean(x, m, dim=-1), [1.0, 3.0])
    close(alg.masked_sum(x, m), 4.0)


# ------------------------------------------------------------------ clipped policy loss (2x3 example)
# Row 0: A = +1, ratios 1.0 (unclipped), 1.5 (clipped at 1.2), 0.5 (A>0, below 1-eps: not clipped)
# Row 1: A = -2, ratios 0.5 (clipped at 0.8), 4.0 (dual clip to 3), masked token with log-ratio 25
RATIOS = [[1.0, 1.5, 0.5], [0.5, 4.0, math.exp(25.0)]]
MASK = [[1, 1, 1], [1, 1, 0]]
# per-token loss by hand:
#  (0,0) max(-1, -1) = -1          (0,1) max(-1.5, -1.2) = -1.2 (clip)   (0,2) max(-0.5, -0.8) = -0.5
#  (1,0) max(1.0, 1.6) = 1.6 (clip) (1,1) min(3*2=6, max(8, 2.4)=8) = 6 (dual clip)
LOSS = [[-1.0, -1.2, -0.5], [1.6, 6.0]]


def _example():
    old = t([[-1.0, -2.0, -0.5], [-1.5, -3.0, -30.0]])
    logr = t([[math.log(r) for r in RATIOS[0]], [math.log(0.5), math.log(4.0), 25.0]])
    logp = (old + logr).requires_grad_(True)
    adv = alg.broadcast_to_tokens(t([1.0, -2.0]), t(MASK))
    return old, logp, adv, t(MASK)


def test_policy_loss_hand_computed_token_mean():
    old, logp, adv, mask = _example()
    out = alg.policy_loss_clipped(old, logp, adv, mask)
    close(out.pg_loss, (-1.0 - 1.2 - 0.5 + 1.6 + 6.0) / 5)  # 0.98
    close(out.pg_clipfrac, 2 / 5)  # (0,1) and (1,0); the dual-clipped (1,1) has L2=2.4 < L1=8
    close(out.pg_clipfrac_lower, 1 / 5)  # (1,1)
    close(out.ppo_kl, -(0 + math.log(1.5) + math.log(0.5) + math.log(0.5) + math.log(4.0)) / 5)
    assert not (out.pg_clipfrac.requires_grad or out.ppo_kl.requires_grad or out.pg_clipfrac_lower.requires_grad)
    # gradient: only unclipped tokens carry one, d(-A r)/dlogp = -A r, / 5 tokens; clipped, dual-clipped
    # and masked tokens get exactly 0
    out.pg_loss.backward()
    close(logp.grad, [[-1.0 / 5, 0.0, -0.5 / 5], [0.0, 0.0, 0.0]])


def test_policy_loss_with_rollout_is_weights_by_hand():
    # per-token clipped losses of _example: [[-1.0, -1.2, -0.5], [1.6, 6.0, masked]]; TIS weights scale each one
    old, logp, adv, mask = _example()
    w = t([[2.0, 0.5, 1.0], [0.25, 1.0, 7.0]])
    out = alg.policy_loss_clipped(old, logp, adv, mask, rollout_is_weights=w)
    close(out.pg_loss, (-2.0 - 0.6 - 0.5 + 0.4 + 6.0) / 5)
    close(out.pg_clipfrac, 2 / 5)  # the clip statistics are the unweighted ratio's
    out.pg_loss.backward()
    close(logp.grad, [[-2.0 / 5, 0.0, -0.5 / 5], [0.0, 0.0, 0.0]])  # unclipped tokens: -A r w / 5
    with pytest.raises(ValueError, match="rollout_is_weights"):
        alg.policy_loss_clipped(old, logp, adv, mask, rollout_is_weights=w[:, :2])


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 4.9 / 5),
    ("seq-mean-token-mean", ((-2.7 / 3) + (7.6 / 2)) / 2),  # (-0.9 + 3.8) / 2 = 1.45
    ("seq-mean-token-sum", (-2.7 + 7.6) / 2),  # 2.45
    ("seq-mean-token-sum-norm", (-2.7 + 7.6) / 2 / 3),  # verl 0.9.1: the seq-mean, then divided by T = 3
])
def test_policy_loss_each_agg_mode_by_hand(mode, expected):
    old, logp, adv, mask = _example()
    close(alg.policy_loss_clipped(old, logp, adv, mask, loss_agg_mode=mode).pg_loss, expected)


def test_policy_loss_log_ratio_clamped_at_20():
    # log-ratio 30 is clamped to 20: ppo_kl = -20 (not -30), ratio exp(20) -> clip to 1.2 -> loss -1.2
    out = alg.policy_loss_clipped(t([[0.0]]), t([[30.0]]), t([[1.0]]), t([[1]]))
    close(out.ppo_kl, -20.0)
    close(out.pg_loss, -1.2)
    close(out.pg_clipfrac, 1.0)
    # A < 0 with a huge ratio: the dual clip bounds the loss at -A * 3 = 3
    close(alg.policy_loss_clipped(t([[0.0]]), t([[30.0]]), t([[-1.0]]), t([[1]])).pg_loss, 3.0)


def test_policy_loss_asymmetric_clip_and_bad_clip_c():
    # clip_high 0.28 (DAPO style): ratio 1.5 with A=1 -> -1.28
    out = alg.policy_loss_clipped(t([[0.0]]), t([[math.log(1.5)]]), t([[1.0]]), t([[1]]), clip_ratio_high=0.28)
    close(out.pg_loss, -1.28)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        alg.policy_loss_clipped(t([[0.0]]), t([[0.0]]), t([[1.0]]), t([[1]]), clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="shape"):
        alg.policy_loss_clipped(t([[0.0]]), t([[0.0, 1.0]]), t([[1.0]]), t([[1]]))


# ------------------------------------------------------------------ agg_loss and micro-batches
def test_agg_loss_modes_by_hand_with_empty_sequence():
    loss = t([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # lengths 3, 1, 0 (empty seq not counted)
    close(alg.agg_loss(loss, mask, "token-mean"), (1 + 2 + 3 + 4) / 4)
    close(alg.agg_loss(loss, mask, "seq-mean-token-mean"), (6 / 3 + 4 / 1) / 2)
    close(alg.agg_loss(loss, mask, "seq-mean-token-sum"), (6 + 4) / 2)
    # verl 0.9.1's agg_loss: the seq-mean-token-sum value (over the 2 non-empty sequences) / the horizon
    close(alg.agg_loss(loss, mask, "seq-mean-token-sum-norm"), (6 + 4) / 2 / 4)
    close(alg.agg_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=10), (6 + 4) / 2 / 10)
    close(alg.agg_loss(loss, mask, "seq-mean-token-sum-norm", global_seqs=5, loss_scale_factor=10), 10 / 5 / 10)
    close(alg.agg_loss(loss, mask, "token-mean", global_tokens=20), 10 / 20)
    close(alg.agg_loss(loss, mask, "seq-mean-token-sum", global_seqs=5), 10 / 5)


def test_agg_loss_errors_and_empty_batch():
    loss, mask = t([[1.0, 2.0]]), t([[1, 1]])
    with pytest.raises(ValueError, match="known: token-mean, seq-mean-token-mean"):
        alg.agg_loss(loss, mask, "token-sum")
    with pytest.raises(ValueError, match="smaller than this micro-batch"):
        alg.agg_loss(loss, mask, "token-mean", global_tokens=1)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        alg.agg_loss(loss, mask, "seq-mean-token-sum-norm", global_tokens=2)
    # nothing to average: an exact 0 that still backpropagates (zero gradient), not NaN
    x = t([[5.0, 6.0]]).requires_grad_(True)
    for mode in alg.LOSS_AGG_MODES:
        out = alg.agg_loss(x, torch.zeros(1, 2, dtype=D), mode)
        assert out.item() == 0.0
        out.backward()
    assert x.grad.abs().sum().item() == 0.0


@pytest.mark.parametrize("mode", alg.LOSS_AGG_MODES)
def test_micro_batches_with_global_counts_sum_to_the_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 0, 4, 1, 3, 5]  # includes an empty response
    T = 5
    mask = t([[1 if j < n else 0 for j in range(T)] for n in lengths])
    base = torch.randn(len(lengths), T, generator=g, dtype=D)
    base = base + (1 - mask) * 1e6  # garbage in padding must not matter
    horizon = T if mode == "seq-mean-token-sum-norm" else None

    full_x = base.clone().requires_grad_(True)
    full = alg.agg_loss(full_x, mask, mode, loss_scale_factor=horizon)
    full.backward()

    # micro-batches of 3, 2 and 2 rows; each trimmed to its own padded width (widths differ)
    splits = [(0, 3), (3, 5), (5, 7)]
    counts = alg.loss_denominators([mask[a:b] for a, b in splits])
    assert counts == (sum(lengths), 6.0)
    micro_x = base.clone().requires_grad_(True)
    total = 0.0
    for a, b in splits:
        w = max(1, max(lengths[a:b]))
        loss = alg.agg_loss(micro_x[a:b, :w], mask[a:b, :w], mode, global_tokens=counts.tokens,
                            global_seqs=counts.seqs, loss_scale_factor=horizon)
        loss.backward()
        total = total + loss.detach()
    close(total, full.detach())
    close(micro_x.grad, full_x.grad)

    # two "DDP ranks" (rows 0-3 and 4-6): each sums its micro-batch losses times W=2; averaging the two
    # ranks (what DDP does to gradients) gives the full-batch value again
    W = 2
    counts2 = alg.loss_denominators([mask[0:4]])
    counts2 = alg.LossCounts(*(x + y for x, y in zip(counts2, alg.loss_denominators([mask[4:7]]))))
    ranks = [
        W * alg.agg_loss(base[a:b], mask[a:b], mode, global_tokens=counts2.tokens, global_seqs=counts2.seqs,
                         loss_scale_factor=horizon)
        for a, b in [(0, 4), (4, 7)]
    ]
    close(sum(ranks) / W, full.detach())


def test_policy_loss_micro_batches_match_full_batch():
    old, logp, adv, mask = _example()
    full = alg.policy_loss_clipped(old, logp.detach(), adv, mask).pg_loss
    counts = alg.loss_denominators([mask[:1], mask[1:]])
    parts = [alg.policy_loss_clipped(old[s], logp.detach()[s], adv[s], mask[s], global_tokens=counts.tokens,
                                     global_seqs=counts.seqs).pg_loss for s in (slice(0, 1), slice(1, 2))]
    close(parts[0], -2.7 / 5)
    close(parts[1], 7.6 / 5)
    close(parts[0] + parts[1], full)


# ------------------------------------------------------------------ KL penalties
def test_kl_kinds_by_hand():
    lp = t([0.0, -1.0, -2.0, -1.0])
    ref = t([-1.0, -1.0, 0.0, 2.0])
    d = [1.0, 0.0, -2.0, -3.0]  # lp - ref
    for kind in ("k1", "kl"):
        close(alg.kl_penalty(lp, ref, kind), d)
    close(alg.kl_penalty(lp, ref, "abs"), [1.0, 0.0, 2.0, 3.0])
    for kind in ("k2", "mse"):
        close(alg.kl_penalty(lp, ref, kind), [0.5, 0.0, 2.0, 4.5])
    # k3: x = ref - lp = [-1, 0, 2, 3]; exp(x) - x - 1 = [e^-1, 0, e^2 - 3, e^3 - 4 = 16.09 -> clamp 10]
    for kind in ("k3", "low_var_kl"):
        close(alg.kl_penalty(lp, ref, kind), [math.exp(-1), 0.0, math.exp(2) - 3, 10.0])


def test_k3_log_ratio_clamp_keeps_gradients_finite():
    # x = ref - lp = 1000 would make exp(x) = inf and the gradient NaN; clamped to 20 it is 10 with grad 0.
    # x = -25 is clamped to -20: exp(-20) + 20 - 1 = 19.000000002 -> clamped to 10.
    lp = t([-1000.0, 25.0, 0.1]).requires_grad_(True)
    ref = t([0.0, 0.0, 0.0])
    out = alg.kl_penalty(lp, ref, "k3")
    close(out[:2], [10.0, 10.0])
    out.sum().backward()
    assert torch.isfinite(lp.grad).all()
    # unclamped token: d/dlp [exp(ref - lp) - (ref - lp) - 1] = 1 - exp(ref - lp)
    close(lp.grad, [0.0, 0.0, 1 - math.exp(-0.1)])


def test_straight_through_plus_variants():
    lp = t([0.5, -0.3]).requires_grad_(True)
    ref = t([0.0, 0.2])
    for kind in ("k1", "k3", "abs", "k2"):
        out = alg.kl_penalty(lp, ref, kind + "+")
        close(out, alg.kl_penalty(lp.detach(), ref, kind))  # value of the base kind
        (grad,) = torch.autograd.grad(out.sum(), lp)
        close(grad, lp.detach() - ref)  # gradient of k2 = 0.5 (lp - ref)^2


def test_kl_unknown_kind_lists_known():
    with pytest.raises(ValueError, match=r"known: .*low_var_kl.*k3\+"):
        alg.kl_penalty(t([0.0]), t([0.0]), "full")


# ------------------------------------------------------------------ logits
def test_entropy_uniform_onehot_and_two_class():
    close(entropy_from_logits(torch.zeros(2, 3, 7, dtype=D)), torch.full((2, 3), math.log(7), dtype=D))
    assert abs(entropy_from_logits(t([100.0, 0.0, 0.0, 0.0])).item()) < 1e-12
    # p = [1/4, 3/4] -> H = -(1/4 ln 1/4 + 3/4 ln 3/4)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(t([0.0, math.log(3.0)])), h)


def test_entropy_chunked_matches_and_upcasts():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, 11, generator=g, dtype=D)
    close(entropy_from_logits_chunked(z, chunk_size=4), entropy_from_logits(z))
    zb = z.to(torch.bfloat16)
    out = entropy_from_logits_chunked(zb, chunk_size=4)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    close(out, entropy_from_logits(zb.double()), tol=1e-5)


def test_log_probs_from_logits_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(2, 5, 13, generator=g, dtype=D) * 5).requires_grad_(True)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    ref = torch.log_softmax(z, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = log_probs_from_logits(z, labels, chunk_size=3)  # 10 positions in chunks of 3
    close(out, ref)
    (g1,) = torch.autograd.grad(out.sum(), z)
    (g2,) = torch.autograd.grad(ref.sum(), z)
    close(g1, g2)
    zb = z.detach().to(torch.bfloat16)
    ob = log_probs_from_logits(zb, labels)
    assert ob.dtype == torch.float32
    ref_b = torch.log_softmax(zb.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(ob, ref_b, tol=1e-5)
    with pytest.raises(ValueError, match="labels shape"):
        log_probs_from_logits(z, labels[:, :4])


# ------------------------------------------------------------------ registries
def test_registering_a_new_estimator_and_loss_by_decorator():
    @alg.register_adv_est("test-raw-score")
    def raw(token_level_rewards, response_mask, index):
        return token_level_rewards, token_level_rewards

    @alg.register_policy_loss("test-vanilla-twice")
    def twice(*args, **kw):
        out = alg.policy_loss_clipped(*args, **kw)
        return out._replace(pg_loss=2 * out.pg_loss)

    try:
        assert alg.get_advantage_estimator("test-raw-score") is raw
        close(alg.get_advantage_estimator("test-raw-score")(t([[1.0, 2.0]]), t([[1.0, 1.0]]), [0])[0], [[1.0, 2.0]])
        old, logp, adv, mask = _example()
        close(alg.get_policy_loss("test-vanilla-twice")(old, logp, adv, mask).pg_loss, 2 * 4.9 / 5)
        with pytest.raises(ValueError, match="already registered"):
            alg.register_adv_est("grpo")(raw)
    finally:
        del alg.ADVANTAGE_ESTIMATORS["test-raw-score"], alg.POLICY_LOSSES["test-vanilla-twice"]


def test_registries_and_accessors():
    assert alg.get_advantage_estimator("grpo") is alg.grpo_outcome_advantage
    assert alg.get_policy_loss("vanilla") is alg.policy_loss_clipped
    assert alg.get_kl_penalty("low_var_kl") is alg.kl_k3
    assert alg.validate_loss_agg_mode("seq-mean-token-sum-norm") == "seq-mean-token-sum-norm"
    assert set(alg.KL_PENALTIES) >= {"k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k3+", "low_var_kl+"}
    with pytest.raises(ValueError, match="known: grpo"):
        alg.get_advantage_estimator("gae")
    with pytest.raises(ValueError, match="known: vanilla, gspo"):
        alg.get_policy_loss("ppo_clip")
