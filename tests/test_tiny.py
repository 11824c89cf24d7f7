"""The embedded tiny default model: tokenizer, synthetic data, random builders, pretraining cache."""

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.models import tiny as tiny
from grpo.models.tiny_data import (
    FINAL_FORMATS,
    SUFFIX,
    build_tokenizer,
    make_arithmetic_records,
    pretrain_examples,
    write_quickstart_data,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _true_result(rec):
    nums = rec["operands"]
    return {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
            "add_sub": lambda a, b, c: a + b - c}[rec["operation"]](*nums)


def test_tokenizer_round_trip_and_chat_template(tokenizer, tmp_path):
    text = "Compute 47 + 38 - 12.\n#### 73 and unknown ✓ ünïcödé 🙂"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = tokenizer("12345")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == list("12345")  # digits are single tokens
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in tokenizer("<|im_start|>user")["input_ids"]
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == rendered
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.eos_token_id == tokenizer.eos_token_id


def test_records_valid_deterministic_and_splits_disjoint(tmp_path):
    train = make_arithmetic_records(500, seed=0, split="train")
    val = make_arithmetic_records(300, seed=0, split="validation")
    pre = [make_arithmetic_records(500, seed=s, split="pretrain") for s in (0, 1)]
    assert make_arithmetic_records(500, seed=0, split="train") == train
    key = lambda r: (r["operation"], tuple(r["operands"]))  # noqa: E731
    sets = [set(map(key, recs)) for recs in (train, val, pre[0] + pre[1])]
    assert len(sets[0]) == 500 and len(sets[1]) == 300  # distinct within a split
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    for rec in train + val:
        assert [m["role"] for m in rec["messages"]] == ["user"]
        content = rec["messages"][0]["content"]
        assert content.endswith(SUFFIX) and len(content) > len(SUFFIX)
        assert rec["reference_answer"] == f"#### {_true_result(rec)}"
        assert all(10 <= x <= 99 for x in rec["operands"]) and _true_result(rec) >= 0
    assert {r["operation"] for r in val} == {"add", "sub", "add_sub"}
    with pytest.raises(ValueError, match="split"):
        make_arithmetic_records(1, seed=0, split="test")
    train_path, val_path = write_quickstart_data(tmp_path / "train.jsonl", tmp_path / "validation.jsonl")
    lines = val_path.read_text().splitlines()
    assert len(lines) >= 200 and len(train_path.read_text().splitlines()) == 2000
    assert json.loads(lines[0]) == make_arithmetic_records(1, seed=0, split="validation")[0]


def test_pretrain_corpus_arithmetic_right_and_formats_mixed():
    examples = pretrain_examples(400, seed=0, format_fraction=0.4)
    finals = {f.split("{")[0] for f in FINAL_FORMATS}
    n_strict = 0
    for prompt, response in examples:
        *steps, final = response.split("\n")
        for step in steps:
            a, op, b, _, c = step.split()
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert any(final.startswith(f) for f in finals)
        assert re.findall(r"\d+", final)[-1] == steps[-1].split()[-1]
        n_strict += final.startswith("#### ")
    assert 0.3 < n_strict / len(examples) < 0.5


def test_random_builders_forward_and_generate(tokenizer):
    torch.manual_seed(0)
    enc = tokenizer(["What is 2 + 2?", "Hi"], return_tensors="pt", padding=True)
    for build in (tiny.build_random_qwen3, tiny.build_random_gpt_oss):
        model = build(tokenizer)
        assert next(model.parameters()).dtype == torch.float32
        with torch.no_grad():
            out = model(**enc)
        assert out.logits.shape == (2, enc["input_ids"].shape[1], len(tokenizer))
        assert torch.isfinite(out.logits).all()
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] <= enc["input_ids"].shape[1] + 3
    assert type(tiny.build_random_qwen3(tokenizer, num_hidden_layers=1)).__name__ == "Qwen3ForCausalLM"


def test_strict_score():
    assert tiny.strict_gsm8k_score("12 + 3 = 15\n#### 15", "#### 15") == 1.0
    assert tiny.strict_gsm8k_score("#### 1,500", "#### 1500") == 1.0
    assert tiny.strict_gsm8k_score("The answer is 15.", "#### 15") == 0.0
    assert tiny.strict_gsm8k_score("#### 15\n#### 16", "#### 15") == 0.0


def test_short_pretrain_makes_loadable_cached_dir(tmp_path):
    over = {"steps": 3, "batch_size": 8}
    path = tiny.ensure_tiny_model(tmp_path, progress=False, recipe_overrides=over)
    assert path.parent == tmp_path and path.name.startswith("tiny-qwen3-")
    recipe = json.loads((path / "recipe.json").read_text())
    assert recipe["steps"] == 3 and recipe == {**tiny.RECIPE, **over}
    stats = json.loads((path / "pretrain_stats.json").read_text())
    assert stats["steps"] == 3 and stats["tokens"] > 0 and stats["tokens_per_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    recs = make_arithmetic_records(4, seed=0, split="validation")
    acc = tiny.sampled_accuracy(model, tok, recs, max_new_tokens=4)
    assert 0.0 <= acc <= 1.0
    # Second call: reused, not rebuilt (same files, same mtimes).
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_model(tmp_path, progress=False, recipe_overrides=over) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    # A different recipe gets its own directory; nothing half-made is left behind.
    other = tiny.ensure_tiny_model(tmp_path, progress=False, recipe_overrides={**over, "steps": 2})
    assert other != path
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]
    assert leftovers == []


def test_default_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "c"))
    assert tiny.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GRPO_CACHE")
    assert tiny.default_cache_dir().name == "grpo"


def test_concurrent_builders_share_one_build(tmp_path):
    code = ("import sys; from grpo.models import tiny; "
            "print(tiny.ensure_tiny_model(sys.argv[1], progress=False, "
            "recipe_overrides={'steps': 2, 'batch_size': 4}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(dirs) == 1 and dirs[0].startswith("tiny-qwen3-")
    AutoModelForCausalLM.from_pretrained(tmp_path / dirs[0])
