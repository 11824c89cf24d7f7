"""`grpo pause JOB`, `grpo resume JOB`, `grpo cancel JOB`: the job actions of OpenAI's fine-tuning API, from the shell.

One module for the three commands (`grpo.cli` maps each name here; `args.command` says which). Each sends
`client.fine_tuning.jobs.<action>(JOB)` to the endpoint (`grpo serve`, or any OpenAI-compatible server) and
prints the job's new status and what comes next:

- pause: a running job turns `pausing` (its trainer saves a checkpoint after the current step and stops), then
  `paused`; a queued job is `paused` at once. `--wait` polls until it is paused (or ended).
- resume: a paused job is `queued` again and continues from that checkpoint, no step lost or repeated.
- cancel: the job is `cancelled` (its trainer stopped); checkpoints saved so far stay listed.

A job in the wrong state is the server's 400 (e.g. "... is cancelled; only a queued or running job can be
paused"), printed as `error: ...` with exit 2. Bedrock documents cancel on its OpenAI-compatible path, not
pause or resume.
"""

from __future__ import annotations

import json
import sys
import time

NEXT = {
    "pausing": "it saves a checkpoint after its current step, then it is paused",
    "paused": "nothing runs until you resume it",
    "queued": "it continues from its last checkpoint when a device is free",
    "cancelled": "the checkpoints it saved stay: grpo pull JOB",
}


def add_arguments(p):
    from grpo.remote.client import add_connection_arguments

    action = p.prog.split()[-1]
    p.description = (f"{p.description}. Sends client.fine_tuning.jobs.{action}(JOB) to the endpoint (grpo serve, "
                     "or Bedrock where it has the route) and prints the job's new status.")
    p.add_argument("job", help="fine-tuning job id (ftjob-...)")
    add_connection_arguments(p)
    p.add_argument("--json", action="store_true", help="print the job object the server returned as one JSON line")
    if action == "pause":
        p.add_argument("--wait", action="store_true",
                       help="poll until the job is paused (or has ended); exit 1 if it ended instead")
        p.add_argument("--interval", type=float, default=2.0, help="seconds between polls with --wait (default 2)")


def run(args) -> int:
    from grpo.errors import UserError
    from grpo.remote.client import TERMINAL_STATUSES, api_errors, as_dict, bedrock_region, make_client, resolve_base_url

    action = args.command
    if getattr(args, "wait", False) and args.interval <= 0:
        raise UserError(f"--interval {args.interval}: must be > 0")
    url = resolve_base_url(args.base_url)
    client = make_client(url, args.api_key)
    if action != "cancel" and bedrock_region(url) is not None:
        print(f"note: Bedrock does not document {action} on its OpenAI-compatible path (create, list, retrieve, "
              "cancel); trying it", file=sys.stderr)
    with api_errors(url):
        job = as_dict(getattr(client.fine_tuning.jobs, action)(args.job))
        if action == "pause" and args.wait:
            while job.get("status") not in ("paused", *TERMINAL_STATUSES):
                time.sleep(args.interval)
                job = as_dict(client.fine_tuning.jobs.retrieve(args.job))
    status = job.get("status")
    if args.json:
        print(json.dumps(job))
    else:
        print(f"job {job.get('id', args.job)}: {status}" + (f" ({NEXT[status]})" if status in NEXT else ""))
        conn = f" --base-url {url}"
        if status in ("pausing", "paused"):
            print(f"next: grpo status {args.job}{conn}" + (" --watch" if status == "pausing" else "")
                  + f"   then: grpo resume {args.job}{conn}")
        elif status == "queued":
            print(f"next: grpo status {args.job}{conn} --watch")
    if action == "pause" and args.wait and status != "paused":
        return 1
    return 0
