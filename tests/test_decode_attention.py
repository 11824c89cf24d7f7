"""One-token attention as batched products (grpo.models.decode_attention) gives SDPA's next-token logits on
left-padded rows with grouped KV heads, is used only inside its context and only without grad, and leaves the
model's attention setting as it was."""

import torch

from grpo.batch import left_pad
from grpo.models import decode_attention as da
from grpo.models.kv_cache import cache_kwarg, cache_of, preallocate

torch.set_num_threads(1)


def _model():
    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    return build_random_qwen3(tok, num_attention_heads=4, num_key_value_heads=2), tok  # 2 query heads per KV head


def _decode_logits(model, prompts, steps=5):
    """Prefill left-padded prompts, then `steps` one-token steps over a preallocated cache; each step's logits."""
    ids, mask = left_pad(prompts, 0)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = cache_of(out)
    preallocate(cache, steps)
    nxt_pos = mask.sum(1, keepdim=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        out = model(input_ids=nxt, attention_mask=mask, position_ids=nxt_pos, use_cache=True, logits_to_keep=1,
                    **{cache_kwarg(model): cache})
        nxt_pos = nxt_pos + 1
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


def test_same_logits_as_sdpa_and_only_inside_the_context(monkeypatch):
    model, tok = _model()
    prompts = [tok.encode("12 + 7 = "), tok.encode("3 + 4 = 7, 100 - 1 = ")]  # unequal: left padding in the mask
    with torch.no_grad():
        ref = _decode_logits(model, prompts)
        calls = []
        real = da._attention

        def counted(module, query, *a, **kw):
            calls.append((query.shape[2], torch.is_grad_enabled()))
            return real(module, query, *a, **kw)

        monkeypatch.setattr(da, "_attention", counted)
        import transformers.integrations.sdpa_attention as sdpa

        fallbacks = []
        real_sdpa = sdpa.sdpa_attention_forward

        def sdpa_counted(module, query, *a, **kw):
            fallbacks.append(query.shape[2])
            return real_sdpa(module, query, *a, **kw)

        monkeypatch.setattr(sdpa, "sdpa_attention_forward", sdpa_counted)
        da._register.cache_clear()
        with da.decode_attention(model):
            assert model.config._attn_implementation == da.NAME
            ours = _decode_logits(model, prompts)
        assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    layers = model.config.num_hidden_layers
    assert len(calls) == 6 * layers and sum(q == 1 for q, _ in calls) == 5 * layers  # prefill + 5 one-token steps
    assert len(fallbacks) == layers and all(q > 1 for q in fallbacks)  # only the prefill went to SDPA
    calls.clear()
    with da.decode_attention(model):
        ids = torch.tensor([tok.encode("1 + 1 = ")])
        model(input_ids=ids).logits.sum().backward()  # with grad: the function hands over to SDPA
    assert calls and all(g for _, g in calls)
    da._register.cache_clear()
