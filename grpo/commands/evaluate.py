"""`grpo eval`: the baseline reward before training, and the held-out score after it.

Locally it loads the model (and adapter); with --base-url it samples through an OpenAI-compatible endpoint
instead (a Bedrock fine-tuned model, or `grpo serve`), graded by the same handler, so one held-out set
scores a Bedrock model and a local adapter side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path


def _number(parse, ok, expected: str, bound: str):
    """An argparse type: `parse(text)` (int or float) for which `ok(value)` holds; else "expected <expected>"
    (not a number) or "must be <bound>"."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return convert


_count = _number(int, lambda v: v >= 1, "an integer >= 1", ">= 1")
_non_negative = _number(float, lambda v: math.isfinite(v) and v >= 0, "a number", "a finite number >= 0")
_finite = _number(float, math.isfinite, "a number", "a finite number")
_top_p = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]", "in (0, 1]")


def add_arguments(p):
    p.description = ("Sample responses from a model (optionally with a trained LoRA adapter) for every record of a "
                     "data file and grade them with a Lambda-contract handler. Before training this is AWS's "
                     "baseline check: reward 0 means SFT first, above 0.95 means RFT is unnecessary.")
    p.add_argument("--model", required=True, help="local path, hub id, Bedrock id, .gguf file, grpo:tiny-arith or grpo:smollm2-135m-instruct; with "
                   "--base-url, the endpoint's model id (e.g. a job's fine_tuned_model)")
    p.add_argument("--adapter", default=None, help="a peft adapter directory (a run's checkpoints/step-N/adapter)")
    p.add_argument("--data", required=True, type=Path, help="Bedrock RFT JSONL")
    p.add_argument("--handler", required=True, help="reward handler: file.py, file.py:function, or a Lambda ARN")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="environment variable for a local handler: KEY=VALUE, or KEY to pass this shell's value; "
                   "repeatable (the handler gets only these, its Lambda variables and a base: PATH, HOME, locale)")
    p.add_argument("--temperature", type=_non_negative, default=0.6,
                   help="sampling temperature (AWS advises ~0.6); > 0 locally, 0 allowed with --base-url")
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling, in (0, 1] (1.0)")
    p.add_argument("--samples", type=_count, default=1, help="responses per prompt; with G >= 2 (your job's "
                   "training_sample_per_prompt) a learnability report: each prompt's pass rate, the share of prompts "
                   "whose G rewards all tie (no GRPO gradient: too hard or solved), a pass-rate histogram and the "
                   "expected share of each step's samples that carry an advantage")
    p.add_argument("--pass-score", type=_finite, default=1.0, metavar="X",
                   help="a sample passes when its score >= X (1.0, the top of AWS's 0..1 scale); for the pass rates")
    p.add_argument("--max-tokens", type=_count, default=1024, help="max tokens per response")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default=None,
                   help="default: low locally; with --base-url only sent when given")
    p.add_argument("--limit", type=_count, default=None, help="only the first N records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights' dtype (auto: bf16 on a GPU, fp32 on CPU); the model runs on the GPU when there is one")
    p.add_argument("--backend", choices=("transformers", "continuous"), default="transformers",
                   help="how responses are sampled (engine.rollout.backend): transformers generation, or "
                        "transformers' continuous batching (paged KV cache; faster on GPUs, slower on CPU)")
    p.add_argument("--out", type=Path, default=None, help="write every sample, its score and its length in tokens "
                   "(response_tokens) as JSONL (checked before the model loads, written after the result is "
                   "printed); `grpo data filter --scores` reads it, and `grpo train --dry-run --lengths` for the time plan")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    from grpo.commands.progress import add_progress_argument

    add_progress_argument(p)
    g = p.add_argument_group("through an OpenAI-compatible endpoint (Bedrock, or grpo serve)")
    g.add_argument("--base-url", default=None, help="sample with chat.completions at this endpoint instead of "
                   "loading the model (e.g. https://bedrock-mantle.us-west-2.api.aws/v1)")
    g.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY; for Bedrock $AWS_BEARER_TOKEN_BEDROCK, "
                   "else a short-term key from the AWS credentials")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")


def _remote(args, records, runner, bars):
    from grpo.errors import UserError
    from grpo.remote.client import api_errors, make_client, resolve_base_url
    from grpo.remote.evaluate import sample_and_score_remote

    if args.adapter:
        raise UserError("--adapter is for a local model; with --base-url give the endpoint's model id "
                        "(a checkpoint's fine_tuned_model_checkpoint, or the job's fine_tuned_model)")
    if args.concurrency < 1:
        raise UserError(f"--concurrency {args.concurrency}: must be >= 1")
    url = resolve_base_url(args.base_url)
    client = make_client(url, args.api_key, max_retries=4)
    bars.start()
    with api_errors(url):
        return sample_and_score_remote(client, args.model, records, runner, temperature=args.temperature,
                                       top_p=args.top_p, n=args.samples, max_tokens=args.max_tokens,
                                       reasoning_effort=args.reasoning_effort, seed=args.seed,
                                       concurrency=args.concurrency, keep_samples=args.out is not None,
                                       progress=bars.sampled, score_progress=bars.graded)


