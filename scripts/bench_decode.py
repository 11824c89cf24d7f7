"""Where a decode step's time goes, against what the cores can deliver (issue #13).

    python scripts/bench_decode.py                       # the 12.8M-parameter model of bench_vs_trl.py
    python scripts/bench_decode.py --model grpo:smollm2-135m-instruct --rows 64 --prompt 59 --new 32
    python scripts/bench_decode.py --quick            # tiny shapes, one repeat: the suite's check (timings not figures)

One invocation loads the model with a LoRA adapter (rank 32, all linear layers; merged for decoding, as the
trainer samples), then for each Linear kernel choice (`engine.cpu_linear`: PyTorch's `aten` = MKL, and
`onednn`) runs `grpo.rollout.generate.generate` on `--prompts` prompts x `--group` samples (ignore_eos, so every
row decodes `--new` tokens) under torch.profiler and prints, per decode step: the Linear products, attention,
sampling (softmax, the draw), the rest of the operators, and Python/dispatch (wall time not inside any
operator); then the floor: 2 x parameters x rows FLOPs per step at the rate a single large product reaches on
this machine (measured here), and last the ratio aten/onednn of the whole `generate` call. With oneDNN it also
runs the decode loop drawing with `torch.multinomial` (an exponential per vocabulary entry) in place of the
one-uniform inverse-CDF sampler (grpo.rollout.sampling), and prints that ratio too (issue #24); and the loop
calling the model's own forward per step instead of grpo.models.decode_step.LeanDecoder (bit for bit the same
tokens; `onednn+transformers`), with that ratio.

Checked every run (exit 1 otherwise): the two kernel choices give the same next-token logits on the prompts (to
fp32 rounding, 1e-3), each `generate` call returns prompts x group responses of exactly --new tokens, and the
lean decoder draws the same tokens as the model's own forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LINEAR = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul")
ATTENTION = ("scaled_dot_product",)
SAMPLING = ("aten::multinomial", "aten::exponential_", "aten::_softmax", "aten::sort", "aten::cumsum", "aten::searchsorted",
            "aten::uniform_", "aten::nextafter")


def build(a):
    import torch

    from grpo.config import LoraConfig
    from grpo.models.loading import add_lora, load_base_model, load_tokenizer, resolve_model_path

    if a.model:
        path = resolve_model_path(a.model)
        tok = load_tokenizer(path)
        base = load_base_model(path, torch.float32, cpu_linear="aten")
    else:
        from grpo.models.tiny import build_random_qwen3
        from grpo.models.tiny_data import build_tokenizer

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_vs_trl import MODEL

        tok = build_tokenizer()
        torch.manual_seed(0)
        base = build_random_qwen3(tok, **MODEL)
    policy = add_lora(base, LoraConfig(rank=32, alpha=64, dropout=0.0, target_modules="all-linear"))
    for n, p in policy.named_parameters():  # a trained-looking adapter (B != 0), so the merge does real work
        if "lora_B" in n:
            p.data.normal_(0, 0.01)
    return policy, tok


def profile_generate(policy, tok, prompts, a) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from grpo.rollout.generate import generate

    def run():
        torch.manual_seed(0)
        return generate(policy, tok, prompts, n=a.group, max_new_tokens=a.new, temperature=1.0, ignore_eos=True)

    first = run()  # warm-up: oneDNN primitive caches, allocator
    lengths = [int(n) for n in first.response_lengths]
    if lengths != [a.new] * (len(prompts) * a.group):
        raise SystemExit(f"generate returned response lengths {lengths}, expected {len(prompts) * a.group} x {a.new}")
    walls = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        run()
        prof_wall = time.perf_counter() - t
    buckets = {"linear": 0.0, "attention": 0.0, "sampling": 0.0, "other ops": 0.0}
    for ev in prof.key_averages():
        us = ev.self_cpu_time_total
        if ev.key.startswith(LINEAR):
            buckets["linear"] += us
        elif any(k in ev.key for k in ATTENTION):
            buckets["attention"] += us
        elif ev.key.startswith(SAMPLING):
            buckets["sampling"] += us
        else:
            buckets["other ops"] += us
    ops = sum(buckets.values()) / 1e6
    buckets = {k: v / 1e6 for k, v in buckets.items()}
    buckets["python/dispatch"] = max(prof_wall - ops, 0.0)
    return {"wall": statistics.median(walls), "walls": walls, "split": buckets, "prof_wall": prof_wall,
            "tokens": first.response_ids}


def gemm_rate(threads: int, k: int, n: int) -> float:
    """GFLOP/s of one large float32 product through oneDNN (the best this machine's cores gave here)."""
    import torch

    x, w = torch.randn(2048, k), torch.randn(n, k)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 * k * n / best / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model name/path (default: bench_vs_trl.py's random 12.8M Qwen3)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt", type=int, default=211, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="decoded tokens per row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 prompt x 2 samples, 16 prompt tokens, 4 decoded, 1 repeat, "
                   "1 thread: the checks on, the timings printed but no figure (tests/test_bench_quick.py)")
    a = p.parse_args()
    if a.quick:  # one thread: on a busy shared machine two threads' OpenMP barriers stall (20x slower here)
        a.prompts, a.group, a.prompt, a.new, a.repeats, a.threads = 1, 2, 16, 4, 1, 1

    import os

    import torch

    from grpo.models.cpu_linear import use_onednn_linears

    from grpo.bench import LoadWatch, spread_line

    LoadWatch(a.threads).at_exit()
    torch.set_num_threads(a.threads)
    policy, tok = build(a)
    params = sum(p.numel() for n, p in policy.named_parameters() if "lora_" not in n)
    g = torch.Generator().manual_seed(0)
    vocab = policy.get_input_embeddings().weight.shape[0]
    prompts = [torch.randint(10, vocab - 10, (a.prompt,), generator=g).tolist() for _ in range(a.prompts)]
    rows = a.prompts * a.group
    hidden = policy.get_input_embeddings().weight.shape[1]
    rate = gemm_rate(a.threads, hidden, 4 * hidden)
    floor_ms = 2 * params * rows / (rate * 1e9) * 1e3
    print(f"model: {params / 1e6:.1f}M parameters, fp32; {a.prompts} prompts x {a.group} = {rows} rows, prompt {a.prompt} "
          f"tokens, {a.new} decoded; {a.threads} threads; load {os.getloadavg()[0]:.2f}")
    print(f"floor: 2 x {params / 1e6:.1f}M x {rows} rows = {2 * params * rows / 1e9:.2f} GFLOP per decode step; one large "
          f"product reaches {rate:.0f} GFLOP/s here -> {floor_ms:.1f} ms per step (weights {params * 4 / 2**20:.0f} MiB read "
          "per step besides)")
    import grpo.rollout.generate as decode_loop

    res, logits = {}, {}
    inverse_cdf = decode_loop.sample_rows
    for choice in ("aten", "onednn", "onednn+multinomial", "onednn+transformers"):
        if choice == "onednn":
            use_onednn_linears(policy, "onednn")
        if choice == "onednn+multinomial":
            decode_loop.sample_rows = lambda probs: torch.multinomial(probs, 1).squeeze(1)
        elif choice == "onednn+transformers":
            decode_loop.LEAN_DECODE = False
        else:
            with torch.no_grad():
                logits[choice] = policy(input_ids=torch.tensor(prompts)).logits[:, -1]
        try:
            r = res[choice] = profile_generate(policy, tok, prompts, a)
        finally:
            decode_loop.sample_rows = inverse_cdf
            decode_loop.LEAN_DECODE = True
        per = {k: v / a.new * 1e3 for k, v in r["split"].items()}
        print(f"  {choice:18s} generate {r['wall']:.2f} s = {r['wall'] / a.new * 1e3:.1f} ms per decode step (prefill "
              f"included); profiled split, ms per step: " + "  ".join(f"{k} {v:.1f}" for k, v in per.items()))
    print("  " + spread_line("aten/onednn, whole generate call,", [x / y for x, y in zip(res["aten"]["walls"],
                                                                                       res["onednn"]["walls"])]))
    print("  " + spread_line("multinomial/inverse-CDF sampler (onednn), whole generate call,",
                             [x / y for x, y in zip(res["onednn+multinomial"]["walls"], res["onednn"]["walls"])]))
    print("  " + spread_line("transformers' forward/lean decoder (onednn), whole generate call,",
                             [x / y for x, y in zip(res["onednn+transformers"]["walls"], res["onednn"]["walls"])]))
    print("  " + spread_line("onednn vs the floor,", [w / a.new * 1e3 / floor_ms for w in res["onednn"]["walls"]]))
    print(f"ratio aten/onednn, whole generate call: {res['aten']['wall'] / res['onednn']['wall']:.2f}x; "
          f"onednn vs the floor: {res['onednn']['wall'] / a.new * 1e3 / floor_ms:.1f}x")
    diff = (logits["aten"] - logits["onednn"]).abs().max().item()
    print(f"check: next-token logits, aten vs onednn: max |difference| {diff:.2e} (limit 1e-3)")
    same = res["onednn"]["tokens"] == res["onednn+transformers"]["tokens"]
    print(f"check: the lean decoder and transformers' forward drew the same tokens (seed 0): {same}")
    return 0 if diff <= 1e-3 and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
