"""`grpo eval`: the baseline reward before training, and the held-out score after it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "sample and grade a model (base or adapter) on a data file"


def add_arguments(p):
    p.description = ("Sample responses from a model (optionally with a trained LoRA adapter) for every record of a "
                     "data file and grade them with a Lambda-contract handler. Before training this is AWS's "
                     "baseline check: reward 0 means SFT first, above 0.95 means RFT is unnecessary.")
    p.add_argument("--model", required=True, help="local path, hub id, Bedrock id, or grpo:tiny-arith")
    p.add_argument("--adapter", default=None, help="a peft adapter directory (a run's checkpoints/step-N/adapter)")
    p.add_argument("--data", required=True, type=Path, help="Bedrock RFT JSONL")
    p.add_argument("--handler", required=True, help="reward handler: file.py, file.py:function, or a Lambda ARN")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (AWS advises ~0.6)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=1, help="responses per prompt")
    p.add_argument("--max-tokens", type=int, default=1024, help="max tokens per response")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="low")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write every sample and its score as JSONL")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args) -> int:
    import torch

    from grpo.config import BEDROCK_MODEL_IDS
    from grpo.data import load_records
    from grpo.evaluation import sample_and_score
    from grpo.health import HealthMonitor
    from grpo.models import load_for_inference, load_tokenizer, resolve_model_path
    from grpo.reward import RewardRunner

    torch.manual_seed(args.seed)
    records = load_records(args.data, allow_small=True)[: args.limit]
    path = resolve_model_path(BEDROCK_MODEL_IDS.get(args.model, args.model))
    tok = load_tokenizer(path)
    model = load_for_inference(path, args.adapter)
    with RewardRunner(args.handler, on_failure="skip") as runner:
        res = sample_and_score(model, tok, records, runner, temperature=args.temperature, top_p=args.top_p,
                               n=args.samples, max_new_tokens=args.max_tokens, reasoning_effort=args.reasoning_effort,
                               keep_samples=args.out is not None)
    out = {"model": args.model, "adapter": args.adapter, "records": len(records), "samples": len(res.scores),
           "reward_mean": res.mean, "failures": len(res.failures),
           "response_length_mean": sum(res.response_lengths) / max(len(res.response_lengths), 1),
           "response_length_clip_ratio": sum(res.truncated) / max(len(res.truncated), 1), **res.metrics}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(s) + "\n" for s in res.samples), encoding="utf-8")
    alarms = HealthMonitor().check_baseline(res.mean) if args.adapter is None else []
    advice = alarms[0].message if alarms else None
    if args.json:
        print(json.dumps({**out, "advice": advice}))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
        if advice:
            print(f"advice: {advice}")
    for f in res.failures[:5]:
        print(f"handler failure ({f.kind}) on {len(f.trajectory_ids)} trajectories: {f.message.splitlines()[0] if f.message else ''}",
              file=sys.stderr)
    return 1 if res.failures else 0
