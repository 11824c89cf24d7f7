"""Our GRPO engine against TRL's GRPOTrainer, side by side, at equal work (issue #6).

    python scripts/bench_vs_trl.py                 # fixed-length (EOS ignored) and variable-length, ~5 min on 2 cores
    python scripts/bench_vs_trl.py --mode fixed --steps 8 --rounds 2
    python scripts/bench_vs_trl.py --quick         # tiny shapes, synthetic prompts: the suite's check (timings no figure)

One invocation builds a random-weight Qwen3-architecture model (~13M parameters, fp32) and a file of GSM8K
prompts, then runs each engine for `--steps` steps in its own subprocess (so each one's peak memory is its
own), alternating ours and TRL's `--rounds` times. Equal settings in both, written here: fp32, the same
thread count, gradient checkpointing off, the same prompts in the same order, group size 8, 128 response
tokens (fixed mode: EOS ignored, every response exactly 128 tokens), LoRA rank 32 / alpha 64 / dropout 0 on
all linear layers (the same peft config object), AdamW at the same learning rate, token-mean aggregation
(TRL's `dapo`, which on one process is the token mean), clip 0.2/0.2, k3 KL at coefficient 0.001 against
the adapter-disabled base (TRL's `use_bias_correction_kl` off: on by default in TRL 1.16, it changes the KL
gradient; tests/test_trl_parity.py shows the two losses and gradients equal with it off), advantage epsilon 1e-4 (TRL's, hard-coded there; ours is set to match), one
update epoch, on-policy (no old-log-prob pass in either), temperature 1.0, top-k off, top-p 1.0, the same
GSM8K Lambda handler as the reward (rewards/gsm8k.py; ours through its RewardRunner, TRL in-process).

Ours runs through `grpo.training.trainer.Trainer.step`, the code path `grpo train` uses; fixed mode sets
`engine.ignore_eos` (the default transformers rollout backend then ignores end tokens). TRL runs
`GRPOTrainer.train()`; its time split comes from timing wrappers around its own methods.

Checked (exit 1 otherwise): in fixed mode every step of both engines generates exactly prompts x group x
max-tokens completion tokens, and both see prompts of the same mean length (the equal work the ratio assumes).

Printed per engine: median completion tokens/s over the measured steps (warm-up steps excluded), median
step time, peak memory (the process's max RSS; on CUDA, torch's peak allocated), the time split
(generation, reward, log-probs = the reference pass, update, other); last, the ratio ours/TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HANDLER = REPO / "rewards" / "gsm8k.py"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)
LORA = dict(rank=32, alpha=64, dropout=0.0, target_modules="all-linear")
ADV_EPS = 1e-4  # TRL's (hard-coded in GRPOTrainer); ours takes it as an argument
LR = 1e-4


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    torch.manual_seed(0)


def _peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


# ----------------------------------------------------------------------------- ours
def run_ours(a) -> dict:
    import functools

    from grpo.algorithms import core as algorithms
    from grpo.config import parse_config
    from grpo.training import trainer as trainer_mod

    # TRL's std epsilon, through the registry (the trainer looks the estimator up by name, engine.algorithm)
    if "grpo_trl_eps" not in algorithms.ADVANTAGE_ESTIMATORS:
        algorithms.register_adv_est("grpo_trl_eps")(
            functools.partial(algorithms.grpo_outcome_advantage, epsilon=ADV_EPS))
    job = {"model": a.model_dir, "training_file": a.data,
           "method": {"type": "reinforcement", "reinforcement": {
               "grader": {"type": "lambda", "lambda": {"function": str(HANDLER)}},
               "hyperparameters": {"batch_size": a.prompts, "training_sample_per_prompt": a.group,
                                   "inference_max_tokens": a.max_tokens, "max_prompt_length": 1024,
                                   "learning_rate": LR, "early_stopping": False}}},
           "engine": {"dtype": "float32", "gradient_checkpointing": False, "kl_coef": 0.001,
                      "kl_penalty": "low_var_kl", "loss_agg_mode": "token-mean", "ppo_epochs": 1,
                      "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "temperature": 1.0, "top_p": 1.0,
                      "micro_batch_size": a.prompts * a.group, "log_with": ["none"], "log_samples": 0,
                      "ignore_eos": a.fixed,
                      "lora": LORA, "reward": {"concurrency": 1}, "algorithm": {"adv_estimator": "grpo_trl_eps"}}}
    cfg = parse_config(job)
    with tempfile.TemporaryDirectory() as run_dir:
        tr = trainer_mod.Trainer(cfg, Path(run_dir), progress=False)
        steps = []
        for i in range(a.steps):
            m = tr.step(i)
            t = {k[len("timing_s_"):]: v for k, v in m.items() if k.startswith("timing_s_")}
            split = {"gen": t["gen"], "reward": t["reward"], "logprobs": t.get("ref", 0.0) + t.get("old_log_prob", 0.0),
                     "update": t["update_actor"]}
            split["other"] = t["step"] - sum(split.values())
            steps.append({"step_s": t["step"], "tokens": m["response_length_mean"] * a.prompts * a.group,
                          "prompt_len": m["prompt_length_mean"], "split": split, "loss": m["actor_pg_loss"]})
        tr.runner.close()
    return {"steps": steps, "peak_mb": _peak_memory_mb()}


# ----------------------------------------------------------------------------- TRL
def run_trl(a) -> dict:
    import importlib.util

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.config import LoraConfig
    from grpo.models.loading import peft_lora_config
    from grpo.reward.runner import make_trajectory

    spec = importlib.util.spec_from_file_location("gsm8k_handler", HANDLER)
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    order = json.loads(Path(a.order).read_text())
    ds = Dataset.from_list([{"prompt": rows[i]["messages"], "reference_answer": rows[i]["reference_answer"],
                             "rid": rows[i]["id"]} for i in order])

    def gsm8k_reward(prompts, completions, reference_answer, rid, **_):
        """The same Lambda handler, in-process: one event with every trajectory of the step."""
        text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        event = [make_trajectory(f"{r}-{k}", 0, p, t, ref) for k, (p, t, ref, r) in
                 enumerate(zip(prompts, text, reference_answer, rid))]
        return [float(x["aggregate_reward_score"]) for x in handler.lambda_handler(event, None)]

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    n_seq = a.prompts * a.group
    gen_kwargs = {"min_new_tokens": a.max_tokens} if a.fixed else {}
    args = GRPOConfig(
        output_dir=a.out_dir, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        per_device_train_batch_size=n_seq, gradient_accumulation_steps=1, num_generations=a.group,
        steps_per_generation=1, num_iterations=1, max_completion_length=a.max_tokens, max_steps=a.steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.001, use_bias_correction_kl=False, epsilon=0.2, loss_type="dapo", scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs=gen_kwargs, gradient_checkpointing=False, shuffle_dataset=False, report_to=[],
        logging_steps=10**6, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    rec: dict = {"gen": 0.0, "reward": 0.0, "logprobs": 0.0, "prep": 0.0, "tokens": 0.0, "prompt_len": 0.0}

    def timed(fn, key):
        def wrap(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            if key != "logprobs" or not torch.is_grad_enabled():
                rec[key] += time.perf_counter() - t
            return out
        return wrap

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            rec["tokens"] += float(out["completion_mask"].sum())
            rec["prompt_len"] = float(out["prompt_mask"].sum()) / out["prompt_mask"].shape[0]
            return out

    steps, clock = [], {}

    class StepClock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            for k in rec:
                rec[k] = 0.0
            clock["t"] = time.perf_counter()

        def on_step_end(self, *args, **kw):
            step_s = time.perf_counter() - clock["t"]
            split = {"gen": rec["gen"], "reward": rec["reward"], "logprobs": rec["logprobs"],
                     "update": step_s - rec["prep"]}
            split["other"] = step_s - sum(split.values())
            steps.append({"step_s": step_s, "tokens": rec["tokens"], "prompt_len": rec["prompt_len"], "split": split})

    tr = Timed(model=model, reward_funcs=[gsm8k_reward], args=args, train_dataset=ds, processing_class=tok,
               peft_config=peft_lora_config(LoraConfig(**LORA), "qwen3"), callbacks=[StepClock()])
    tr._generate = timed(tr._generate, "gen")
    tr._calculate_rewards = timed(tr._calculate_rewards, "reward")
    tr._get_per_token_logps_and_entropies = timed(tr._get_per_token_logps_and_entropies, "logprobs")
    tr._prepare_inputs = timed(tr._prepare_inputs, "prep")
    tr.train()
    return {"steps": steps, "peak_mb": _peak_memory_mb()}


# ----------------------------------------------------------------------------- parent
def build_inputs(work: Path, a) -> tuple[str, str, str]:
    """The model directory, the GSM8K prompts (Bedrock JSONL) and the prompt order both engines use."""
    import torch

    from grpo.gsm8k import gsm8k_to_records, read_gsm8k_file
    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer

    model_dir = work / "model"
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_random_qwen3(tok, **MODEL)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    n = a.prompts * a.steps
    rows = ([{"question": f"Tom has {i + 3} apples and buys {2 * i + 1} more. How many apples has he now?",
              "answer": f"{i + 3} + {2 * i + 1} = {3 * i + 4}\n#### {3 * i + 4}"} for i in range(n)]
            if a.quick else read_gsm8k_file(a.gsm8k)[:n])  # --quick: no shared GSM8K file needed
    records = gsm8k_to_records(rows)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Ours draws each epoch as a seeded permutation (Trainer._step_prompts, seed 0, epoch 0): TRL gets that order.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    order = work / "order.json"
    order.write_text(json.dumps(perm))
    return str(model_dir), str(data), str(order), sum(p.numel() for p in model.parameters())


def summarize(res: list[dict], warmup: int) -> dict:
    steps = [s for r in res for s in r["steps"][warmup:]]
    med = statistics.median
    return {"tok_s": med(s["tokens"] / s["step_s"] for s in steps), "step_s": med(s["step_s"] for s in steps),
            "tokens": med(s["tokens"] for s in steps), "prompt_len": med(s["prompt_len"] for s in steps),
            "peak_mb": max(r["peak_mb"] for r in res), "n": len(steps),
            "split": {k: med(s["split"][k] for s in steps) for k in ("gen", "reward", "logprobs", "update", "other")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["fixed", "variable", "both"], default="both")
    p.add_argument("--steps", type=int, default=6, help="steps per engine run, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternations of ours and TRL per mode")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="ours,trl")
    p.add_argument("--gsm8k", default=str(GSM8K))
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--order", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--fixed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="fixed mode, 2 steps (1 warm-up), 1 prompt x 2, 8 tokens, "
                   "1 thread, synthetic GSM8K-style prompts: the checks on, timings printed but no figure "
                   "(tests/test_bench_quick.py)")
    a = p.parse_args()
    if a.quick and not a.worker:
        a.mode, a.steps, a.warmup, a.rounds, a.prompts, a.group, a.max_tokens, a.threads = \
            "fixed", 2, 1, 1, 1, 2, 8, 1
    if a.worker:
        _threads(a.threads)
        res = (run_ours if a.worker == "ours" else run_trl)(a)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")
    from grpo.bench import LoadWatch, spread_line

    LoadWatch(a.threads).at_exit()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    engines = a.engines.split(",")
    modes = ["fixed", "variable"] if a.mode == "both" else [a.mode]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data, order, n_params = build_inputs(Path(tmp), a)
        print(f"model: random Qwen3, {n_params / 1e6:.1f}M parameters, fp32; {a.prompts} prompts x {a.group} samples, "
              f"{a.max_tokens} tokens; {a.threads} threads; {a.steps} steps ({a.warmup} warm-up) x {a.rounds} round(s)")
        print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}; load {os.getloadavg()[0]:.2f}")
        ratios, problems = {}, []
        for mode in modes:
            results: dict[str, list] = {e: [] for e in engines}
            for r in range(a.rounds):
                for eng in (engines if r % 2 == 0 else engines[::-1]):
                    cmd = [sys.executable, __file__, "--worker", eng, "--model-dir", model_dir, "--data", data,
                           "--order", order, "--out-dir", str(Path(tmp) / f"out-{eng}"), "--steps", str(a.steps),
                           "--prompts", str(a.prompts), "--group", str(a.group), "--max-tokens", str(a.max_tokens),
                           "--threads", str(a.threads)] + (["--fixed"] if mode == "fixed" else [])
                    t = time.perf_counter()
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if proc.returncode or line is None:
                        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                        raise SystemExit(f"{eng} worker failed (exit {proc.returncode})")
                    results[eng].append(json.loads(line[len("RESULT "):]))
                    print(f"  [{mode}] {eng} run {r + 1}: {time.perf_counter() - t:.0f} s wall; "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
            print(f"\n{mode}-length responses ({'EOS ignored' if mode == 'fixed' else 'EOS honoured'}):")
            summ = {e: summarize(results[e], a.warmup) for e in engines}
            for e, s in summ.items():
                sp = "  ".join(f"{k} {v:.2f}" for k, v in s["split"].items())
                print(f"  {e:5s} {s['tok_s']:8.1f} completion tok/s  step {s['step_s']:.2f} s  "
                      f"({s['tokens']:.0f} tokens, prompt {s['prompt_len']:.0f})  peak {s['peak_mb']:.0f} MB  "
                      f"[s] {sp}  (median of {s['n']} steps)")
            if len(engines) == 2:
                ratios[mode] = summ[engines[0]]["tok_s"] / summ[engines[1]]["tok_s"]
                per_round = [summarize([results[engines[0]][r]], a.warmup)["tok_s"]
                             / summarize([results[engines[1]][r]], a.warmup)["tok_s"] for r in range(a.rounds)]
                print("  " + spread_line(f"{engines[0]}/{engines[1]} tok/s ({mode})", per_round))
            problems += equal_work(results, mode, a)
        for mode, ratio in ratios.items():
            print(f"ratio {engines[0]}/{engines[1]} ({mode}-length): {ratio:.2f}x (median step of all rounds; the "
                  "spread of per-round ratios is above)")
    for p_ in problems:
        print(f"check failed: {p_}")
    print("checks: " + ("FAILED" if problems else "equal work in both engines: OK"))
    return 1 if problems else 0


def equal_work(results: dict, mode: str, a) -> list[str]:
    """What breaks the premise of the comparison: unequal completion tokens (fixed mode) or prompt lengths."""
    out = []
    want = a.prompts * a.group * a.max_tokens
    for eng, runs in results.items():
        for s in (s for r in runs for s in r["steps"]):
            if mode == "fixed" and s["tokens"] != want:
                out.append(f"[{mode}] {eng}: a step generated {s['tokens']:.0f} completion tokens, not {want}")
    lens = {eng: statistics.mean(s["prompt_len"] for r in runs for s in r["steps"]) for eng, runs in results.items()}
    if len(lens) == 2 and abs(max(lens.values()) - min(lens.values())) > 1e-6:
        out.append(f"[{mode}] mean prompt lengths differ: {lens}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
