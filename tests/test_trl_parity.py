"""Our GRPO loss equals TRL's GRPOTrainer loss on identical inputs (the premise of scripts/bench_vs_trl.py).

One tiny random Qwen3 with a LoRA adapter (its B matrices randomised, so the policy differs from the
reference), one batch of prompts and completions of unequal lengths, the same advantages. TRL computes its
loss with its own `GRPOTrainer._compute_loss` (loss_type "dapo": token mean over the batch's tokens; beta
0.001, epsilon 0.2, use_bias_correction_kl off: TRL 1.16 turns it on by default, which multiplies the KL by the
importance ratio, same value but another gradient than verl's k3) and its own reference log-probs (adapter disabled, its fused LM head). Ours: grpo.training.actor's
log-probs (shared-prompt path and plain path) and grpo.algorithms' clipped loss + 0.001 x k3 KL, token-mean,
as grpo.training.actor.update_policy combines them. Loss values agree within 1e-5 (absolute); LoRA gradients within
0.1% of each tensor's norm (fp32 rounding).
"""

from __future__ import annotations

import pytest
import torch

from grpo.algorithms import core as alg  # noqa: E402
from grpo.batch import pack  # noqa: E402
from grpo.models.forward import forward_logprobs
from grpo.training.actor import adapter_disabled, compute_logprobs  # noqa: E402