def _local(args, records, runner, bars):
    import torch

    from grpo.config import local_model_id
    from grpo.models.loading import load_for_inference, load_tokenizer, pick_dtype, resolve_model_path
    from grpo.rollout.samplers import ContinuousSampler
    from grpo.training.validation import sample_and_score

    torch.manual_seed(args.seed)
    path = resolve_model_path(local_model_id(args.model))
    tok = load_tokenizer(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_for_inference(path, args.adapter, dtype=pick_dtype(args.dtype, device)).to(device)
    sampler = ContinuousSampler(model, tok) if args.backend == "continuous" else None
    bars.start()
    return sample_and_score(model, tok, records, runner, temperature=args.temperature, top_p=args.top_p,
                            n=args.samples, max_new_tokens=args.max_tokens, sampler=sampler,
                            reasoning_effort=args.reasoning_effort or "low", keep_samples=args.out is not None,
                            progress=bars.sampled, score_progress=bars.graded)


class _Bars:
    """Two bars on stderr: prompts sampled (the long part: its ETA is the evaluation's), then samples graded."""

    def __init__(self, n_records: int, n_samples: int, off: bool):
        self.n_records, self.n_samples, self.off = n_records, n_samples, off
        self.sampling = self.grading = None

    def start(self) -> None:
        """Once the model is loaded: the bar's rate and ETA count sampling only."""
        from grpo.commands.progress import progress_bar

        self.sampling = progress_bar(self.n_records, "sampling", "prompt", off=self.off)

    def sampled(self, k: int) -> None:
        self.sampling.update(k)

    def graded(self, k: int) -> None:
        if self.grading is None:
            from grpo.commands.progress import progress_bar

            if self.sampling is not None:
                self.sampling.close()
            self.grading = progress_bar(self.n_samples, "grading", "sample", off=self.off)
        self.grading.update(k)

    def close(self) -> None:
        for bar in (self.sampling, self.grading):
            if bar is not None:
                bar.close()


def _check_out(path: Path) -> None:
    """Fail before any sampling when --out cannot be written (a directory, a folder that cannot be made
    or written in), so that a long evaluation's samples are not lost at the end."""
    from grpo.errors import UserError

    if path.is_dir():
        raise UserError(f"--out {path}: is a directory; give a file name")
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir():
        raise UserError(f"--out {path}: {folder} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass  # grpo.data.write_jsonl writes a temp file there and renames it
    except OSError as exc:
        raise UserError(f"--out {path}: cannot write there: {exc.strerror or exc}") from None


def run(args) -> int:
    from grpo.config import BEDROCK_MODEL_IDS
    from grpo.data import load_records, write_jsonl
    from grpo.errors import UserError
    from grpo.reward.runner import RewardRunner
    from grpo.training.health import HealthMonitor

    if not args.base_url and args.temperature == 0:
        raise UserError("--temperature 0: local sampling draws from softmax(logits / temperature) and needs "
                        "a temperature > 0 (e.g. 0.01 for nearly greedy)")
    if args.out is not None:
        _check_out(args.out)
    records = load_records(args.data, allow_small=True)[: args.limit]
    from grpo.reward.environment import parse_env_options

    try:
        env, pass_env = parse_env_options(args.env)
    except ValueError as e:
        raise UserError(str(e)) from None
    bars = _Bars(len(records), len(records) * args.samples, args.no_progress)
    try:
        with RewardRunner(args.handler, on_failure="skip", env=env or None, pass_env=pass_env) as runner:
            res = (_remote if args.base_url else _local)(args, records, runner, bars)
    finally:
        bars.close()
    out = {"model": args.model, "adapter": args.adapter, "records": len(records), "samples": len(res.scores),
           "reward_mean": res.mean, "failures": len(res.failures),
           "response_length_mean": sum(res.response_lengths) / max(len(res.response_lengths), 1),
           "response_length_clip_ratio": sum(res.truncated) / max(len(res.truncated), 1), **res.metrics}
    if args.base_url:
        out["base_url"] = args.base_url
    learn = None
    if args.samples >= 2:
        from grpo.training.learnability import learnability

        learn = learnability(res.ids, res.scores, group_size=args.samples, pass_score=args.pass_score)
    base_model = args.adapter is None and (not args.base_url or args.model in BEDROCK_MODEL_IDS)
    alarms = HealthMonitor().check_baseline(res.mean) if base_model else []
    advice = alarms[0].message if alarms else None
    if args.json:
        print(json.dumps({**out, "advice": advice, **({"learnability": learn} if learn else {})}))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
        if advice:
            print(f"advice: {advice}")
        if learn:
            from grpo.training.learnability import report_lines

            print("\n".join(report_lines(learn, temperature=args.temperature)))
    for f in res.failures[:5]:
        print(f"handler failure ({f.kind}) on {len(f.trajectory_ids)} trajectories: {f.message.splitlines()[0] if f.message else ''}",
              file=sys.stderr)
    if args.out is not None:
        data = str(args.data.resolve())  # `grpo data filter` finds the records again from here
        n = write_jsonl(args.out, ({**s, "data": data} for s in res.samples))
        print(f"wrote {n} samples to {args.out}", file=sys.stderr)
    return 1 if res.failures else 0
