"""`grpo submit CONFIG --base-url URL`: the job YAML that `grpo train` runs, created on Bedrock or our server.

The engine section stays local; local data paths are validated and uploaded (purpose fine-tune) and
replaced by their file ids. Against Bedrock a grader must be a Lambda ARN, and hyperparameters that
Bedrock does not document on its OpenAI-compatible path are warned about (docs/parity.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(p):
    from grpo.remote.client import add_connection_arguments

    p.description = ("Create a reinforcement fine-tuning job from the same YAML that `grpo train` runs: the engine "
                     "section stays local, training_file/validation_file are uploaded and replaced by file ids. "
                     "Bedrock (https://bedrock-mantle.<region>.api.aws/v1) needs a Lambda ARN as grader; our own "
                     "server (`grpo serve`) also takes a handler path under its handlers directory.")
    p.add_argument("config", type=Path, help="job YAML (as for grpo train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path, as in grpo train")
    add_connection_arguments(p)
    p.add_argument("--drop-undocumented", action="store_true",
                   help="Bedrock: leave out the hyperparameters it does not document on this path (default: send "
                        "them with a warning)")
    p.add_argument("--with-engine", action="store_true",
                   help="our own server only: send the engine section too (default: it stays local)")
    p.add_argument("--dry-run", action="store_true", help="check the data files and print the request; no upload, "
                   "no key needed")
    p.add_argument("--json", action="store_true", help="print the created job as one JSON object")


def run(args) -> int:
    from grpo.config import load_config
    from grpo.remote.client import (
        api_errors,
        as_dict,
        bedrock_region,
        build_job_request,
        make_client,
        resolve_base_url,
        resolve_file,
        submit_job,
        warn,
    )

    cfg = load_config(args.config, args.overrides)
    url = resolve_base_url(args.base_url)
    bedrock = bedrock_region(url) is not None
    req = build_job_request(cfg, bedrock=bedrock, with_engine=args.with_engine, drop_undocumented=args.drop_undocumented)
    for w in (cfg.warnings() if bedrock else []) + req.warnings:
        warn(w)
    for n in req.notes:
        print(f"note: {n}", file=sys.stderr)
    if args.dry_run:
        for what in ("training_file", "validation_file"):  # checked with Bedrock's rules, not uploaded
            resolve_file(None, getattr(req, what), what, bedrock=bedrock)
        print(json.dumps({"base_url": url, "bedrock": bedrock, **req.create_kwargs()}, indent=2))
        return 0
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    client = make_client(url, args.api_key)
    with api_errors(url):
        job = submit_job(client, req, bedrock=bedrock, say=say)
    if args.json:
        print(json.dumps(as_dict(job)))
        return 0
    print(f"created {job.id} (status {job.status}, model {job.model}) at {url}")
    conn = f" --base-url {url}"
    print(f"next: grpo status {job.id}{conn} --watch   then: grpo pull {job.id}{conn} --out runs/{job.id}")
    return 0