BETA, EPS = 0.001, 0.2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("trl", reason="trl is not installed (pip install trl; the 'bench' extra)")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from grpo.config import LoraConfig
    from grpo.models.loading import peft_lora_config
    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_random_qwen3(tok)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, bf16=False,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=8, beta=BETA,
                      epsilon=EPS, loss_type="dapo", report_to=[], gradient_checkpointing=False,
                      use_bias_correction_kl=False)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * 8), processing_class=tok,
                          peft_config=peft_lora_config(LoraConfig(rank=4, alpha=8), "qwen3"))
    trainer.current_gradient_accumulation_steps = 1
    policy = trainer.model
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 300, (k,), generator=g).tolist() for k in (6, 11)]
    lengths = [8, 3, 5, 8, 1, 7, 8, 4]
    rows = [prompts[i // 4] for i in range(8)]
    completions = [torch.randint(10, 300, (n,), generator=g).tolist() for n in lengths]
    adv = torch.tensor([1.2, -0.4, 0.3, -1.1, 0.9, -0.2, -1.5, 0.8])
    return trainer, policy, tok, rows, completions, adv


def _trl_inputs(tok, rows, completions, adv):
    pad = tok.pad_token_id
    pw, cw = max(map(len, rows)), max(map(len, completions))
    prompt_ids = torch.tensor([[pad] * (pw - len(p)) + p for p in rows])
    prompt_mask = torch.tensor([[0] * (pw - len(p)) + [1] * len(p) for p in rows])
    completion_ids = torch.tensor([c + [pad] * (cw - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (cw - len(c)) for c in completions])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": adv, "old_per_token_logps": None,
            "num_items_in_batch": completion_mask.sum()}


def _trl_loss(trainer, policy, inputs):
    from trl.trainer.utils import use_adapter

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad(), use_adapter(policy, adapter_name=None):
        ref, _, _ = trainer._get_per_token_logps_and_entropies(policy, ids, attn, inputs["completion_ids"].shape[1])
    policy.train()
    policy.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(policy, dict(inputs, ref_per_token_logps=ref))
    loss.backward()
    return loss.detach(), ref, _lora_grads(policy)


def _our_loss(policy, rows, completions, adv, tok, *, share_prefix=True, old_shift=None, beta=BETA):
    batch = pack(rows, completions, tok.pad_token_id)
    with adapter_disabled(policy):
        ref = compute_logprobs(policy, batch, 1.0, micro_batch_seqs=8)
    policy.train()
    policy.zero_grad(set_to_none=True)
    mask = batch.response_mask
    logp, _ = forward_logprobs(policy, batch, 1.0, with_entropy=True, share_prefix=share_prefix)
    old = logp.detach() if old_shift is None else logp.detach() + old_shift * mask
    agg = dict(loss_agg_mode="token-mean", global_tokens=float(mask.sum()), global_seqs=float(len(batch)))
    pg = alg.policy_loss_clipped(old, logp, adv[:, None] * mask, mask, clip_ratio_low=EPS, clip_ratio_high=EPS,
                                 clip_ratio_c=3.0, **agg).pg_loss
    loss = pg + beta * alg.agg_loss(alg.kl_penalty(logp, ref, "low_var_kl"), mask, **agg)
    loss.backward()
    return loss.detach(), ref, mask, _lora_grads(policy)


def _lora_grads(policy):
    return {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_grads_close(ours: dict, theirs: dict) -> None:
    """Each LoRA gradient within 0.1% of its own norm: fp32 rounding of two differently ordered computations
    (measured: <= 2e-4 relative), far below what a different loss would give."""
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name, g in ours.items():
        rel = float((g - theirs[name]).norm() / theirs[name].norm())
        assert rel < 1e-3, f"{name}: relative difference {rel:.2e}"


def _response_values(x_full, mask, completions):
    """[N, L-1] values at response positions -> the completion-aligned [N, max completion] layout TRL uses."""
    cw = max(map(len, completions))
    out = torch.zeros(len(completions), cw)
    for i, c in enumerate(completions):
        out[i, :len(c)] = x_full[i][mask[i].bool()]
    return out


@pytest.mark.parametrize("share_prefix,beta", [(True, BETA), (False, BETA), (True, 0.1)])
def test_on_policy_loss_and_gradients_equal_trls(setup, share_prefix, beta):
    """beta 0.001 is the bench's; at 0.1 the KL term (~2e-3 of the loss) is far above the tolerance, so a
    wrong KL estimator or aggregation would show."""
    trainer, policy, tok, rows, completions, adv = setup
    inputs = _trl_inputs(tok, rows, completions, adv)
    trainer.beta = beta
    try:
        trl_loss, trl_ref, trl_grads = _trl_loss(trainer, policy, inputs)
    finally:
        trainer.beta = BETA
    our_loss, our_ref, mask, our_grads = _our_loss(policy, rows, completions, adv, tok, share_prefix=share_prefix,
                                                   beta=beta)
    if beta > BETA:  # the KL term itself is well above the tolerance here
        no_kl, *_ = _our_loss(policy, rows, completions, adv, tok, beta=0.0)
        assert float(our_loss - no_kl) > 100 * 1e-5
    cm = inputs["completion_mask"].bool()
    torch.testing.assert_close(_response_values(our_ref, mask, completions)[cm], trl_ref[cm], rtol=0, atol=1e-5)
    assert float((trl_ref[cm] != 0).float().mean()) == 1.0  # real log-probs, not padding
    torch.testing.assert_close(our_loss, trl_loss, rtol=0, atol=1e-5)
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 0
    _assert_grads_close(our_grads, trl_grads)
    assert max(float(g.abs().max()) for g in our_grads.values()) > 1e-3  # the gradients are not all ~0


def test_off_policy_clipped_loss_equals_trls(setup):
    """Old log-probs shifted by +-0.4 (ratios 0.67-1.49: both clip sides active, inside the dual clip's 3.0)."""
    trainer, policy, tok, rows, completions, adv = setup
    g = torch.Generator().manual_seed(2)
    shifts = [((torch.rand(len(c), generator=g) - 0.5) * 0.8) for c in completions]
    inputs = _trl_inputs(tok, rows, completions, adv)
    policy.eval()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        cur, _, _ = trainer._get_per_token_logps_and_entropies(policy, ids, attn, ids.shape[1] - inputs["prompt_ids"].shape[1])
    shift_c = torch.zeros_like(cur)
    for i, s in enumerate(shifts):
        shift_c[i, :len(s)] = s
    inputs["old_per_token_logps"] = cur + shift_c
    trl_loss, _, trl_grads = _trl_loss(trainer, policy, inputs)
    batch = pack(rows, completions, tok.pad_token_id)
    shift_full = torch.zeros_like(batch.response_mask)
    for i, s in enumerate(shifts):
        shift_full[i][batch.response_mask[i].bool()] = s
    our_loss, _, _, our_grads = _our_loss(policy, rows, completions, adv, tok, old_shift=shift_full)
    ratio = torch.exp(-shift_c[inputs["completion_mask"].bool()])
    assert bool((ratio > 1 + EPS).any()) and bool((ratio < 1 - EPS).any())
    torch.testing.assert_close(our_loss, trl_loss, rtol=0, atol=1e-5)
    _assert_grads_close(our_grads, trl_grads)


def test_merged_lora_decoding_is_the_adapter_path_and_restores_every_weight():
    """grpo.models.merge.merged_lora (used while sampling): the same logits to fp32 rounding, LoRA on the tied lm_head
    included, and afterwards every parameter bitwise as before; nothing is merged under a disabled adapter."""
    from grpo.config import LoraConfig
    from grpo.models.loading import add_lora
    from grpo.models.merge import merged_lora
    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = add_lora(build_random_qwen3(tok), LoraConfig(rank=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(10, 300, (3, 20))
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with merged_lora(model):
            assert sum(bool(getattr(m, "merged", False)) for m in model.modules()) == 2 * 7 + 1
            merged = model(input_ids=x).logits
        after = model(input_ids=x).logits
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-4)
    assert torch.equal(after, plain)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with model.disable_adapter(), merged_lora(model):
        assert not any(getattr(m, "merged", False) for m in model.modules())
