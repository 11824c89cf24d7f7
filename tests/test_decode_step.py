"""grpo.models.decode_step.LeanDecoder: generation through it draws the very tokens, with the very log-probs, that
the model's own forward gives (bit for bit), on a tiny random Qwen3 (q/k norms, GQA) and a tiny random Llama
(SmolLM2's architecture), with ragged prompts (left padding), a trained-looking LoRA adapter merged into
q/k/v and gate/up buffers (one product each), and both CPU kernel choices; where it must not run it declines."""

import pytest
import torch

import grpo.rollout.generate as gen
from grpo.config import LoraConfig
from grpo.models.cpu_linear import use_onednn_linears
from grpo.models.decode_step import LeanDecoder
from grpo.models.loading import add_lora, chat_tokenizer
from grpo.models.merge import merged_lora

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer("qwen3")


def _llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(torch.float32).eval()


def _model(tok, kind, *, lora=True, cpu_linear="onednn"):
    from grpo.models.tiny import build_random_qwen3

    torch.manual_seed(0)
    model = build_random_qwen3(tok) if kind == "qwen3" else _llama(tok)
    use_onednn_linears(model, cpu_linear)
    if not lora:
        return model
    policy = add_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return policy


def _generate(model, tok, lean, temperature=1.0, top_p=1.0, lengths=(9, 5, 7)):
    gen.LEAN_DECODE = lean
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(10, 200, (n,), generator=g).tolist() for n in lengths]
        logprobs = []
        out = gen.generate(model, tok, prompts, n=4, max_new_tokens=12, temperature=temperature, top_p=top_p,
                           sampler_logprobs=logprobs)
        return out.response_ids, logprobs
    finally:
        gen.LEAN_DECODE = True


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("cpu_linear", ["onednn", "aten"])
def test_lean_decoding_draws_what_the_model_draws_bit_for_bit(tok, kind, cpu_linear):
    model = _model(tok, kind, cpu_linear=cpu_linear)
    ids, lps = _generate(model, tok, lean=True, temperature=0.8, top_p=0.95)
    assert (ids, lps) == _generate(model, tok, lean=False, temperature=0.8, top_p=0.95)
    assert sum(len(r) for r in ids) > 3 * 4 * 2  # it really decoded (not only end tokens)
    model.eval()
    with torch.no_grad(), merged_lora(model):  # q/k/v and gate/up merged into one buffer each: one product
        dec = LeanDecoder.make(model)
        assert dec is not None and all(L["qkv"] is not None and L["gate_up"] is not None for L in dec.layers)


def test_lean_decoding_of_a_model_without_adapter(tok):
    model = _model(tok, "llama", lora=False)
    assert _generate(model, tok, lean=True) == _generate(model, tok, lean=False)
    dec = LeanDecoder.make(model)
    assert dec is not None and dec.layers[0]["qkv"] is None  # separate products: nothing to fuse without a merge


def test_lean_decoding_of_prompts_without_padding(tok):
    model = _model(tok, "qwen3")  # equal lengths: transformers gives no mask at all (SDPA's own path)
    assert _generate(model, tok, lean=True, lengths=(6, 6)) == _generate(model, tok, lean=False, lengths=(6, 6))


@pytest.mark.parametrize("lengths", [(9, 5, 7), (6, 6, 6)])
def test_each_decode_step_attends_with_the_mask_transformers_builds(tok, lengths):
    """The decoder extends the previous step's 4D mask by one column instead of rebuilding it: at every step the
    mask given to attention is the one `create_causal_mask` makes for that step (None without padding)."""
    from transformers.masking_utils import create_causal_mask

    from grpo.batch import left_pad

    model = _model(tok, "llama").eval()
    g = torch.Generator().manual_seed(1)
    ids, mask = left_pad([torch.randint(10, 200, (n,), generator=g).tolist() for n in lengths], 0)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad(), merged_lora(model):
        dec = LeanDecoder.make(model)
        seen = []
        attention = dec._attention
        dec._attention = lambda module, q, k, v, m, **kw: (seen.append(m), attention(module, q, k, v, m, **kw))[1]
        logits, cache = dec(ids, mask, pos)
        nxt, pos = logits[:, -1].argmax(-1, keepdim=True), mask.sum(1, keepdim=True)
        for _ in range(5):
            mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=mask.dtype)], 1)
            want = create_causal_mask(config=dec.config, inputs_embeds=dec.inner.embed_tokens(nxt), attention_mask=mask,
                                      cache=cache, position_ids=pos)
            seen.clear()
            nxt, pos = dec(nxt, mask, pos, cache)[:, -1].argmax(-1, keepdim=True), pos + 1
            assert len(seen) == len(dec.layers)
            assert all(m is None if want is None else torch.equal(m, want) for m in seen)
        assert (want is None) == (len(set(lengths)) == 1)


def test_lean_prefill_and_step_logits_equal_the_model(tok):
    model = _model(tok, "qwen3").eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad(), merged_lora(model):
        dec = LeanDecoder.make(model)
        logits, cache = dec(ids, mask, pos)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        assert torch.equal(logits, ref.logits)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        nxt, pos2 = torch.tensor([[9], [10]]), mask.sum(1, keepdim=True)
        step = dec(nxt, mask2, pos2, cache)
        ref2 = model(input_ids=nxt, attention_mask=mask2, position_ids=pos2, use_cache=True, logits_to_keep=1,
                     cache=ref.cache if hasattr(ref, "cache") else ref.past_key_values)
        assert torch.equal(step, ref2.logits)


def test_merged_groups_share_one_buffer_and_the_originals_come_back(tok):
    model = _model(tok, "qwen3")
    att = model.get_base_model().model.layers[0].self_attn
    before = [m.base_layer.weight for m in (att.q_proj, att.k_proj, att.v_proj)]
    with torch.no_grad(), merged_lora(model):
        ws = [m.base_layer.weight for m in (att.q_proj, att.k_proj, att.v_proj)]
        assert len({w.untyped_storage().data_ptr() for w in ws}) == 1
        for m, w, b in zip((att.q_proj, att.k_proj, att.v_proj), ws, before):
            assert torch.equal(w, b + (m.lora_B["default"].weight @ m.lora_A["default"].weight) * m.scaling["default"])
    assert all(m.base_layer.weight is b for m, b in zip((att.q_proj, att.k_proj, att.v_proj), before))


def test_lean_decoder_declines_what_it_does_not_cover(tok):
    from grpo.models.tiny import build_random_gpt_oss

    model = _model(tok, "qwen3")
    assert LeanDecoder.make(model.train()) is None  # training mode (dropout)
    model.eval()
    assert LeanDecoder.make(model) is not None
    handle = model.get_base_model().model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert LeanDecoder.make(model) is None  # someone's hook would not fire
    handle.remove()
    assert LeanDecoder.make(build_random_gpt_oss(chat_tokenizer("gpt_oss"))) is None  # not a shared-prefix decoder
