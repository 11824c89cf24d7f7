"""The algorithm library (grpo.algorithms.core's registries) against verl 0.9.1's own numbers and hand-computed cases.

tests/fixtures/verl_algos.json holds verl 0.9.1's outputs (values, and each policy loss's gradient w.r.t. log_prob) on
small random batches; scripts/make_verl_reference.py regenerates it from verl's source in a throwaway environment.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from grpo.algorithms import core as alg

D = torch.float64
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "verl_algos.json").read_text())
TOL = dict(rtol=1e-6, atol=1e-6)  # torch.testing.assert_close
APPROX = dict(rel=1e-6, abs=1e-6)  # pytest.approx


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def _loss_cases():
    for s in FIXTURE["loss_sets"]:
        for c in s["cases"]:
            yield pytest.param(s["inputs"], c, id=f"{s['name']}-{c['loss']}-{c['loss_agg_mode']}-{'w' if c['weighted'] else 'nw'}")


def _run_loss(name, inputs, knobs=None, **kw):
    logp = inputs["log_prob"].clone().requires_grad_(True)
    torch.manual_seed(FIXTURE["seed"])  # clip_cov's random pick, as the fixture drew it
    out = alg.call_with_knobs(alg.get_policy_loss(name), inputs["old_log_prob"], logp, inputs["advantages"],
                              inputs["response_mask"], knobs=knobs, **kw)
    (grad,) = torch.autograd.grad(out.pg_loss, logp)
    return out, grad


@pytest.mark.parametrize("inputs,case", list(_loss_cases()))
def test_policy_loss_equals_verl(inputs, case):
    x = {k: t(v) for k, v in inputs.items()}
    out, grad = _run_loss(case["loss"], x, case["knobs"], loss_agg_mode=case["loss_agg_mode"],
                          rollout_is_weights=x["rollout_is_weights"] if case["weighted"] else None)
    assert float(out.pg_loss.detach()) == pytest.approx(case["pg_loss"], **APPROX)
    torch.testing.assert_close(grad, t(case["grad"]), **TOL)
    for k, v in case["metrics"].items():
        assert float(getattr(out, k)) == pytest.approx(v, **APPROX), k


@pytest.mark.parametrize("case", FIXTURE["estimators"]["cases"],
                         ids=[f"{c['estimator']}-{c['knobs']}" for c in FIXTURE["estimators"]["cases"]])
def test_advantage_estimator_equals_verl(case):
    x = FIXTURE["estimators"]["inputs"]
    rows = case["rows"] or list(range(len(x["index"])))
    rewards, mask = t(x["token_level_rewards"])[rows], t(x["response_mask"])[rows]
    knobs = {"gamma": case["knobs"].get("gamma", 1.0),
             "norm_adv_by_std": case["knobs"].get("norm_adv_by_std_in_grpo", True),
             "reward_baselines": t(x["reward_baselines"])[rows]}
    adv, ret = alg.call_with_knobs(alg.get_advantage_estimator(case["estimator"]), rewards, mask,
                                   [x["index"][i] for i in rows], knobs=knobs)
    torch.testing.assert_close(adv, t(case["advantages"]), **TOL)
    torch.testing.assert_close(ret, t(case["returns"]), **TOL)


def test_fixture_covers_every_registered_name():
    assert {c["loss"] for s in FIXTURE["loss_sets"] for c in s["cases"]} == set(alg.POLICY_LOSSES)
    assert {c["estimator"] for c in FIXTURE["estimators"]["cases"]} == set(alg.ADVANTAGE_ESTIMATORS)
    assert FIXTURE["verl"] == "0.9.1"


# ------------------------------------------------------------------ estimators by hand
def _outcome(scores, lengths, T=4):
    mask = torch.zeros(len(scores), T, dtype=D)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return alg.outcome_token_rewards(t(scores), mask), mask


def test_outcome_token_rewards_put_the_score_on_the_last_response_token():
    mask = t([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    r = alg.outcome_token_rewards(t([2.0, 3.0, -1.0]), mask)
    assert r.tolist() == [[0, 0, 2.0, 0], [3.0, 0, 0, 0], [-1.0, 0, 0, 0]]  # a 0-token row keeps its score (sum)


def test_zero_std_group_and_singleton_group_by_hand():
    # group a: tied at 1 -> 0 for every baseline estimator; group b: one member; group c: [1, 0]
    rewards, mask = _outcome([1.0, 1.0, 1.0, 0.6, 1.0, 0.0], [2, 3, 1, 4, 2, 2])
    idx = ["a", "a", "a", "b", "c", "c"]

    def seq(name, **knobs):
        adv, _ = alg.call_with_knobs(alg.get_advantage_estimator(name), rewards, mask, idx, knobs=knobs)
        return (adv.sum(-1) / mask.sum(-1)).tolist()  # per-sequence value (constant over its tokens)

    s = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert seq("grpo") == pytest.approx([0, 0, 0, 0.6 / (1 + 1e-6), s, -s], abs=1e-12)
    assert seq("rloo") == pytest.approx([0, 0, 0, 0.6, 1.0, -1.0], abs=1e-12)  # s_i - mean of the others
    # opo: length-weighted mean of c is (2*1 + 2*0)/4 = .5; b's baseline is 0
    assert seq("opo") == pytest.approx([0, 0, 0, 0.6, 0.5, -0.5], abs=1e-12)
    # gpg: alpha = 6 rows / 5 nonzero scores (a float32 tensor, as verl computes it); no std
    alpha = float(6 / torch.tensor(5))
    assert seq("gpg") == pytest.approx([0, 0, 0, alpha * 0.6, alpha * 0.5, -alpha * 0.5], abs=1e-12)
    # pass@k: only the best of each group of >= 2: a ties (r_max - r_2nd = 0); c: (1 - 0)/(std + eps); b: 0
    assert seq("grpo_passk") == pytest.approx([0, 0, 0, 0, 1 / (math.sqrt(0.5) + 1e-6), 0], abs=1e-12)
    assert seq("grpo_passk", norm_adv_by_std=False) == pytest.approx([0, 0, 0, 0, 1, 0], abs=1e-12)


def test_reinforce_plus_plus_whitens_discounted_returns_over_the_batch_tokens():
    rewards, mask = _outcome([1.0, 0.0], [2, 1])
    adv, ret = alg.call_with_knobs(alg.get_advantage_estimator("reinforce_plus_plus"), rewards, mask, [0, 1],
                                   knobs={"gamma": 0.5})
    assert ret.tolist() == [[0.5, 1.0, 0, 0], [0.0, 0, 0, 0]]  # G_t = r_t + .5 G_{t+1}
    vals = t([0.5, 1.0, 0.0])  # the three response tokens: mean .5, unbiased var .25
    expect = (vals - 0.5) / math.sqrt(0.25 + 1e-8)
    assert adv[mask.bool()].tolist() == pytest.approx(expect.tolist(), abs=1e-12)


def test_remax_subtracts_the_greedy_baseline_and_needs_it():
    rewards, mask = _outcome([1.0, 0.0], [2, 3])
    adv, ret = alg.call_with_knobs(alg.get_advantage_estimator("remax"), rewards, mask, [0, 0],
                                   knobs={"reward_baselines": t([0.25, 0.5])})
    assert (adv * mask).tolist() == [[0.75, 0.75, 0, 0], [-0.5, -0.5, -0.5, 0]]
    with pytest.raises(ValueError, match="reward_baselines"):
        alg.call_with_knobs(alg.get_advantage_estimator("remax"), rewards, mask, [0, 0], knobs={})


# ------------------------------------------------------------------ losses by hand
def _one(logp, old, adv):
    return t([[old]]), t([[logp]]).requires_grad_(True), t([[adv]]), t([[1.0]])


def test_gspo_ratio_is_the_sequence_geometric_mean_with_token_gradients():
    # one sequence of two tokens: log-ratios .1 and .3 -> s = exp(.2) on both tokens; A = 1, no clip (wide range)
    old, logp, adv, mask = t([[-1.0, -2.0]]), t([[-0.9, -1.7]]).requires_grad_(True), t([[1.0, 1.0]]), t([[1.0, 1.0]])
    out = alg.policy_loss_gspo(old, logp, adv, mask, clip_ratio_low=1.0, clip_ratio_high=1.0)
    s = math.exp(0.2)
    assert float(out.pg_loss.detach()) == pytest.approx(-s, abs=1e-12)  # seq-mean-token-mean of -A s
    (g,) = torch.autograd.grad(out.pg_loss, logp)
    assert g[0].tolist() == pytest.approx([-s / 2, -s / 2], abs=1e-12)  # d/dlogp_t of mean_t(-s sg-construction)
    # inside the GSPO clip range (3e-4 / 4e-4) the ratio exp(.2) is clipped for A > 0: no gradient
    out = alg.policy_loss_gspo(old, logp, adv, mask, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    assert float(out.pg_clipfrac) == 1.0 and float(out.pg_loss.detach()) == pytest.approx(-(1 + 4e-4), abs=1e-12)


def test_large_ratios_stay_finite_and_clipped():
    # log-ratio 30: vanilla clamps it at 20 before exp(); the clip then zeroes the gradient for A > 0
    for name in ("vanilla", "cispo", "sapo", "dppo_tv", "dppo_kl", "gspo"):
        old, logp, adv, mask = _one(-0.001, -30.001, 1.0)
        out = alg.call_with_knobs(alg.get_policy_loss(name), old, logp, adv, mask, knobs={})
        (g,) = torch.autograd.grad(out.pg_loss, logp)
        assert math.isfinite(float(out.pg_loss.detach())) and torch.isfinite(g).all(), name
    # cispo: the weight is clipped to 1 + .28 and stop-gradiented, the gradient is -1.28 A (d logp)
    old, logp, adv, mask = _one(-0.001, -30.001, 2.0)
    out = alg.policy_loss_cispo(old, logp, adv, mask, clip_ratio_high=0.28)
    (g,) = torch.autograd.grad(out.pg_loss, logp)
    assert g.item() == pytest.approx(-1.28 * 2.0) and float(out.pg_clipfrac) == 1.0
    # sapo: gate(r) = sigmoid(tau (r - 1)) 4 / tau saturates at 4/tau, its gradient vanishes
    old, logp, adv, mask = _one(-0.001, -30.001, 1.0)
    out = alg.policy_loss_sapo(old, logp, adv, mask)
    assert float(out.pg_loss.detach()) == pytest.approx(-4.0) and torch.autograd.grad(out.pg_loss, logp)[0].abs().item() < 1e-6
    # sapo at r = 1: the gate is 2/tau, its slope 1 (the PPO gradient at the old policy)
    old, logp, adv, mask = _one(-0.5, -0.5, 1.0)
    out = alg.policy_loss_sapo(old, logp, adv, mask, tau_pos=2.0)
    assert float(out.pg_loss.detach()) == pytest.approx(-1.0)
    assert torch.autograd.grad(out.pg_loss, logp)[0].item() == pytest.approx(-1.0)


def test_dro_needs_its_beta_and_kl_cov_penalises_the_top_covariance_token():
    old, logp, adv, mask = _one(-0.5, -1.0, 1.0)
    with pytest.raises(ValueError, match="dro_beta"):
        alg.policy_loss_dro(old, logp, adv, mask)
    out = alg.policy_loss_dro(old, logp, adv, mask, dro_beta=2.0)
    assert float(out.pg_loss.detach()) == pytest.approx(-(-0.5 * 1.0 - 0.5 * 2.0 * 0.25))
    # kl_cov with 2 tokens, ratio .5 -> 1 token: the one with the largest (A - mean A)(logp - mean logp)
    old, adv, mask = t([[-1.0, -1.0]]), t([[1.0, -1.0]]), t([[1.0, 1.0]])
    logp = t([[-0.5, -2.0]]).requires_grad_(True)  # cov: (1)(.75) = .75 and (-1)(-.75) = .75: a tie, topk takes one
    out = alg.policy_loss_kl_cov(old, logp, adv, mask, kl_cov_ratio=0.5, ppo_kl_coef=1.0)
    assert float(out.pg_clipfrac) == 0.5
    r = [math.exp(0.5), math.exp(-1.0)]
    base = [-1.0 * r[0], 1.0 * r[1]]
    assert float(out.pg_loss.detach()) in (pytest.approx((base[0] + 0.5 + base[1]) / 2), pytest.approx((base[0] + base[1] + 1.0) / 2))


def test_call_with_knobs_gives_each_function_only_what_it_declares():
    old, logp, adv, mask = _one(-0.5, -0.5, 1.0)
    knobs = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0, "tau_pos": 1.0, "tau_neg": 1.05,
             "clip_cov_ratio": 0.1, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.1, "ppo_kl_coef": 0.1,
             "dro_beta": 0.1}
    for name in alg.POLICY_LOSSES:
        out = alg.call_with_knobs(alg.get_policy_loss(name), old, logp, adv, mask, knobs=knobs)
        assert math.isfinite(float(out.pg_loss.detach())), name
