"""The policy at scale, on tiny real models: the real chat templates, LoRA on GPT-OSS's experts, the chunked
log-probs against the full-logits path, model-loading options, the vLLM weight merge and the TIS math."""

import copy
import importlib.util
import json
import re
import sys
import types

import pytest
import torch

from grpo.algorithms.tis import sampler_mismatch_metrics, tis_weights
from grpo.batch import pack
from grpo.config import LoraConfig
from grpo.errors import UserError
from grpo.models.forward import _full_logits, forward_logprobs
from grpo.models.loading import add_lora, chat_tokenizer, enable_gradient_checkpointing, load_base_model
from grpo.rollout.prompts import encode_prompt, split_reasoning
from grpo.training.actor import adapter_disabled, compute_logprobs

torch.set_num_threads(1)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
Q = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def toks():
    return {k: chat_tokenizer(k) for k in ("qwen3", "gpt_oss")}


def _policy(kind, tok, seed=0, **lora):
    from grpo.models.tiny import build_random_gpt_oss, build_random_qwen3

    torch.manual_seed(seed)
    model = (build_random_qwen3 if kind == "qwen3" else build_random_gpt_oss)(tok)
    policy = add_lora(model, LoraConfig(rank=4, alpha=8, **lora))
    for name, p in policy.named_parameters():  # LoRA B starts at 0 (adapter = identity): make it count
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return policy


