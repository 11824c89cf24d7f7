"""grpo.models.kv_cache.preallocate: decoding writes keys/values in place, and samples exactly what the growing
(concatenating) transformers DynamicCache samples."""

from __future__ import annotations

import pytest
import torch

import grpo.rollout.generate as gen
from grpo.models.kv_cache import cache_of, preallocate
from grpo.models.tiny import build_random_qwen3
from grpo.models.tiny_data import build_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    torch.manual_seed(0)
    return build_random_qwen3(tok).eval(), tok


def test_generation_is_token_for_token_the_same(tiny, monkeypatch):
    model, tok = tiny
    prompts = [tok("What is 2 + 3?")["input_ids"], tok("Compute 41 - 7, please.")["input_ids"]]
    runs = {}
    for mode in ("prealloc", "cat"):
        if mode == "cat":
            monkeypatch.setattr(gen, "preallocate", lambda cache, extra: False)
        torch.manual_seed(1)
        runs[mode] = gen.generate(model, tok, prompts, n=4, max_new_tokens=24, temperature=1.0, ignore_eos=True).response_ids
    assert runs["prealloc"] == runs["cat"]
    assert all(len(r) == 24 for r in runs["cat"])


def test_in_place_writes_and_the_fallback_past_the_room(tiny):
    """Room for 3 more positions, then 5 one-token steps: the last two grow by concatenation; the attention
    inputs (keys/values) equal a plain DynamicCache's at every step."""
    model, _ = tiny
    ids = torch.randint(5, 300, (2, 7))
    with torch.no_grad():
        a = cache_of(model(input_ids=ids, use_cache=True))
        b = cache_of(model(input_ids=ids, use_cache=True))
        assert preallocate(b, 3)
        buffer = b.layers[0]._k
        for step in range(5):
            nxt = torch.randint(5, 300, (2, 1))
            pos = torch.full((2, 1), 7 + step)
            la = model(input_ids=nxt, position_ids=pos, past_key_values=a, use_cache=True).logits
            lb = model(input_ids=nxt, position_ids=pos, past_key_values=b, use_cache=True).logits
            assert torch.equal(la, lb)
            for x, y in zip(a.layers, b.layers):
                assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
            if step < 3:
                assert b.layers[0]._k is buffer  # written in place
        assert b.get_seq_length() == 12 and b.layers[0]._k is not buffer
    assert not preallocate(object(), 3)
