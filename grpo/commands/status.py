"""`grpo status JOB [--watch]`: a fine-tuning job's status, timestamps, model and latest step metrics."""

from __future__ import annotations

import json
import sys
import time

SHOWN = ("critic_rewards_mean", "val_score_rewards_mean", "actor_pg_loss", "actor_entropy", "actor_grad_norm",
         "critic_advantages_mean", "response_length_mean")


def add_arguments(p):
    from grpo.remote.client import add_connection_arguments

    p.add_argument("job", help="fine-tuning job id (ftjob-...)")
    add_connection_arguments(p)
    p.add_argument("--json", action="store_true", help="print {job, latest_metrics} as one JSON object")
    p.add_argument("--watch", action="store_true", help="poll until the job ends or is paused, with a progress "
                   "bar; exit 0 if it succeeded, 1 if it failed, was cancelled or is paused")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls with --watch (default 10)")


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def describe(job: dict, metrics: dict | None) -> str:
    lines = [f"job {job.get('id')}  status {job.get('status')}  model {job.get('model')}",
             f"created {_when(job.get('created_at'))}  finished {_when(job.get('finished_at'))}  "
             f"fine_tuned_model {job.get('fine_tuned_model') or '-'}"]
    if metrics:
        vals = "  ".join(f"{k} {metrics[k]:.4g}" for k in SHOWN if isinstance(metrics.get(k), (int, float)))
        lines.append(f"step {metrics.get('step')}/{metrics.get('total_steps')}: {vals}")
    else:
        lines.append("no metrics yet")
    if job.get("error"):
        lines.append(f"error: {json.dumps(job['error'])}")
    if job.get("status") == "pausing":
        lines.append("pausing: the trainer saves a checkpoint after its current step, then the job is paused")
    elif job.get("status") == "paused":
        lines.append(f"paused: continue it from its last checkpoint with client.fine_tuning.jobs.resume("
                     f"\"{job.get('id')}\") (POST /v1/fine_tuning/jobs/{job.get('id')}/resume)")
    return "\n".join(lines)


def run(args) -> int:
    from grpo.errors import UserError
    from grpo.remote.client import TERMINAL_STATUSES, api_errors, as_dict, latest_metrics, make_client, resolve_base_url

    if args.interval <= 0:
        raise UserError(f"--interval {args.interval}: must be > 0")
    url = resolve_base_url(args.base_url)
    client = make_client(url, args.api_key)

    def fetch():
        with api_errors(url):
            return as_dict(client.fine_tuning.jobs.retrieve(args.job)), latest_metrics(client, args.job)

    job, metrics = fetch()
    stops = (*TERMINAL_STATUSES, "paused")  # a paused job waits for a resume: nothing more to watch
    if args.watch and job.get("status") not in stops:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="step", file=sys.stderr, desc=args.job, disable=args.json)
        while job.get("status") not in stops:
            if metrics and metrics.get("total_steps"):
                bar.total = metrics["total_steps"]
                bar.n = metrics.get("step", 0)
                reward = metrics.get("critic_rewards_mean")
                bar.set_postfix_str(f"{job.get('status')}" + (f" reward {reward:.3f}" if isinstance(reward, (int, float)) else ""))
            else:
                bar.set_postfix_str(str(job.get("status")))
            bar.refresh()
            time.sleep(args.interval)
            job, metrics = fetch()
        bar.close()
    if args.json:
        print(json.dumps({"job": job, "latest_metrics": metrics}))
    else:
        print(describe(job, metrics))
    if args.watch:
        return 0 if job.get("status") == "succeeded" else 1
    return 0
