"""GPU smoke run: a few GRPO steps on the real Qwen3-32B / GPT-OSS-20B architectures, and what they cost.

The models are built at full size from their architectures (grpo.training.dry_run.KNOWN_CONFIGS) with random bf16
weights, directly on the GPU: no hub, nothing written to disk. Each step goes through the engine's own code:
chat-template prompts (the real templates, grpo/templates), LoRA by grpo.models.loading.add_lora (experts included
for GPT-OSS), gradient checkpointing, grpo.rollout.generate, the reference log-probs with the adapter off and
grpo.training.actor.update_policy (chunked log-probs). Random scores stand in for a reward (a random model's answers
are all wrong), so the update is a real one with real shapes.

Generation is measured for each rollout backend of grpo.rollout.samplers (--backend): "transformers" (our decode
loop / transformers generate) and "continuous" (transformers' continuous batching: paged attention, CUDA
graphs), with the ratio between them, and for "continuous" the mismatch between its log-probs and the
trainer's (rollout_kl_k3, the mean TIS weight): what engine.rollout.backend should default to on a GPU.
The update uses the first backend's responses.

Printed per step and summarised (also as JSON with --json): peak GPU memory, generation tokens/s, update
tokens/s and the update phase's MFU = update tokens/s x FLOPs per token / the GPU's peak bf16 FLOP/s, with
FLOPs per token = 4 x active parameters (MoE: the top-k experts only; a frozen base under LoRA needs the
forward and the activation-gradient half of the backward; gradient checkpointing's recompute and attention
scores are not counted, as is usual for MFU).

--rehearse runs the same code on the CPU (bf16 unless --dtype float32) with the same architectures divided in
width by --width-scale (hidden size and MLP / expert size, rounded up to a multiple of 16, and head size, at
least 8; layer count and types, heads, experts, top-k and vocabulary as the real model): what scripts/gpu_check.sh --rehearse runs before a GPU is lent. Its
figures measure the CPU, not a GPU: "peak_cpu_rss_gib" is the process's RSS, and its MFU is against
--peak-tflops (default verl's nominal CPU figure, grpo.training.metrics.CPU_FLOPS).

    python scripts/gpu_smoke.py --model gpt_oss                  # needs a CUDA GPU (~55 GB for GPT-OSS-20B)
    python scripts/gpu_smoke.py --model qwen3 --layers 32        # Qwen3-32B's layers, half of them
    python scripts/gpu_smoke.py --rehearse --model all --layers 2 --steps 2   # CPU, width / 16: the same code
    python scripts/gpu_smoke.py --model qwen3 --layers 8 --backend continuous
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# Peak dense bf16 tensor FLOP/s by device name (vendor datasheets); others: --peak-tflops.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "B200": 2250.0}
HUB_IDS = {"qwen3": "Qwen/Qwen3-32B", "gpt_oss": "openai/gpt-oss-20b"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["qwen3", "gpt_oss", "all"], default="all")
    p.add_argument("--rehearse", action="store_true", help="on the CPU, the architectures divided in width by "
                   "--width-scale: checks the code paths and the output, measures the CPU only")
    p.add_argument("--width-scale", type=int, default=None, help="divide hidden, MLP/expert and head sizes by this "
                   "(default 16 with --rehearse, else 1); layers, heads, experts and vocabulary are kept")
    p.add_argument("--vocab-size", type=int, default=None, help="a smaller vocabulary than the real model's (the "
                   "rehearsal in the tests: the embedding and head are most of a width-scaled model); at least the "
                   "chat tokenizer's 391 tokens")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the weights' dtype")
    p.add_argument("--steps", type=int, default=3, help="steps (the first one includes warm-up; the summary leaves it out)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sample (transformers backend: "
                   "end tokens ignored; continuous: until an end token, rare for random weights)")
    p.add_argument("--backend", choices=["transformers", "continuous", "both"], default="both",
                   help="rollout backends to time (grpo.rollout.samplers)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward")
    p.add_argument("--layers", type=int, default=None, help="use fewer decoder layers than the real model")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s (for MFU)")
    p.add_argument("--json", default=None, help="also write the summary here")
    return p.parse_args(argv)


def smoke_config(kind: str, layers: int | None = None, width_scale: int = 1, vocab_size: int | None = None):
    """The transformers config the smoke run builds: the real model's (KNOWN_CONFIGS), its first `layers` decoder
    layers, hidden / MLP (expert) sizes divided by `width_scale` (rounded up to a multiple of 16) and the head size
    (at least 8). scripts/gpu_check.sh's dry-run
    comparison estimates memory from this same config."""
    from grpo.training.dry_run import model_config

    config, _ = model_config(HUB_IDS[kind])
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    if width_scale > 1:  # rounded up to a multiple of 16 elements: grouped_mm (MoE experts) wants 16-byte strides
        for name in ("hidden_size", "intermediate_size"):
            setattr(config, name, 16 * -(-getattr(config, name) // (16 * width_scale)))
        config.head_dim = max(8, config.head_dim // width_scale)
    if vocab_size:
        config.vocab_size = vocab_size
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids past the vocabulary: none
            if isinstance(getattr(config, name, None), int) and getattr(config, name) >= vocab_size:
                setattr(config, name, None)
    return config


def build(kind: str, args, device, dtype):
    """(policy, tokenizer, ModelInfo) for one architecture, built with random weights on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    from grpo.config import LoraConfig
    from grpo.models.loading import add_lora, chat_tokenizer, enable_gradient_checkpointing
    from grpo.training.dry_run import inspect_model

    tok = chat_tokenizer(kind)
    lora = LoraConfig(rank=args.lora_rank, alpha=2 * args.lora_rank)
    torch.manual_seed(0)
    config = smoke_config(kind, args.layers, args.width_scale, args.vocab_size)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    info = inspect_model(config, lora)
    if not args.no_gradient_checkpointing:
        enable_gradient_checkpointing(model)
    policy = add_lora(model, lora)
    if not args.no_gradient_checkpointing:
        policy.enable_input_require_grads()
    return policy, tok, info


