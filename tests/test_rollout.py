"""Group sampling, the reasoning split, and the packing the update relies on."""

import pytest
import torch

from grpo.batch import pack
from grpo.models.forward import forward_logprobs
from grpo.models.loading import chat_template_kwargs
from grpo.rollout.generate import generate
from grpo.rollout.prompts import encode_prompt, split_reasoning
from grpo.training.actor import compute_logprobs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    return build_random_qwen3(tok), tok


def test_split_reasoning_qwen3_think_block():
    content, reasoning = split_reasoning("<think>\n7 + 8 = 15\n</think>\n\n#### 15<|im_end|>", ["<|im_end|>"])
    assert content == "#### 15"
    assert reasoning == "7 + 8 = 15"


def test_split_reasoning_qwen3_unfinished_think_is_all_reasoning():
    content, reasoning = split_reasoning("<think>still thinking", [])
    assert content == "" and reasoning == "still thinking"


def test_split_reasoning_harmony_channels():
    text = ("<|channel|>analysis<|message|>add the tens<|end|><|start|>assistant"
            "<|channel|>final<|message|>#### 85<|return|>")
    content, reasoning = split_reasoning(text, ["<|start|>", "<|end|>", "<|return|>"])
    assert content == "#### 85"
    assert reasoning == "add the tens"


def test_split_reasoning_plain_text_strips_special_tokens():
    assert split_reasoning("47 + 38 = 85\n#### 85<|im_end|>", ["<|im_end|>"]) == ("47 + 38 = 85\n#### 85", None)


def test_reasoning_effort_reaches_the_chat_template(tiny):
    _, tok = tiny
    from grpo.models.tiny_data import build_tokenizer

    t = build_tokenizer()
    t.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                       "|think={{ enable_thinking }}|effort={{ reasoning_effort }}")
    for effort, think in (("low", False), ("medium", True), ("high", True)):
        ids = encode_prompt(t, [{"role": "user", "content": "hi"}], reasoning_effort=effort)
        assert t.decode(ids).endswith(f"|think={think}|effort={effort}")
    assert chat_template_kwargs("low") == {"enable_thinking": False, "reasoning_effort": "low"}


def test_pack_aligns_response_mask_with_next_token_predictions():
    b = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # position t predicts token t+1: rows' response tokens are 5,6 and 7,8,9
    assert b.response_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    sub = b.select(torch.tensor([0]))
    assert sub.input_ids.shape == (1, 5) and sub.response_mask.shape == (1, 4)


def test_generate_groups_and_fixed_length_mode(tiny):
    model, tok = tiny
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"What is {a} + 1?"}]) for a in (3, 12)]
    torch.manual_seed(1)
    out = generate(model, tok, prompts, n=3, max_new_tokens=5, temperature=1.0, ignore_eos=True)
    assert len(out) == 6
    assert out.group == [0, 0, 0, 1, 1, 1] and out.sample == [0, 1, 2, 0, 1, 2]
    assert all(len(r) == 5 for r in out.response_ids) and all(out.truncated)
    assert out.prompt_ids[0] == prompts[0] and out.prompt_ids[5] == prompts[1]


def test_logprobs_of_packed_batch_match_a_plain_forward(tiny):
    model, tok = tiny
    b = pack([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=tok.pad_token_id)
    lp = compute_logprobs(model, b, temperature=0.7, micro_batch_seqs=1)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[8, 11, 12, 13]])).logits[0, :-1].float() / 0.7
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[11], [12], [13]])).squeeze(-1)
    got = lp[1][b.response_mask[1].bool()]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        full, _ = forward_logprobs(model, b, 0.7)
    torch.testing.assert_close(full * b.response_mask, lp * b.response_mask, rtol=1e-5, atol=1e-5)
