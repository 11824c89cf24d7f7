"""The dry-run memory model (grpo.training.dry_run.estimate_memory) against what a CPU run really allocates.

For each case (the embedded tiny model; SmolLM2-135M-Instruct when it is cached), fp32 on CPU, small batches:

1. the estimate, from the same job config `grpo train --dry-run` reads;
2. a probe in a subprocess that runs the trainer's own pieces one at a time and measures each part's memory
   as the growth of the process's resident set (peak via VmHWM, reset through /proc/self/clear_refs before
   each phase): the base weights, the LoRA adapter with its gradients and AdamW states, one `generate` call
   (KV cache and decode temporaries), one micro-batch's forward + backward through `forward_logprobs`
   (activations and the log-prob chunk);
3. a real `grpo train` (two steps, responses forced to full length with engine.ignore_eos) in a subprocess that
   wraps the trainer's `load_policy`: the RSS once the model and the adapter are loaded (pages touched), then
   the peak RSS after that (VmHWM reset there), both in that one process: what training adds on top of the
   loaded model, against the estimate's peak - weights - the fp32 LoRA weights. (Subtracting the probe's RSS
   from the run's peak, two processes with different histories, was off by 145 MiB; it is printed beside.)

RSS and not torch's allocator: torch has no CPU peak counter. glibc keeps freed blocks unless they were
mmapped, so the probe and the run are started with MALLOC_MMAP_THRESHOLD_=65536: every tensor larger than
64 KiB is its own mapping, returned to the system when freed, and the resident set follows the live tensors.

    python scripts/bench_memory.py --cases tiny,smollm2   # ~12 min on a shared, busy 2-core machine
    python scripts/bench_memory.py                        # also SmolLM2 with gradient checkpointing (~25 min)
    python scripts/bench_memory.py --cases tiny           # the tiny model only (~1 min)
    python scripts/bench_memory.py --quick                # a random tiny model, tiny shapes: the suite's check, no figure

Checked every case (exit 1 otherwise): the estimate's tensor-byte terms (the weights; LoRA weights, gradients and
AdamW states) equal the bytes of the tensors the probe holds, to 1%.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
PROMPT = "What is 3 + 4? Answer with just the number. "


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _status("VmRSS")


def smollm2_dir() -> str | None:
    dirs = sorted(glob.glob(os.path.expanduser("~/.cache/grpo/gguf-smollm2-135m-instruct*")))
    return next((d for d in dirs if Path(d, "model.safetensors").is_file()), None)


#: name -> (engine.model, overrides); every case is fp32 on CPU, full-length responses, and `grpo train` runs two
#: steps: the second is the steady state the estimate describes (AdamW's state exists while generating)
CASES = {
    "tiny": ("grpo:tiny-arith", dict(batch=4, G=8, new=48, micro=32, gc=False, repeat=3)),
    "smollm2": ("SMOLLM2", dict(batch=2, G=8, new=24, micro=16, gc=False, repeat=2)),
    "smollm2-gc": ("SMOLLM2", dict(batch=2, G=8, new=24, micro=16, gc=True, repeat=2)),
    # --quick: a random model of the tiny one's architecture (no pretraining, no cache), tiny shapes
    "quick": ("RANDOM", dict(batch=1, G=2, new=4, micro=2, gc=False, repeat=1)),
}
TRAIN_STEPS = 2


def random_model(path: Path) -> str:
    """The embedded tiny model's architecture and tokenizer with random weights, saved to `path`."""
    import torch

    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    build_random_qwen3(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_job(workdir: Path, model: str, o: dict) -> Path:
    """A two-step job whose prompts are all the same length, with max_prompt_length set to exactly it."""
    from grpo.models.loading import load_tokenizer, resolve_model_path
    from grpo.rollout.prompts import encode_prompt

    messages = [{"role": "user", "content": PROMPT * o["repeat"]}]
    tok = load_tokenizer(resolve_model_path(model, progress=False))
    plen = len(encode_prompt(tok, messages, reasoning_effort="low"))
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "messages": messages, "reference_answer": "#### 7"}) + "\n"
                            for i in range(o["batch"] * TRAIN_STEPS)))
    job = {
        "model": "qwen.qwen3-32b", "training_file": str(data),
        "method": {"type": "reinforcement", "reinforcement": {
            "grader": {"type": "lambda", "lambda": {"function": "arn:aws:lambda:us-west-2:123456789012:function:r"}},
            "hyperparameters": {"n_epochs": 1, "batch_size": o["batch"], "training_sample_per_prompt": o["G"],
                                "max_prompt_length": plen, "inference_max_tokens": o["new"],
                                "learning_rate_multiplier": 1.0, "reasoning_effort": "low"}}},
        "engine": {"model": model, "handler": str(ROOT / "rewards" / "gsm8k.py"), "dtype": "float32",
                   "ignore_eos": True, "micro_batch_size": o["micro"], "gradient_checkpointing": o["gc"],
                   "checkpoint_interval": 1000, "lora": {"rank": 32, "alpha": 64}},
    }
    path = workdir / "job.yaml"
    import yaml

    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def estimate(cfg_path: Path) -> dict:
    from grpo.config import load_config
    from grpo.training.dry_run import estimate_memory, inspect_model, model_config, setup_for

    job = load_config(cfg_path)
    info = inspect_model(model_config(job.local_model)[0], job.engine.lora)
    est = estimate_memory(info, job, setup_for(job, info))
    info.shares_prefix = False  # the plain update path (every row's prompt run), as the probe's second pass
    plain = estimate_memory(info, job, setup_for(job, info))
    est["update_no_prefix_sharing"] = plain["update"]
    return est


