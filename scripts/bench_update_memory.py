"""The update micro-batch's memory taken apart: each piece's peak growth against its term in the dry-run estimate
(grpo.training.dry_run.estimate_memory), on SmolLM2-135M-Instruct in fp32 on CPU (the model of
scripts/bench_memory.py; the tiny model when SmolLM2 is not cached).

Pieces, each measured in a subprocess as the growth of peak RSS (VmHWM reset before it; MALLOC_MMAP_THRESHOLD_
so that freed tensors leave the resident set, as in bench_memory.py), after a warm-up of the same piece:

- head: the log-prob chunk alone (grpo.models.forward._head_chunk under non-reentrant checkpoint, entropy on,
  as the update runs it) for micro x response positions, forward and backward: estimate `logprob_chunk`;
- decoder: the model's forward + backward with no head (loss = sum of the decoder's last hidden states), plain
  (every row runs its prompt) or with prefix sharing: estimate `activations`;
- update: forward_logprobs + backward, as the update runs it: estimate `update`.

    python scripts/bench_update_memory.py          # ~10 min on a shared, busy 2-core machine
    python scripts/bench_update_memory.py --quick  # a random tiny model, one run of every piece: the suite's check

Checked (exit 1 otherwise): every piece was measured and its estimate is a positive, finite size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import CASES, MIB, ROOT, _child_env, _reset_peak, _status, random_model, smollm2_dir, write_job

#: (label, gradient checkpointing, micro-batch, LoRA rank, pieces)
RUNS = [("GC", True, 16, 32, "head,decoder,update"), ("GC, micro 8", True, 8, 32, "decoder"),
        ("no GC", False, 16, 32, "decoder,decoder-shared")]


def probe(cfg_path: Path, pieces: list[str]) -> dict:
    import torch

    from grpo.batch import pack
    from grpo.config import load_config
    from grpo.data import load_records
    from grpo.models.forward import _head_chunk, _head_parts, _run_decoder, _shared_prefix_hidden, forward_logprobs
    from grpo.models.loading import load_policy, load_tokenizer, resolve_model_path
    from grpo.rollout.prompts import encode_prompt

    torch.manual_seed(0)
    job = load_config(cfg_path)
    e, h = job.engine, job.hyperparameters
    path = resolve_model_path(job.local_model, progress=False)
    tok = load_tokenizer(path)
    prompts = [encode_prompt(tok, r.messages, reasoning_effort="low")
               for r in load_records(job.training_file, allow_small=True)[:h.batch_size]]
    micro = e.micro_batch_size
    rows = [prompts[i * len(prompts) // micro] for i in range(micro)]  # groups of G rows share a prompt
    lo, hi = min(100, len(tok) // 2), min(1000, len(tok))  # 100-1000 as before; inside a small vocabulary too
    responses = torch.randint(lo, hi, (micro, h.inference_max_tokens)).tolist()
    batch = pack(rows, responses, 0)
    policy = load_policy(path, e.lora, dtype=torch.float32, gradient_checkpointing=e.gradient_checkpointing)
    policy.train()
    decoder, head = _head_parts(policy)
    n = micro * h.inference_max_tokens

    def run(piece):
        if piece == "head":
            hid = torch.randn(n, head.weight.shape[1], requires_grad=True)
            labels = torch.randint(0, head.weight.shape[0], (n,))
            out = torch.utils.checkpoint.checkpoint(_head_chunk, head, hid, labels, 1.0, True, use_reentrant=False)
            (out[0].sum() + out[1].sum()).backward()
        elif piece.startswith("decoder"):
            if piece == "decoder-shared":
                hid = _shared_prefix_hidden(policy, decoder, batch, "cpu")[1]
            else:
                hid = _run_decoder(policy, decoder, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   use_cache=False)
            hid.sum().backward()
        else:
            logp, ent = forward_logprobs(policy, batch, 1.0, with_entropy=True, share_prefix=piece == "update-shared")
            (logp.sum() + ent.sum()).backward()

    out = {}
    for piece in pieces:
        run(piece)  # warm-up
        policy.zero_grad(set_to_none=False)
        before = _reset_peak()
        run(piece)
        out[piece] = _status("VmHWM") - before
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="bench_memory.py's 'quick' case (a random tiny model, 1 prompt "
                    "x 2, 4 tokens), one run of every piece: the checks on, figures printed but not measurements "
                    "(tests/test_bench_quick.py)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.probe:
        print(json.dumps(probe(Path(a.probe[0]), a.probe[1].split(","))))
        return 0
    from grpo.config import load_config
    from grpo.training.dry_run import estimate_memory, inspect_model, model_config, setup_for

    model, base = CASES["quick"] if a.quick else CASES["smollm2"] if smollm2_dir() else CASES["tiny"]
    model = smollm2_dir() if model == "SMOLLM2" else model
    if model == "RANDOM":
        model = random_model(Path(tempfile.mkdtemp(prefix="bench_update_memory_")) / "model")
    runs = [("quick", False, base["micro"], 4, "head,decoder,decoder-shared,update,update-shared")] if a.quick else RUNS
    problems = []
    print(f"{model}, fp32; {base['batch']} prompts x {base['G']}, {base['new']} response tokens; MiB")
    print(f"  {'run':<14}{'piece':<16}{'estimate':>10}{'measured':>10}{'est/meas':>10}  estimate term")
    for label, gc, micro, rank, pieces in runs:
        o = dict(base, gc=gc, micro=micro)
        cfg = write_job(Path(tempfile.mkdtemp(prefix="bench_update_memory_")), model, o)
        text = cfg.read_text().replace("rank: 32", f"rank: {rank}")
        cfg.write_text(text)
        job = load_config(cfg)
        info = inspect_model(model_config(job.local_model)[0], job.engine.lora)
        est = estimate_memory(info, job, setup_for(job, info))
        info.shares_prefix = False
        plain = estimate_memory(info, job, setup_for(job, info))
        res = subprocess.run([sys.executable, __file__, "--probe", str(cfg), pieces], env=_child_env(), check=False,
                             capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"probe failed:\n{res.stderr[-3000:]}")
        m = json.loads(res.stdout.strip().splitlines()[-1])
        terms = {"head": (est["logprob_chunk"], "logprob_chunk (5 fp32 [P, V])"),
                 "decoder": (plain["activations"], "activations" + (" (checkpoints + one layer)" if gc else "")),
                 "decoder-shared": (est["activations"], "activations, prompt once"),
                 "update": (plain["update"], "update" + (" (checkpoints + max(layer, chunk))" if gc else "")),
                 "update-shared": (est["update"], "update, prompt once")}
        for piece, measured in m.items():
            e_, what = terms[piece]
            ratio = e_ / measured if measured > 0 else float("nan")
            print(f"  {label:<14}{piece:<16}{e_ / MIB:>10.1f}{measured / MIB:>10.1f}{ratio:>10.2f}  {what}")
            if not (0 < e_ < float("inf")):
                problems.append(f"{label} {piece}: estimate {e_!r}")
        problems += [f"{label} {p}: not measured" for p in pieces.split(",") if p not in m]
    for p in problems:
        print(f"check failed: {p}")
    print("checks: " + ("FAILED" if problems else "every piece measured, every estimate a positive size: OK"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
