"""`grpo serve [--host H] [--port P] [--state-dir DIR] [--api-key KEY] [--handlers-dir DIR] [--model NAME=PATH]`:
the local OpenAI-compatible server (files, fine-tuning jobs, models, chat completions, responses)."""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
from pathlib import Path


def add_arguments(p):
    p.description = ("Serve Bedrock RFT's OpenAI-compatible API locally: /v1/files, /v1/fine_tuning/jobs (events, "
                     "checkpoints, cancel), /v1/models, /v1/chat/completions and /v1/responses. Jobs run `grpo train` in "
                     "worker processes; all state lives under --state-dir (SQLite + files), so a restart loses nothing "
                     "and a job that was running resumes from its last checkpoint.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--state-dir", type=Path, default=Path(".grpo-server"),
                   help="where files, jobs, runs and the SQLite database live (default .grpo-server)")
    p.add_argument("--api-key", default=None, help="the bearer key clients must send (default: $GRPO_API_KEY, "
                   "else a random key printed once at start)")
    p.add_argument("--handlers-dir", type=Path, default=Path("rewards"),
                   help="local reward handlers a job may name must lie under this directory (default rewards/)")
    p.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=PATH",
                   help="a base model to serve under NAME (a local directory, hub id, .gguf file or grpo:smollm2-135m-instruct); "
                   "repeatable")
    p.add_argument("--max-jobs", type=int, default=1, help="jobs trained at once; the rest wait queued (default 1)")
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest file upload, in MiB (default 512)")
    p.add_argument("--max-loaded-models", type=int, default=2, help="models kept loaded for inference (LRU, default 2)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="tokens generated when a request sets no max_tokens / max_output_tokens (default 1024)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning; info logs every request)")


def _models(items: list[str]) -> dict[str, str]:
    from grpo.errors import UserError

    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--model {item!r}: expected NAME=PATH, e.g. --model tiny=./models/tiny")
        out[name.strip()] = path.strip()
    return out


def run(args) -> int:
    from grpo.errors import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1-65535")
    if args.max_jobs < 1:
        raise UserError(f"--max-jobs {args.max_jobs}: expected at least 1")
    if not args.handlers_dir.is_dir():
        raise UserError(f"--handlers-dir {args.handlers_dir}: no such directory (local graders must lie under it)")
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"grpo serve needs the server extras ({e.name} is missing): pip install 'grpo[server]'") from None
    from grpo.api.app import ServerConfig, create_app

    key = args.api_key or os.environ.get("GRPO_API_KEY")
    generated = not key
    key = key or "grpo-" + secrets.token_urlsafe(24)
    cfg = ServerConfig(state_dir=args.state_dir.resolve(), api_key=key, handlers_dir=args.handlers_dir,
                       base_models=_models(args.models), max_jobs=args.max_jobs,
                       max_upload_bytes=int(args.max_upload_mb * 2**20), max_loaded_models=args.max_loaded_models,
                       default_max_tokens=args.default_max_tokens)
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            print(f"warning: --host {args.host} accepts connections from other machines; anyone with the key "
                  "can upload data and run jobs", file=sys.stderr)
    except ValueError:
        pass  # a host name: uvicorn resolves it
    app = create_app(cfg)
    print(f"grpo serve: http://{args.host}:{args.port}/v1  state: {args.state_dir.resolve()}  "
          f"handlers: {args.handlers_dir.resolve()}", flush=True)
    if generated:
        print(f"API key (generated for this run; set --api-key or GRPO_API_KEY to choose one): {key}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