def probe(cfg_path: Path) -> dict:
    """Each part's memory, measured one phase at a time with the trainer's own functions (run in a subprocess)."""
    import torch

    from grpo.config import load_config
    from grpo.models.forward import forward_logprobs
    from grpo.models.loading import add_lora, load_base_model, load_tokenizer, resolve_model_path
    from grpo.rollout.generate import generate
    from grpo.rollout.prompts import encode_prompt
    from grpo.data import load_records

    torch.manual_seed(0)
    job = load_config(cfg_path)
    e, h = job.engine, job.hyperparameters
    path = resolve_model_path(job.local_model, progress=False)
    tok = load_tokenizer(path)
    prompts = [encode_prompt(tok, r.messages, reasoning_effort="low")
               for r in load_records(job.training_file, allow_small=True)[:h.batch_size]]  # one step's prompts
    out = {}
    # warm-up: the first load, LoRA wrap, optimizer step, generate and backward import code and fill caches
    # (hundreds of MiB of RSS on the first call, none of it tensors); measured are the second ones
    _warm_up(path, tok, prompts[0], e)
    r0 = _reset_peak()
    model = load_base_model(path, torch.float32, gradient_checkpointing=e.gradient_checkpointing)
    with torch.no_grad():  # fp32 safetensors load as views of the mmapped file: page them in before measuring
        for t in list(model.parameters()) + list(model.buffers()):
            t.sum()
    r1 = _status("VmRSS")
    out["weights_rss"] = r1 - r0
    out["weights"] = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
    policy = add_lora(model, e.lora)
    if e.gradient_checkpointing:
        policy.enable_input_require_grads()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's m and v exist from the first step on; the gradients stay allocated (zeros) below
    out["adapter_rss"] = _status("VmRSS") - r1  # undercounts: tensors under 64 KiB reuse the warm-up's freed heap
    out["adapter"] = _tensor_bytes(params + [p.grad for p in params]
                                   + [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)])
    out["loaded_rss"] = _status("VmRSS")

    before = _reset_peak()
    t = time.perf_counter()
    rollout = generate(policy, tok, prompts, n=h.training_sample_per_prompt, max_new_tokens=h.inference_max_tokens,
                       temperature=1.0, ignore_eos=True)
    out["generation"] = _status("VmHWM") - before
    out["generation_s"] = time.perf_counter() - t
    packed = rollout.pack(tok.pad_token_id if tok.pad_token_id is not None else 0).packed
    micro = packed.select(torch.arange(min(e.micro_batch_size, len(packed))))
    out["update_tokens"] = int(micro.attention_mask.sum())
    policy.train()
    for share in (True, False):
        before = _reset_peak()
        t = time.perf_counter()
        logp, ent = forward_logprobs(policy, micro, 1.0, with_entropy=True, share_prefix=share)
        (logp.sum() + ent.sum()).backward()
        del logp, ent
        key = "update" if share else "update_no_prefix_sharing"
        out[key] = _status("VmHWM") - before
        out[key + "_s"] = time.perf_counter() - t
    return out


