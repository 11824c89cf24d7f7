"""`grpo pull JOB --out DIR`: a remote job's events as a run directory shaped like a local run.

DIR gets metrics.jsonl (one line per step, the metrics events' data, as a local run writes it),
events.jsonl (every event, oldest first), checkpoints.json and summary.json (the job and its status),
so `grpo plot DIR` and `grpo compare DIR LOCAL_RUN` work on it. Pulling again refreshes the files.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p):
    from grpo.remote.client import add_connection_arguments

    p.add_argument("job", help="fine-tuning job id (ftjob-...)")
    p.add_argument("--out", type=Path, default=None, help="run directory to write (default runs/<JOB>)")
    add_connection_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args) -> int:
    from grpo.remote.client import api_errors, make_client, pull_job, resolve_base_url

    url = resolve_base_url(args.base_url)
    out = args.out or Path("runs") / args.job
    client = make_client(url, args.api_key)
    with api_errors(url):
        summary = pull_job(client, args.job, out, base_url=url)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "job"} | {"out": str(out)}))
        return 0
    steps = f"{summary['steps']}/{summary['total_steps']}" if summary["total_steps"] else "0"
    print(f"{args.job}: status {summary['status']}, steps {steps}, {summary['events']} events, "
          f"{summary['checkpoints']} checkpoints -> {out}")
    if summary["fine_tuned_model"]:
        print(f"fine_tuned_model: {summary['fine_tuned_model']}")
    if summary["error"]:
        print(f"error: {json.dumps(summary['error'])}")
    print(f"next: grpo plot {out}   or: grpo compare {out} <local run>")
    return 0