# -- the real chat templates ---------------------------------------------------------------------------------
def test_qwen3_template_thinking_off_for_low_effort_inserts_an_empty_think_block(toks):
    tok = toks["qwen3"]
    low = tok.decode(encode_prompt(tok, Q, reasoning_effort="low"))
    high = tok.decode(encode_prompt(tok, Q, reasoning_effort="high"))
    assert low == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert high == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    for t in ("<think>", "</think>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t


def test_qwen3_template_system_message_and_a_thinking_assistant_turn(toks):
    tok = toks["qwen3"]
    msgs = [{"role": "system", "content": "Be brief."}, *Q,
            {"role": "assistant", "content": "<think>\n2 plus 3\n</think>\n\n#### 5"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n2 plus 3\n</think>\n\n#### 5<|im_end|>\n")
    # and the rollout's split reads a Qwen3 response back into (content, reasoning)
    assert split_reasoning("<think>\n2 plus 3\n</think>\n\n#### 5<|im_end|>", ["<|im_end|>"]) == ("#### 5", "2 plus 3")


def test_gpt_oss_harmony_template_puts_the_effort_in_the_system_message(toks):
    tok = toks["gpt_oss"]
    for effort in ("low", "medium", "high"):
        text = tok.decode(encode_prompt(tok, [{"role": "system", "content": "Be brief."}, *Q], reasoning_effort=effort))
        assert re.fullmatch(
            r"<\|start\|>system<\|message\|>You are ChatGPT, a large language model trained by OpenAI\.\n"
            r"Knowledge cutoff: 2024-06\nCurrent date: \d{4}-\d{2}-\d{2}\n\n"
            rf"Reasoning: {effort}\n\n# Valid channels: analysis, commentary, final\. Channel must be included for every "
            r"message\.<\|end\|><\|start\|>developer<\|message\|># Instructions\n\nBe brief\.\n\n<\|end\|>"
            r"<\|start\|>user<\|message\|>What is 2 \+ 3\?<\|end\|><\|start\|>assistant", text), text
    for t in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tok.eos_token == "<|return|>"
    reply = tok.decode(tok("<|channel|>analysis<|message|>add<|end|><|start|>assistant<|channel|>final<|message|>"
                           "#### 5<|return|>", add_special_tokens=False)["input_ids"], skip_special_tokens=False)
    assert split_reasoning(reply, tok.all_special_tokens) == ("#### 5", "add")


# -- LoRA on GPT-OSS's experts ------------------------------------------------------------------------------
def test_gpt_oss_lora_covers_attention_and_the_moe_experts(toks):
    policy = _policy("gpt_oss", toks["gpt_oss"])
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert any(".experts." in n for n in names) and any("q_proj.lora_A" in n for n in names)
    assert not any(".router." in n for n in names)
    # the expert adapter is live: zeroing its B factors changes the output
    ids = torch.tensor([encode_prompt(toks["gpt_oss"], Q)])
    with torch.no_grad():
        before = policy(input_ids=ids).logits
        for n, p in policy.named_parameters():
            if ".experts." in n and "lora_B" in n:
                p.zero_()
        after = policy(input_ids=ids).logits
    assert (before - after).abs().max() > 1e-4


def test_expert_lora_needs_dropout_zero_and_can_be_switched_off(toks):
    with pytest.raises(UserError, match="dropout"):
        _policy("gpt_oss", toks["gpt_oss"], dropout=0.1)
    from grpo.models.tiny import build_random_gpt_oss

    off = types.SimpleNamespace(rank=4, alpha=8, dropout=0.0, target_modules="all-linear", target_parameters=[])
    policy = add_lora(build_random_gpt_oss(toks["gpt_oss"]), off)
    assert not any(".experts." in n for n, p in policy.named_parameters() if p.requires_grad)


# -- chunked log-probs == the full-logits path --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen3", "gpt_oss"])
def test_chunked_logprobs_equal_the_full_logits_path_values_and_gradients(toks, kind):
    tok = toks[kind]
    policy = _policy(kind, tok)
    b = pack([encode_prompt(tok, Q), encode_prompt(tok, Q)[:5]], [[11, 12, 13, 14, 15], [16, 17]], tok.pad_token_id)
    full_lp, full_ent = _full_logits(policy, b, 0.7, True)
    m = b.response_mask
    ((full_lp * m).sum() + 0.1 * (full_ent * m).sum()).backward()
    ref_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    for chunk in (1, 3, 1000):
        policy.zero_grad()
        lp, ent = forward_logprobs(policy, b, 0.7, with_entropy=True, chunk_size=chunk)
        torch.testing.assert_close(lp, full_lp * m, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, full_ent * m, rtol=1e-5, atol=1e-5)
        (lp.sum() + 0.1 * ent.sum()).backward()
        for n, g in ref_grads.items():
            torch.testing.assert_close(dict(policy.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6)
    with torch.no_grad(), adapter_disabled(policy):  # the reference pass: the adapter really is off
        ref = compute_logprobs(policy, b, 0.7, micro_batch_seqs=1)
        base_lp, _ = _full_logits(policy, b, 0.7, False)
    torch.testing.assert_close(ref, base_lp * m, rtol=1e-5, atol=1e-5)
    assert (ref - lp.detach()).abs().max() > 1e-4


def test_chunked_logprobs_under_gradient_checkpointing_and_a_fully_masked_row(toks):
    tok = toks["gpt_oss"]
    plain, ckpt = _policy("gpt_oss", tok), _policy("gpt_oss", tok)
    enable_gradient_checkpointing(ckpt.get_base_model())
    ckpt.enable_input_require_grads()
    ckpt.train()
    b = pack([encode_prompt(tok, Q)] * 2, [[11, 12, 13], [14, 15]], tok.pad_token_id)
    b.response_mask[1] = 0.0  # a skipped (failed) trajectory: no token counts, and backward still works
    out = {}
    for name, pol in (("plain", plain), ("ckpt", ckpt)):
        lp, _ = forward_logprobs(pol, b, 1.0, chunk_size=2)
        lp.sum().backward()
        out[name] = (lp.detach(), {n: p.grad for n, p in pol.named_parameters() if p.requires_grad})
    torch.testing.assert_close(out["ckpt"][0], out["plain"][0], rtol=1e-5, atol=1e-6)
    assert out["plain"][0][1].abs().sum() == 0
    for n, g in out["plain"][1].items():
        torch.testing.assert_close(out["ckpt"][1][n], g, rtol=1e-4, atol=1e-6)


# -- loading options -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory, toks):
    from grpo.models.tiny import build_random_gpt_oss

    path = tmp_path_factory.mktemp("gpt_oss")
    torch.manual_seed(0)
    build_random_gpt_oss(toks["gpt_oss"]).save_pretrained(path)
    toks["gpt_oss"].save_pretrained(path)
    return path


def test_load_in_4bit_without_bitsandbytes_is_a_clear_error(gpt_oss_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed (the dev extra installs it)
    assert importlib.util.find_spec("bitsandbytes") is None
    with pytest.raises(UserError, match=r"engine.load_in_4bit .*needs the 'bitsandbytes' package.*pip install 'grpo\[qlora\]'"):
        load_base_model(str(gpt_oss_dir), torch.float32, load_in_4bit=True)


def test_an_mxfp4_checkpoint_is_dequantized_and_refuses_4bit(gpt_oss_dir, tmp_path):
    import shutil

    d = tmp_path / "mxfp4"
    shutil.copytree(gpt_oss_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                  "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="MXFP4"):
        load_base_model(str(d), torch.float32, load_in_4bit=True)
    model = load_base_model(str(d), torch.float32)  # the checkpoint holds plain tensors: dequantize keeps them
    ref = load_base_model(str(gpt_oss_dir), torch.float32)
    assert type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    torch.testing.assert_close(model.model.layers[0].mlp.experts.down_proj, ref.model.layers[0].mlp.experts.down_proj)


# -- the vLLM path's weight sync (the part that runs without vLLM) -------------------------------------------
@pytest.mark.parametrize("kind", ["qwen3", "gpt_oss"])
def test_merged_weights_equal_peft_merge_and_leave_the_policy_untouched(toks, kind):
    from grpo.rollout.vllm import merged_weights

    policy = _policy(kind, toks[kind])
    before = {n: p.clone() for n, p in policy.named_parameters()}
    got = dict(merged_weights(policy))
    ref = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(got) <= set(ref) and set(ref) - set(got) <= {"lm_head.weight"}  # tied to the embedding in tiny Qwen3
    changed = [n for n in got if not torch.equal(got[n], ref[n])]
    assert not changed
    assert any(".experts." in n for n in got) == (kind == "gpt_oss")
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


# -- TIS -----------------------------------------------------------------------------------------------------
def test_tis_weights_truncate_the_ratio_of_trainer_to_sampler_probabilities():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    sampler = torch.tensor([[-1.0, -3.0, -0.4, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = tis_weights(old, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, float(torch.exp(torch.tensor(-0.1))), 0.0]]))
    seq = tis_weights(old, sampler, mask, cap=5.0, level="sequence")  # exp(0 + 1 - 0.1) = 2.46 on every token
    torch.testing.assert_close(seq, torch.tensor([[1.0, 1.0, 1.0, 0.0]]) * float(torch.exp(torch.tensor(0.9))))
    with pytest.raises(ValueError):
        tis_weights(old, sampler[:, :3], mask)
    with pytest.raises(ValueError):
        tis_weights(old, sampler, mask, level="batch")


def test_sampler_mismatch_metrics():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    mask = torch.ones(1, 3)
    same = sampler_mismatch_metrics(lp, lp, mask)
    assert same == {"rollout_kl_k1": 0.0, "rollout_kl_k3": 0.0, "rollout_tis_weight_mean": 1.0, "rollout_tis_clipfrac": 0.0}
    m = sampler_mismatch_metrics(lp, lp - torch.tensor([[0.0, 1.0, 0.0]]), mask, cap=2.0)  # old/sampler = e on token 2
    assert m["rollout_tis_clipfrac"] == pytest.approx(1 / 3)
    assert m["rollout_tis_weight_mean"] == pytest.approx((1 + 2 + 1) / 3)
    assert m["rollout_kl_k1"] == pytest.approx(-1 / 3)
    assert m["rollout_kl_k3"] == pytest.approx((torch.e - 2) / 3)
    assert all(v != v for v in sampler_mismatch_metrics(lp, lp, torch.zeros(1, 3)).values())
