"""engine.dtype bfloat16 in one process on the CPU (this CPU computes bf16 products natively through oneDNN):
the tiny Qwen3 (tied embeddings, LoRA on lm_head too, as the quickstart has it) and the tiny GPT-OSS (LoRA on the
MoE experts). What a GPU run keeps, kept here: the base in bf16, the LoRA weights and AdamW's states in fp32
(peft's autocast_adapter_dtype), the adapter saved in fp32, and reloaded in bf16 it gives the trained policy's
log-probs bit for bit; the decode loop's own log-probs (KV cache) against the trainer's full forward."""

from __future__ import annotations

import torch
from helpers_engine import build_model_dir

from grpo.algorithms.tis import sampler_mismatch_metrics
from grpo.batch import pack
from grpo.config import LoraConfig
from grpo.models.loading import chat_tokenizer, load_for_inference, load_policy, load_tokenizer
from grpo.rollout.generate import generate
from grpo.training.actor import UpdateSettings, adapter_disabled, compute_logprobs, update_policy
from grpo.training.checkpoint import save_checkpoint
from grpo.training.distributed import make_accelerator

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


def _settings(n: int) -> UpdateSettings:
    return UpdateSettings(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                          loss_agg_mode="token-mean", kl_coef=0.01, kl_penalty="low_var_kl", entropy_coef=0.0,
                          max_grad_norm=1.0, ppo_epochs=1, mini_batch_seqs=n, loss_scale_factor=8.0, micro_batch_seqs=2)


