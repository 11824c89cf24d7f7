"""The dry-run's time plan (grpo.training.time_plan): FLOPs per phase against counts made by hand for a small
Qwen3 config, the expected padded length, the response-length files `grpo eval` writes, the GPU arithmetic under
its stated assumptions, and the CLI's output."""

import json

import pytest
import torch
from helpers_engine import run_grpo, write_data, write_job

from grpo.config import load_config
from grpo.errors import UserError
from grpo.training.dry_run import inspect_model, model_config, setup_for
from grpo.training.time_plan import (
    GPUS,
    LAUNCH_S_PER_LAYER,
    MFU_UPDATE,
    Lengths,
    Phase,
    expected_max,
    predict_gpu,
    read_lengths_file,
    step_work,
)

torch.set_num_threads(1)
H, I, HEADS, KV, HD, LAYERS, V, R = 64, 128, 4, 2, 16, 2, 512, 4


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from transformers import Qwen3Config

    d = tmp_path_factory.mktemp("model")
    Qwen3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV, head_dim=HD, vocab_size=V, tie_word_embeddings=False).save_pretrained(d)
    train, _ = write_data(d / "data", n_train=4, n_val=1)
    path = write_job(d / "job.yaml", d, train, hyper={"batch_size": 2, "training_sample_per_prompt": 2,
                                                      "inference_max_tokens": 4},
                     engine={"dtype": "bfloat16", "micro_batch_size": 4, "kl_coef": 0.001,
                             "lora": {"rank": R, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    job = load_config(path)
    info = inspect_model(model_config(str(d))[0], job.engine.lora)
    return job, info, path


def test_expected_max_is_the_mean_of_the_largest_of_k_draws():
    assert expected_max([1, 2], 2) == pytest.approx(1 * 0.25 + 2 * 0.75)  # max is 1 only when both draws are 1
    assert expected_max([3, 3, 3], 5) == 3 and expected_max([2, 4], 1) == 3
    assert expected_max([0, 10], 64) == pytest.approx(10 * (1 - 0.5**64))


def test_flops_per_phase_by_hand(small):
    job, info, path = small
    q, kv = HEADS * HD, KV * HD
    body = LAYERS * (2 * H * q + 2 * H * kv + 3 * H * I + 2 * H + 2 * HD) + H  # projections, MLP, norms
    lora = LAYERS * (R * (H + q) + R * (H + kv))  # q_proj and v_proj
    head = V * H
    assert info.active - info.lm_head == body and info.trainable == lora and info.lm_head == head
    per_layer_attn = 4 * HEADS * HD  # QK^T and AV, per query per attended position

    def attn(queries, past):  # all layers, full attention
        return LAYERS * per_layer_attn * sum(past + c for c in range(1, queries + 1))

    lengths = Lengths(prompts=[10, 10], responses=[4, 4], prompt_source="", response_source="")
    setup = setup_for(job, info)
    w = step_work(info, job, lengths, setup)
    assert set(w.phases) == {"gen", "ref", "update_actor"}  # on-policy, transformers backend: no old log-probs
    # generation: 2 prompts x 2 samples in one call; each prompt prefilled once (shared prefix), its last position
    # through lm_head; 3 decode calls for 4 tokens (the first comes from the prefill), each through lm_head
    prefill = 2 * (body + lora) * 2 * 10 + 2 * attn(10, 0) + 2 * head * 2
    decode = 3 * 4 * 2 * (body + lora + head) + 4 * attn(3, 10)
    assert w.phases["gen"].flops == pytest.approx(prefill + decode, rel=1e-12)
    assert w.phases["gen"].calls == 4 and w.phases["gen"].decode_steps == 4
    # reference log-probs: one micro-batch of 4 rows; 2 prompts once + 4 responses; lm_head on the 16 response positions
    tokens = 2 * 10 + 4 * 4
    fwd = 2 * (body + lora) * tokens + 2 * attn(10, 0) + 4 * attn(4, 10)
    assert w.phases["ref"].flops == pytest.approx(fwd + 2 * head * 16, rel=1e-12)
    assert w.trained_tokens == tokens and w.sampled_tokens == 16
    # update (no gradient checkpointing: prompts shared): forward + input gradients + LoRA weight gradients,
    # attention's backward twice its forward, lm_head forward + checkpointed recompute + input gradient
    attn_all = 2 * attn(10, 0) + 4 * attn(4, 10)
    upd = 2 * (2 * (body + lora) * tokens + attn_all) + 2 * lora * tokens + 2 * attn_all + 3 * 2 * head * 16
    assert w.phases["update_actor"].flops == pytest.approx(upd, rel=1e-12)
    # gradient checkpointing: every row runs its prompt, and the decoder's forward runs twice
    gc = load_config(path, ["engine.gradient_checkpointing=true"])
    w_gc = step_work(info, gc, lengths, setup_for(gc, info))
    rows = 4 * 14  # 4 rows x (10 + 4), right-padded to the longest
    attn_rows = 4 * attn(14, 0)
    upd_gc = 3 * (2 * (body + lora) * rows + attn_rows) + 2 * lora * rows + 2 * attn_rows + 3 * 2 * head * 16
    assert w_gc.phases["update_actor"].flops == pytest.approx(upd_gc, rel=1e-12)


def test_gpu_seconds_follow_the_stated_assumptions(small):
    info = small[1]
    p = Phase(kind="update", flops=1e15, calls=10)
    assert predict_gpu(p, info, "h100") == pytest.approx(1e15 / (989e12 * MFU_UPDATE) + 10 * LAYERS * LAUNCH_S_PER_LAYER)
    d = Phase(kind="decode", flops=1e9, decode_flops=1e9, bytes=4.8e12 * 0.6, calls=1)  # one second of bandwidth
    assert predict_gpu(d, info, "h200") == pytest.approx(1.0 + LAYERS * LAUNCH_S_PER_LAYER)
    assert set(GPUS) == {"h100", "h200", "a100", "l40s"}


def test_lengths_files_from_grpo_eval(tmp_path):
    out = tmp_path / "samples.jsonl"
    out.write_text("".join(json.dumps({"id": "a", "response": "x", "score": 1.0, "response_tokens": n}) + "\n"
                           for n in (3, 5, 40)))
    got, source = read_lengths_file(out, max_tokens=32)
    assert got == [3, 5, 32] and "3 samples" in source  # a response never runs past the job's cap
    js = tmp_path / "eval.json"
    js.write_text(json.dumps({"samples": 100, "response_length_mean": 20.0, "response_length_clip_ratio": 0.25}))
    got, _ = read_lengths_file(js, max_tokens=32)
    assert sum(got) / len(got) == pytest.approx(20.0, abs=0.05) and got.count(32) == 250  # a quarter at the cap
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "response_tokens": 3}) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(UserError, match=f"{bad}:2: response_tokens"):
        read_lengths_file(bad, max_tokens=32)


def test_dry_run_prints_the_time_plan(tmp_path):
    from helpers_engine import build_model_dir

    model = build_model_dir(tmp_path / "model")
    train, val = write_data(tmp_path / "data", n_train=8, n_val=2)
    job = write_job(tmp_path / "job.yaml", model, train, val)
    lengths = tmp_path / "eval.json"
    lengths.write_text(json.dumps({"samples": 8, "response_length_mean": 6.0, "response_length_clip_ratio": 0.5}))
    res = run_grpo("train", job, "--dry-run", "--gpu", "h200", "--lengths", lengths, timeout=90)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "time plan (one process" in out and "tokenized with the model's chat template" in out
    assert f"{lengths} (grpo eval --json: mean 6.0, 50% at the cap" in out
    assert "FLOPs/step    generation" in out and "update" in out
    assert "this CPU      probe" in out and "predicted per step: generation" in out
    assert "whole job: 4 steps + 2 validations" in out  # 8 records / 2 per step; the baseline and step 4 (interval 4)
    assert "h200          (H200 SXM 141 GB, assumed)" in out and "GPU-hours" in out and "h100 " not in out
    assert "GPU figures are assumptions, not measurements" in out
    bad = run_grpo("train", job, "--gpu", "h100", timeout=60)
    assert bad.returncode == 2 and "add --dry-run" in bad.stderr and "Traceback" not in bad.stderr
