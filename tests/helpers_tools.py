"""A tiny random Qwen3 taught one tool conversation (tests of multi-turn rollouts and of the console's samples
view): trained until it repeats "call multiply(12, 34), read the result, answer 408" for the question below."""

from __future__ import annotations

import torch

QUESTION = "What is 12 * 34?"


def teach_one_tool_conversation():
    """(model in eval mode, its tokenizer, the token ids of [prompt, call, tool-turn glue, answer])."""
    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_tools import build_tools_tokenizer, encode_example, example_segments

    tok = build_tools_tokenizer(512, corpus_examples=300)
    segments = example_segments(tok, 12, 34, QUESTION, call=True)
    ids, labels = encode_example(tok, segments)
    torch.manual_seed(0)
    model = build_random_qwen3(tok).train()
    opt = torch.optim.Adam(model.parameters(), lr=1.5e-2)
    x, y = torch.tensor([ids]), torch.tensor([labels])
    for _ in range(50):
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    parts = [tok(text, add_special_tokens=False)["input_ids"] for text, _ in segments]
    return model.eval(), tok, parts