def _one_update(policy, batch):
    """A reference pass and one AdamW step, as a training step makes them; returns the optimizer."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    with adapter_disabled(policy):
        ref = compute_logprobs(policy, batch, 1.0, 2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[: len(batch)][:, None] * batch.response_mask
    update_policy(policy, opt, batch, adv, _settings(len(batch)), accelerator=make_accelerator(), ref_logp=ref)
    return opt


def _check_dtypes_and_update(policy, batch):
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}
    lora = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert lora and {v.dtype for v in lora.values()} == {torch.float32}
    opt = _one_update(policy, batch)
    moved = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert sorted(moved) == sorted(lora), "every LoRA tensor trains"
    states = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    assert states and {t.dtype for t in states} == {torch.float32}, "AdamW's moments in fp32"
    return opt


def test_qwen3_tied_lm_head_in_bf16_trains_saves_fp32_and_reloads_to_the_same_logprobs(tmp_path):
    model = build_model_dir(tmp_path / "model", seed=3)
    tok = load_tokenizer(str(model))
    torch.manual_seed(0)
    policy = load_policy(str(model), LoraConfig(rank=4, alpha=8, target_modules=TARGETS), dtype=torch.bfloat16)
    batch = pack([[5, 6, 7, 8], [5, 6, 7, 8], [9, 10, 11], [9, 10, 11]], [[12, 13, 14], [15, 16], [17, 18, 19], [20]], 0)
    opt = _check_dtypes_and_update(policy, batch)
    logp = compute_logprobs(policy, batch, 1.0, 2)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = save_checkpoint(tmp_path / "run", 1, accelerator=make_accelerator(), model=policy, optimizer=opt,
                           scheduler=sched, state={})
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for k, v in saved.items() if "lora_" in k} == {torch.float32}  # what a GPU run's peft saves
    again = load_for_inference(str(model), str(ckpt / "adapter"), dtype=torch.bfloat16)
    torch.testing.assert_close(compute_logprobs(again, batch, 1.0, 2), logp, rtol=0, atol=0)
    fp32 = compute_logprobs(load_for_inference(str(model), str(ckpt / "adapter")), batch, 1.0, 2)
    assert float((fp32 - logp).abs().max()) > 0  # fp32 inference is another policy: `grpo eval --dtype bfloat16`

    # the decode loop's own log-probs: in fp32 those of the trained forward to float rounding; in bf16 off by its
    # KV-cache decode's rounding (docs/scale.md, "bf16": what a GPU run sees)
    for dtype, policy_d in ((torch.float32, load_for_inference(str(model), str(ckpt / "adapter"))), (torch.bfloat16, again)):
        sampled: list = []
        torch.manual_seed(0)
        step = generate(policy_d, tok, [[5, 6, 7, 8], [9, 10]], n=3, max_new_tokens=6, temperature=1.0,
                        ignore_eos=True, sampler_logprobs=sampled).pack(0, sampler_logprobs=sampled)
        old = compute_logprobs(policy_d, step.packed, 1.0, 6)
        mask = step.packed.response_mask.bool()
        diff = float((old - step.sampler_logprobs)[mask].abs().max())
        k3 = sampler_mismatch_metrics(old, step.sampler_logprobs, step.packed.response_mask)["rollout_kl_k3"]
        if dtype == torch.float32:
            assert diff < 1e-4, diff
        else:
            assert 0 < k3 < 1e-2, k3


def test_gpt_oss_expert_lora_in_bf16(tmp_path):
    from grpo.models.tiny import build_random_gpt_oss

    tok = chat_tokenizer("gpt_oss")
    torch.manual_seed(0)
    build_random_gpt_oss(tok).save_pretrained(tmp_path / "oss")
    tok.save_pretrained(tmp_path / "oss")
    torch.manual_seed(0)
    policy = load_policy(str(tmp_path / "oss"), LoraConfig(rank=4, alpha=8), dtype=torch.bfloat16)
    assert any(".experts." in n for n, p in policy.named_parameters() if p.requires_grad)
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    torch.manual_seed(1)  # generation through transformers' generate (sliding-window layers), in bf16
    step = generate(policy, tok, [[5, 6, 7], [8, 9]], n=2, max_new_tokens=4, temperature=1.0, ignore_eos=True)
    batch = step.pack(tok.pad_token_id).packed
    assert batch.response_mask.sum() == 16
    _check_dtypes_and_update(policy, batch)


def test_a_bf16_job_on_the_server_then_bf16_inference_and_grpo_eval(tmp_path):
    """`grpo serve --dtype bfloat16` trains a job in bf16 (the operator's engine.dtype), then answers chat completions with
    its fine-tuned model (the bf16 base with the job's fp32 adapter): the same greedy text as the adapter loaded in
    bf16 in this process; and `grpo eval --dtype bfloat16 --adapter` grades the adapter."""
    import json

    import openai
    from helpers_engine import read_jsonl, run_grpo, write_data, write_varied_handler
    from server_helpers import server_log, start_server, wait_for
    from safetensors.torch import load_file

    from grpo.rollout.prompts import encode_prompt

    model = build_model_dir(tmp_path / "model", seed=3)
    train, val = write_data(tmp_path / "data", n_train=4, n_val=2)
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    write_varied_handler(handlers / "varied.py")
    hyper = {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 4, "inference_max_tokens": 8}
    engine = {"checkpoint_interval": 2, "micro_batch_size": 4, "log_with": ["none"],
              "reward": {"concurrency": 1}, "lora": {"rank": 4, "alpha": 8, "target_modules": TARGETS},
              "base_learning_rate": 5e-2}
    state = tmp_path / "state"
    with start_server(state, handlers, "bf16-test-key-0123456789", ["--model", f"{model}={model}",
                                                                     "--dtype", "bfloat16"]) as (url, key, _):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
        tid = client.files.create(file=train.open("rb"), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model=str(model), training_file=tid, extra_body={"method": {
            "type": "reinforcement", "reinforcement": {"grader": {"type": "lambda", "lambda": {"function": "varied.py"}},
                                                       "hyperparameters": hyper}}, "engine": engine}).id
        done = wait_for(lambda: (s := client.fine_tuning.jobs.retrieve(job).status) in ("succeeded", "failed") and s,
                        240, "the bf16 job")
        assert done == "succeeded", server_log(state)[-3000:]
        run = state / "jobs" / job / "run"
        assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == 2
        adapter = run / "checkpoints" / "step-000002" / "adapter"
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        # the LoRA tensors in fp32, as peft saves them from a bf16 GPU run; peft also saves the tied lm_head's base
        # weight (LoRA on a tied lm_head: save_embedding_layers), in the base's bf16
        assert {k: v.dtype for k, v in weights.items() if "lora_" not in k} == {
            "base_model.model.lm_head.base_layer.weight": torch.bfloat16}
        assert {v.dtype for k, v in weights.items() if "lora_" in k} == {torch.float32}
        messages = [{"role": "user", "content": "What is 3 + 4?"}]
        answer = client.chat.completions.create(model=client.fine_tuning.jobs.retrieve(job).fine_tuned_model,
                                                messages=messages, max_tokens=8, temperature=0)
    tok = load_tokenizer(str(model))
    local = load_for_inference(str(model), str(adapter), dtype=torch.bfloat16)
    ids = torch.tensor([encode_prompt(tok, messages)])
    with torch.no_grad():
        out = local.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer.choices[0].message.content == expected.strip() or answer.choices[0].message.content == expected
    assert answer.usage.completion_tokens == out.shape[1] - ids.shape[1]

    res = run_grpo("eval", "--model", model, "--adapter", adapter, "--dtype", "bfloat16", "--data", val,
                   "--handler", handlers / "varied.py", "--max-tokens", "8", "--json", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    assert result["samples"] == 2 and result["failures"] == 0 and 0 <= result["reward_mean"] <= 1
