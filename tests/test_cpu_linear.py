"""grpo.models.cpu_linear: frozen float32 Linear layers through oneDNN on the CPU give F.linear's values and input
gradients (to float32 rounding), bf16 ones F.linear's bit for bit, leave trainable layers on the standard path, re-pack when the
weight is replaced or written to (the LoRA merge for decoding), and `aten` changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grpo.models.cpu_linear import onednn_available, use_onednn_linears

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def _linear(i=48, o=40, bias=True, frozen=True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(i, o, bias=bias)
    lin.requires_grad_(not frozen)
    return lin


def _is_patched(lin) -> bool:
    return "forward" in lin.__dict__


@pytest.mark.parametrize("rows", [1, 16, 333])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_input_gradients_equal_f_linear(rows, bias):
    lin = _linear(bias=bias)
    assert use_onednn_linears(lin, "onednn") == 1 and _is_patched(lin)
    x = torch.randn(3, rows, 48, requires_grad=True)
    g = torch.randn(3, rows, 40)
    y = lin(x)
    (gx,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, lin.weight, lin.bias)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert lin.weight.grad is None  # frozen: nothing flows to it
    with torch.no_grad():  # the packed-weight path
        torch.testing.assert_close(lin(x), y_ref, rtol=1e-5, atol=1e-5)


def test_trainable_half_precision_and_aten_layers_keep_the_standard_path():
    x = torch.randn(5, 48)
    trainable = _linear(frozen=False)
    use_onednn_linears(trainable, "onednn")
    assert torch.equal(trainable(x), F.linear(x, trainable.weight, trainable.bias))  # bit for bit: F.linear itself
    y = trainable(x.requires_grad_(True))
    y.sum().backward()
    assert trainable.weight.grad is not None  # the weight's gradient still flows
    half = _linear().to(torch.bfloat16)  # bf16: the packed oneDNN product without grad where the CPU has native
    use_onednn_linears(half, "onednn")   # bf16 (AVX512-BF16/AMX), F.linear itself otherwise: bit for bit either way
    xb = torch.randn(5, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half(xb), F.linear(xb, half.weight, half.bias))
    assert torch.equal(half(xb.requires_grad_(True)), F.linear(xb, half.weight, half.bias))
    fp16 = _linear().to(torch.float16)
    use_onednn_linears(fp16, "onednn")
    xh = torch.randn(5, 48, dtype=torch.float16)
    assert torch.equal(fp16(xh), F.linear(xh, fp16.weight, fp16.bias))
    aten = _linear()
    assert use_onednn_linears(aten, "aten") == 0 and not _is_patched(aten)
    with pytest.raises(ValueError, match="cpu_linear"):
        use_onednn_linears(aten, "mkl")


def test_the_packed_weight_follows_replacement_and_in_place_writes():
    lin = _linear()
    use_onednn_linears(lin, "onednn")
    x = torch.randn(16, 48)
    with torch.no_grad():
        first = lin(x)
        original = lin.weight
        lin.weight = torch.nn.Parameter(original * 2, requires_grad=False)  # what grpo.models.merge does
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight = original
        torch.testing.assert_close(lin(x), first, rtol=0, atol=0)
        lin.weight.mul_(-1)  # written in place: the version counter says so
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_a_lora_model_gives_the_same_logprobs_gradients_and_merged_decoding(tmp_path):
    from helpers_engine import build_model_dir

    from grpo.batch import pack
    from grpo.config import LoraConfig
    from grpo.models.forward import forward_logprobs
    from grpo.models.loading import load_policy
    from grpo.models.merge import merged_lora

    model_dir = build_model_dir(tmp_path / "model", seed=3)
    runs = {}
    for choice in ("aten", "onednn"):
        torch.manual_seed(0)
        policy = load_policy(str(model_dir), LoraConfig(rank=4, alpha=8), dtype=torch.float32, cpu_linear=choice)
        patched = [m for m in policy.modules() if type(m) is torch.nn.Linear and _is_patched(m)]
        assert bool(patched) == (choice == "onednn")
        for n, p in sorted(policy.named_parameters()):
            if "lora_B" in n:
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        batch = pack([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]], pad_id=0)
        logp = forward_logprobs(policy, batch, 0.9)[0]
        logp.sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        with torch.no_grad(), merged_lora(policy):
            merged = forward_logprobs(policy, batch, 0.9)[0]
        runs[choice] = (logp.detach(), grads, merged)
    (lp_a, g_a, m_a), (lp_o, g_o, m_o) = runs["aten"], runs["onednn"]
    torch.testing.assert_close(lp_o, lp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m_a, lp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m_o, lp_a, rtol=1e-5, atol=1e-5)  # merged decoding weights: re-packed, same values
    assert g_o.keys() == g_a.keys() and len(g_a) > 0
    for n in g_a:
        torch.testing.assert_close(g_o[n], g_a[n], rtol=1e-4, atol=1e-6)


def test_grpo_cpu_linear_overrides_the_job_setting(tmp_path, monkeypatch):
    from helpers_engine import build_model_dir

    from grpo.models.cpu_linear import configured_choice
    from grpo.models.loading import load_base_model

    model_dir = str(build_model_dir(tmp_path / "model", seed=3))
    patched = lambda m: sum(_is_patched(x) for x in m.modules() if type(x) is torch.nn.Linear)  # noqa: E731
    monkeypatch.delenv("GRPO_CPU_LINEAR", raising=False)
    assert configured_choice(None) == "onednn" and configured_choice("aten") == "aten"
    assert patched(load_base_model(model_dir, torch.float32, cpu_linear="onednn")) > 0
    monkeypatch.setenv("GRPO_CPU_LINEAR", "aten")  # `grpo train` passes engine.cpu_linear (default onednn)
    assert configured_choice("onednn") == "aten"
    assert patched(load_base_model(model_dir, torch.float32, cpu_linear="onednn")) == 0
    monkeypatch.setenv("GRPO_CPU_LINEAR", "mkl")
    from grpo.errors import UserError

    with pytest.raises(UserError, match="GRPO_CPU_LINEAR=mkl: must be"):
        configured_choice("onednn")
