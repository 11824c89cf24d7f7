"""Faster paths that must compute the very same numbers as the paths they replace (issue #24: the update's math
exactly as it was): the fused head log-prob (grpo.models.forward._HeadLogprob) against the checkpointed head,
and LoRA's scaling on the rank side (grpo.models.lora_forward) against peft's forward: values and gradients
equal bit for bit (torch.equal), on a tiny random Qwen3 with its adapter trained-looking (B != 0)."""

import pytest
import torch

from grpo.batch import pack
from grpo.config import LoraConfig
from grpo.models.cpu_linear import use_onednn_linears
from grpo.models.forward import _fused_head_applies, _head_parts, forward_logprobs
from grpo.models.loading import add_lora, chat_tokenizer
from grpo.models.lora_forward import _power_of_two_at_least_one, scale_on_rank_side
from grpo.training.actor import adapter_disabled

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer("qwen3")


def _policy(tok, *, rank=4, alpha=8, cpu_linear="onednn", seed=0):
    from grpo.models.tiny import build_random_qwen3

    torch.manual_seed(seed)
    model = build_random_qwen3(tok)
    use_onednn_linears(model, cpu_linear)
    policy = add_lora(model, LoraConfig(rank=rank, alpha=alpha, dropout=0.0, target_modules="all-linear"))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return policy.train()


def _batch(tok, g=torch.Generator().manual_seed(1)):
    prompt = torch.randint(10, 200, (9,), generator=g).tolist()
    responses = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (7, 3, 5, 6)]
    return pack([prompt] * 4, responses, tok.pad_token_id)  # one group: the shared-prefix path


def _run(policy, batch, temperature, **kw):
    policy.zero_grad(set_to_none=True)
    logp, ent = forward_logprobs(policy, batch, temperature, with_entropy=True, **kw)
    weights = torch.linspace(-1.0, 1.0, logp.numel()).reshape(logp.shape)  # advantages of both signs
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return logp.detach(), ent.detach(), grads


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and a[2]
    for n in a[2]:
        assert torch.equal(a[2][n], b[2][n]), n


@pytest.mark.parametrize("cpu_linear", ["onednn", "aten"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_equals_the_checkpointed_head_bit_for_bit(tok, cpu_linear, temperature):
    policy, batch = _policy(tok, cpu_linear=cpu_linear), _batch(tok)
    _, head = _head_parts(policy)
    assert _fused_head_applies(head)
    checkpointed = _run(policy, batch, temperature, entropy_grad=True)  # the entropy may carry a loss: old path
    fused = _run(policy, batch, temperature, entropy_grad=False)
    _assert_same(checkpointed, fused)
    assert (fused[0] != 0).sum() == int(batch.response_mask.sum())  # every response token has its log-prob
    assert not fused[1].requires_grad


def test_fused_head_with_no_response_token_and_the_entropy_still_trainable(tok):
    policy, batch = _policy(tok), _batch(tok)
    batch.response_mask.zero_()  # a micro-batch of skipped rows: zero log-probs, a backward that still runs
    logp, ent = forward_logprobs(policy, batch, 1.0, with_entropy=True, entropy_grad=False)
    logp.sum().backward()
    assert float(logp.detach().abs().sum()) == 0.0 and float(ent.abs().sum()) == 0.0
    # entropy_grad=True (the default; engine.algorithm.entropy_coef > 0): the entropy has a gradient
    _, ent = forward_logprobs(policy, _batch(tok), 1.0, with_entropy=True)
    assert ent.requires_grad


def test_fused_head_not_taken_for_a_trainable_head(tok):
    head = torch.nn.Linear(4, 8, bias=False)
    assert not _fused_head_applies(head)  # requires grad: its weight gradient needs the checkpointed path
    head.weight.requires_grad_(False)
    assert _fused_head_applies(head)
    assert not _fused_head_applies(lambda h: h)  # ZeRO-3's gathered head (a function)


def test_power_of_two_scalings():
    assert [_power_of_two_at_least_one(s) for s in (1, 2.0, 4, 64, 2 ** 20)] == [True] * 5
    assert not any(_power_of_two_at_least_one(s) for s in (0.5, 1.5, 3, 0, -2, float("inf"), float("nan"), "2"))


@pytest.mark.parametrize("rank,alpha", [(4, 8), (4, 4), (8, 32)])
def test_scaling_on_the_rank_side_equals_peft_bit_for_bit(tok, rank, alpha):
    policy, batch = _policy(tok, rank=rank, alpha=alpha), _batch(tok)
    mods = [m for m in policy.modules() if "forward" in m.__dict__ and hasattr(m, "lora_A")]
    assert len(mods) == scale_on_rank_side(policy) > 0  # add_lora installed it on every LoRA Linear
    ours = _run(policy, batch, 0.7)
    for m in mods:
        del m.forward  # peft's own forward
    _assert_same(_run(policy, batch, 0.7), ours)
    scale_on_rank_side(policy)
    with torch.no_grad(), adapter_disabled(policy):  # the reference policy: the adapter really is off
        off = forward_logprobs(policy, batch, 0.7)[0]
    assert (off - ours[0]).abs().max() > 1e-4


def test_scaling_that_is_not_a_power_of_two_keeps_peft_forward(tok):
    policy, batch = _policy(tok, rank=4, alpha=6), _batch(tok)  # s = 1.5: B(Ax) * s and B(Ax * s) round apart
    ours = _run(policy, batch, 1.0)
    for m in policy.modules():
        if hasattr(m, "lora_A"):
            del m.forward  # peft's own forward (the base Linear layers keep their oneDNN forward)
    _assert_same(_run(policy, batch, 1.0), ours)