def _warm_up(path, tok, prompt, e) -> None:
    import gc

    import torch

    from grpo.batch import pack
    from grpo.models.forward import forward_logprobs
    from grpo.models.loading import add_lora, load_base_model
    from grpo.rollout.generate import generate

    policy = add_lora(load_base_model(path, torch.float32, gradient_checkpointing=e.gradient_checkpointing), e.lora)
    if e.gradient_checkpointing:
        policy.enable_input_require_grads()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    roll = generate(policy, tok, [prompt], n=2, max_new_tokens=2, temperature=1.0, ignore_eos=True)
    policy.train()
    for share in (True, False):
        logp, ent = forward_logprobs(policy, pack(roll.prompt_ids, roll.response_ids, 0), 1.0, with_entropy=True,
                                     share_prefix=share)
        (logp.sum() + ent.sum()).backward()
    del policy, params, opt, roll, logp, ent
    gc.collect()


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _child_env() -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2",
               TOKENIZERS_PARALLELISM="false")
    return env


def train_probe(cfg_path: Path, outdir: Path) -> dict:
    """A real `grpo train` in this process (grpo.cli.main), with `load_policy` wrapped so that, once the trainer has
    loaded the model and the adapter, their pages are touched (fp32 safetensors are mmapped views, as in the
    probe), the RSS is read and VmHWM is reset: peak - that RSS is what training adds, within one process."""
    import torch

    from grpo.models import loading
    from grpo.cli import main as cli_main

    seen = {}
    load_policy = loading.load_policy

    def measured_load_policy(*args, **kwargs):
        policy = load_policy(*args, **kwargs)
        with torch.no_grad():
            for t in list(policy.parameters()) + list(policy.buffers()):
                t.sum()
        seen["loaded_rss"] = _reset_peak()
        return policy

    from grpo.training.trainer import Trainer

    step = Trainer.step
    steps = []

    def measured_step(self, n):  # each step: RSS at its start (VmHWM reset there) and its peak
        start = _status("VmRSS")
        peak_so_far = _status("VmHWM")
        _reset_peak()
        try:
            return step(self, n)
        finally:
            steps.append((start, _status("VmHWM")))
            seen["peak"] = max(seen.get("peak", 0), peak_so_far, steps[-1][1])

    loading.load_policy = measured_load_policy  # the trainer imports it from the module when it builds the policy
    Trainer.step = measured_step
    rc = cli_main(["train", str(cfg_path), "--output-dir", str(outdir), "--no-progress"])
    return {"rc": rc, "loaded_rss": seen["loaded_rss"], "peak": max(seen["peak"], _status("VmHWM")), "steps": steps}