def prompts_for(tok, n: int, length: int) -> list[list[int]]:
    """`n` chat-template prompts of at least `length` tokens (a GSM8K-style question, repeated)."""
    from grpo.rollout.prompts import encode_prompt

    out = []
    for i in range(n):
        text = f"Tom has {10 + i} apples and gets 23 more. How many apples does Tom have now?"
        while len(ids := encode_prompt(tok, [{"role": "user", "content": text}], reasoning_effort="low")) < length:
            text += " Let's think step by step and output the final answer after '####'."
        out.append(ids)
    return out


def run_one(kind: str, args, device, acc, peak_flops: float | None, dtype, save=lambda summary: None) -> dict:
    """Build one model and run its steps; `save(summary)` after every step with the summary so far ("partial":
    true until the last), so that a run stopped by its time limit still leaves its steps in the JSON."""
    import torch

    from grpo.algorithms import core as alg
    from grpo.algorithms.tis import sampler_mismatch_metrics
    from grpo.rollout.samplers import ContinuousSampler, TransformersSampler
    from grpo.training.actor import UpdateSettings, adapter_disabled, compute_logprobs, update_policy

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    import psutil

    rss_before = psutil.Process().memory_info().rss / 2**30
    t = time.perf_counter()
    policy, tok, info = build(kind, args, device, dtype)
    build_s = time.perf_counter() - t
    params = [p for p in policy.parameters() if p.requires_grad]
    model, opt = acc.prepare(policy, torch.optim.AdamW(params, lr=1e-5))
    n_seq = args.prompts * args.group
    settings = UpdateSettings(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0,
                              loss_agg_mode="token-mean", kl_coef=0.001, kl_penalty="low_var_kl", entropy_coef=0.0,
                              max_grad_norm=1.0, ppo_epochs=1, mini_batch_seqs=n_seq,
                              loss_scale_factor=float(args.new_tokens), micro_batch_seqs=args.micro_batch)
    prompts = prompts_for(tok, args.prompts, args.prompt_tokens)
    backends = ["transformers", "continuous"] if args.backend == "both" else [args.backend]
    samplers = {"transformers": TransformersSampler(policy, tok, ignore_eos=True)}
    if "continuous" in backends:
        samplers["continuous"] = ContinuousSampler(policy, tok)
    def summarize(rows: list[dict], partial: bool) -> dict:
        steady = rows[1:] or rows

        def mean(k):
            vals = [r[k] for r in steady if r[k] is not None]
            return sum(vals) / len(vals) if vals else None

        peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        out = {"model": kind, "partial": partial, "rehearsal": args.rehearse, "width_scale": args.width_scale,
               "dtype": str(dtype).removeprefix("torch."), "layers": info.layers, "hidden_size": info.hidden,
               "vocab_size": info.vocab, "parameters": info.total,
               "active_parameters": info.active, "trainable_parameters": info.trainable, "build_s": build_s,
               "sequences_per_step": n_seq, "prompt_tokens": len(prompts[0]), "new_tokens": args.new_tokens,
               "gen_tokens_per_s": mean("gen_tokens_per_s"), "update_tokens_per_s": mean("update_tokens_per_s"),
               **{f"gen_tokens_per_s_{b}": mean(f"gen_tokens_per_s_{b}") for b in backends},
               **{k: mean(k) for k in steady[0] if k.startswith("continuous_")},
               "update_mfu": mean("update_mfu"), "update_flops_per_token": info.flops_per_token(train=True),
               ("peak_gpu_memory_gib" if cuda else "peak_cpu_rss_gib"): peak, "steps": list(rows)}
        if not cuda:  # ru_maxrss is the process's peak: its libraries, and the models built before this one
            out["cpu_rss_before_build_gib"] = rss_before
        return out

    rows = []
    for step in range(args.steps):
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        per_backend = {}
        for b in backends:
            t0 = time.perf_counter()
            sampled = samplers[b].generate(prompts, n=args.group, max_new_tokens=args.new_tokens, temperature=1.0)
            sync()
            per_backend[b] = (sampled, time.perf_counter() - t0)
            samplers[b].sleep()
        mismatch = {}
        if "continuous" in per_backend:  # its log-probs against the trainer's, before the update moves the weights
            c = per_backend["continuous"][0]
            old = compute_logprobs(policy, c.packed, 1.0, args.micro_batch).cpu()
            sel = c.packed.response_mask.bool()
            mismatch = sampler_mismatch_metrics(old[sel], c.sampler_logprobs[sel], torch.ones(int(sel.sum())))
        roll, gen_s = per_backend[backends[0]][0], per_backend[backends[0]][1]
        t1 = time.perf_counter()
        batch = roll.packed
        scores = torch.rand(len(roll), generator=torch.Generator().manual_seed(step))
        adv = alg.group_normalized_advantages(scores, roll.group)
        with adapter_disabled(policy):
            ref = compute_logprobs(policy, batch, 1.0, args.micro_batch)
        sync()
        t2 = time.perf_counter()
        m = update_policy(model, opt, batch, alg.broadcast_to_tokens(adv, batch.response_mask), settings, accelerator=acc,
                          ref_logp=ref)
        sync()
        t3 = time.perf_counter()
        upd_tokens = int(batch.attention_mask.sum())
        row = {"step": step + 1, "gen_s": gen_s, "ref_s": t2 - t1, "update_s": t3 - t2,
               "update_tokens_per_s": upd_tokens / (t3 - t2),
               "actor_pg_loss": m["actor_pg_loss"], "actor_grad_norm": m["actor_grad_norm"]}
        for b, (sampled, secs) in per_backend.items():
            row[f"gen_tokens_per_s_{b}"] = int(sampled.response_lengths.sum()) / secs
        row["gen_tokens_per_s"] = row[f"gen_tokens_per_s_{backends[0]}"]
        row.update({f"continuous_{k}": v for k, v in mismatch.items()})
        row["update_mfu"] = (row["update_tokens_per_s"] * info.flops_per_token(train=True) / peak_flops
                             if peak_flops else None)
        rows.append(row)
        gens = ", ".join(f"{b} {row[f'gen_tokens_per_s_{b}']:.1f}" for b in backends)
        print(f"  [{kind}] step {row['step']}: generation tok/s {gens}; update "
              f"{row['update_tokens_per_s']:.1f} tok/s" + (f", MFU {row['update_mfu']:.1%}" if row["update_mfu"] else "")
              + f", grad norm {row['actor_grad_norm']:.3g}"
              + (f"; continuous vs trainer rollout_kl_k3 {row['continuous_rollout_kl_k3']:.2e}" if mismatch else ""),
              flush=True)
        save(summarize(rows, partial=step < args.steps - 1))
    summary = summarize(rows, partial=False)
    del model, opt, policy
    if cuda:
        torch.cuda.empty_cache()
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.width_scale is None:
        args.width_scale = 16 if args.rehearse else 1
    if args.width_scale < 1:
        print(f"error: --width-scale {args.width_scale}: must be >= 1", file=sys.stderr)
        return 2
    if args.vocab_size is not None and args.vocab_size < 391:
        print(f"error: --vocab-size {args.vocab_size}: the chat tokenizer has 391 tokens", file=sys.stderr)
        return 2
    if not args.rehearse and not torch.cuda.is_available():
        print("error: the smoke run builds Qwen3-32B / GPT-OSS-20B on a CUDA GPU, and there is none here; "
              "--rehearse runs the same code on the CPU with the models divided in width", file=sys.stderr)
        return 2
    from accelerate import Accelerator

    from grpo.training.metrics import CPU_FLOPS

    device = torch.device("cpu" if args.rehearse else "cuda")
    dtype = getattr(torch, args.dtype)
    acc = Accelerator(cpu=args.rehearse)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (CPU_FLOPS / 1e12 if device.type == "cpu" else
                                next((v for k, v in PEAK_TFLOPS.items() if k in name), None))
    if device.type == "cuda" and peak is None:
        print(f"warning: peak FLOP/s of '{name}' unknown; pass --peak-tflops for MFU", file=sys.stderr)
    def write(results: list[dict]) -> None:
        if args.json:
            tmp = f"{args.json}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"device": name, "rehearsal": args.rehearse, "peak_tflops": peak, "results": results}, f,
                          indent=2)
            os.replace(tmp, args.json)

    results = []
    for kind in (["qwen3", "gpt_oss"] if args.model == "all" else [args.model]):
        what = f"width / {args.width_scale}" if args.width_scale > 1 else "full width"
        print(f"{kind}: {what}, {args.layers or 'all'} layers, random {args.dtype} weights on {name}", flush=True)
        results.append(run_one(kind, args, device, acc, peak * 1e12 if peak else None, dtype,
                               save=lambda summary: write(results + [summary])))
    for r in results:
        mem = r.get("peak_gpu_memory_gib", r.get("peak_cpu_rss_gib"))
        print(f"{r['model']}: {r['parameters'] / 1e9:.2f} B parameters ({r['active_parameters'] / 1e9:.2f} B active), "
              f"{r['trainable_parameters'] / 1e6:.1f} M trainable; peak {'GPU' if device.type == 'cuda' else 'CPU RSS'} "
              f"{mem:.2f} GiB; generation {r['gen_tokens_per_s']:.1f} tok/s; update {r['update_tokens_per_s']:.1f} tok/s"
              + (f"; update MFU {r['update_mfu']:.1%}" if r["update_mfu"] else ""))
        if r.get("gen_tokens_per_s_continuous") and r.get("gen_tokens_per_s_transformers"):
            print(f"{r['model']}: generation, continuous batching / transformers backend = "
                  f"{r['gen_tokens_per_s_continuous'] / r['gen_tokens_per_s_transformers']:.2f}x "
                  f"({r['gen_tokens_per_s_continuous']:.1f} vs {r['gen_tokens_per_s_transformers']:.1f} tok/s); "
                  f"sampler mismatch rollout_kl_k3 {r['continuous_rollout_kl_k3']:.2e}, "
                  f"TIS weight mean {r['continuous_rollout_tis_weight_mean']:.4f}")
    write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