def run_train(cfg_path: Path, workdir: Path) -> tuple[dict, int, float]:
    """`grpo train` in a subprocess (train_probe): its own RSS after loading and its peak after that; also the
    peak RSS of the whole process (wait4's ru_maxrss), and the wall time."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--train-probe", str(cfg_path), str(workdir / "run")],
                            env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    outp = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = json.loads(outp.decode().strip().splitlines()[-1]) if not proc.returncode else {}
    if proc.returncode or res.get("rc"):
        sys.exit(f"grpo train failed ({proc.returncode}):\n{outp.decode()[-3000:]}")
    return res, usage.ru_maxrss * 1024, time.perf_counter() - t


def run_case(name: str) -> list[tuple]:
    model, o = CASES[name]
    if model == "SMOLLM2":
        model = smollm2_dir()
        if model is None:
            print(f"{name}: SmolLM2 is not cached (~/.cache/grpo/gguf-smollm2-135m-instruct*): skipped")
            return []
    workdir = Path(tempfile.mkdtemp(prefix=f"bench_memory_{name}_"))
    if model == "RANDOM":
        model = random_model(workdir / "model")
    cfg = write_job(workdir, model, o)
    est = estimate(cfg)
    res = subprocess.run([sys.executable, __file__, "--probe", str(cfg)], env=_child_env(), capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"probe failed:\n{res.stderr[-3000:]}")
    m = json.loads(res.stdout.strip().splitlines()[-1])
    tr, train_peak, train_s = run_train(cfg, workdir)
    added = tr["peak"] - tr["loaded_rss"]
    est_added = est["peak"] - est["weights"] - est["adapter"] / 4  # the fp32 LoRA weights (4 of 16 B) are loaded
    start, peak = tr["steps"][-1]  # the last step: weights, LoRA and AdamW's m and v held at its start; grads freed
    step_added, est_step = peak - start, est["peak"] - est["weights"] - est["adapter"] * 12 / 16
    update_est = est["update"]
    print(f"\n{name}: {model}, fp32, batch {o['batch']} x G {o['G']}, max_prompt_length = prompt length, "
          f"{o['new']} new tokens, micro-batch {o['micro']} ({m['update_tokens']} tokens), "
          f"gradient checkpointing {'on' if o['gc'] else 'off'}; config {cfg}")
    rows = [("weights (tensor bytes)", est["weights"], m["weights"]),
            ("  RSS after loading them", est["weights"], m["weights_rss"]),
            ("LoRA fp32 + grads + AdamW (tensor bytes)", est["adapter"], m["adapter"]),
            ("generation (KV cache, merged LoRA, decode)", est["kv_cache"] + est.get("merged_lora", 0.0), m["generation"]),
            ("update micro-batch (activations + log-prob chunk)", update_est, m["update"]),
            ("  the same without prefix sharing", est["update_no_prefix_sharing"], m["update_no_prefix_sharing"]),
            (f"grpo train, step {TRAIN_STEPS}: its peak RSS - RSS at its start", est_step, step_added),
            ("grpo train: peak RSS - RSS after load_policy", est_added, added)]
    print(f"  {'part':<52}{'estimate MiB':>14}{'measured MiB':>14}{'est/meas':>10}")
    for label, e_, m_ in rows:
        ratio = e_ / m_ if m_ > 0 else float("nan")
        flag = "  <-- off by > 20%" if abs(ratio - 1) > 0.2 else ""
        print(f"  {label:<52}{e_ / MIB:>14.1f}{m_ / MIB:>14.1f}{ratio:>10.2f}{flag}")
    print(f"  (grpo train: each step's peak - its start RSS, MiB: {', '.join(f'{(p - s) / MIB:.0f}' for s, p in tr['steps'])}; "
          f"peak RSS {train_peak / MIB:.0f} MiB in {train_s:.0f} s, RSS after load_policy "
          f"{tr['loaded_rss'] / MIB:.0f} MiB; the probe's RSS with model, adapter and AdamW {m['loaded_rss'] / MIB:.0f} MiB, "
          f"so across the two processes {(train_peak - m['loaded_rss']) / MIB:.0f} MiB against "
          f"{(est['peak'] - est['weights']) / MIB:.0f}; generate {m['generation_s']:.1f} s, update {m['update_s']:.1f} s)")
    for label, e_, m_ in rows[:1] + rows[2:3]:  # tensor bytes: the estimate's exact terms
        if abs(e_ - m_) > 0.01 * m_:
            PROBLEMS.append(f"{name}: {label}: estimate {e_ / MIB:.2f} MiB, measured {m_ / MIB:.2f} MiB")
    return [(name,) + r for r in rows]


PROBLEMS: list[str] = []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="tiny,smollm2,smollm2-gc", help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--train-probe", nargs=2, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="the case 'quick' only (a random model of the tiny one's "
                    "architecture, 1 prompt x 2, 4 tokens): the checks on, the figures printed but not measurements (tests/test_bench_quick.py)")
    a = ap.parse_args()
    if a.quick:
        a.cases = "quick"
    sys.path.insert(0, str(ROOT))
    if a.probe:
        print(json.dumps(probe(a.probe)))
        return 0
    if a.train_probe:
        print(json.dumps(train_probe(*a.train_probe)))
        return 0
    for name in a.cases.split(","):
        run_case(name.strip())
    for p in PROBLEMS:
        print(f"check failed: {p}")
    print("checks: " + ("FAILED" if PROBLEMS else "the estimate's tensor bytes equal the probe's: OK"))
    return 1 if PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main())
