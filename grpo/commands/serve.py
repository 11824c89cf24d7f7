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
                     "and a job that was running resumes from its last checkpoint. A console for people (jobs, live "
                     "charts, events, checkpoints, compare) is at /console/ on the same port: sign in with the API key "
                     "(docs/console.md).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--state-dir", type=Path, default=Path(".grpo-server"),
                   help="where files, jobs, runs and the SQLite database live (default .grpo-server)")
    p.add_argument("--api-key", default=None, help="the bearer key clients must send (default: --api-key-file, "
                   "else $GRPO_API_KEY, else a random key printed once at start). On the command line the key is "
                   "visible to every local user in the process list: prefer --api-key-file or GRPO_API_KEY")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="read the bearer key from the first line of FILE")
    p.add_argument("--handlers-dir", type=Path, default=Path("rewards"),
                   help="local reward handlers a job may name must lie under this directory (default rewards/)")
    p.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=PATH",
                   help="a base model to serve under NAME (a local directory, hub id, .gguf file, grpo:tiny-arith or "
                   "grpo:smollm2-135m-instruct), for "
                   "inference and training jobs; NAME may be a Bedrock id (--model qwen.qwen3-32b=grpo:tiny-arith "
                   "trains the tiny model for jobs naming qwen.qwen3-32b). Repeatable. Jobs may name only these; "
                   "without any --model, Bedrock's ids with their open-weights checkpoints")
    p.add_argument("--lambda", dest="lambdas", action="append", default=[], metavar="ARN=FILE",
                   help="run the local handler FILE[:FUNCTION] for jobs whose grader is the Lambda ARN; repeatable")
    p.add_argument("--invoke-lambdas", action="store_true",
                   help="let jobs whose grader is an ARN (and no --lambda maps it) invoke the deployed Lambda "
                   "with this server's AWS credentials (default: such a job is refused)")
    p.add_argument("--lambda-endpoint-url", default=None, metavar="URL",
                   help="with --invoke-lambdas: the Lambda endpoint (LocalStack, an emulator); never a client's")
    p.add_argument("--handler-env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="an environment variable for every job's reward handlers: NAME=VALUE, or NAME to pass this "
                   "server's own value (e.g. AWS_PROFILE for a judge handler calling Bedrock); repeatable. "
                   "Handlers get nothing else from this server's environment but its base (PATH, HOME, locale, "
                   "AWS_REGION)")
    p.add_argument("--client-env", action="append", default=[], metavar="NAME",
                   help="a variable a client's job may set for its handlers (engine.reward.env); repeatable; none by "
                   "default. Never an endpoint (*_URL, *_HOST, *_ENDPOINT...), a credential or a name --handler-env "
                   "sets or passes; a client's value may not hold a URL")
    p.add_argument("--show-handler-errors", action="store_true",
                   help="quote a failing reward handler's own error text in a job's error and events (default: only "
                   "its kind and trajectory ids; the text goes to the job's run/reward_errors.log: a judge handler's "
                   "error can quote what its endpoint answered)")
    p.add_argument("--auth-fail-limit", type=int, default=20, metavar="N",
                   help="failed key checks (API bearer key, console sign-in) one client address may make per "
                   "--auth-fail-window before it is answered 429 with Retry-After (default 20; 0: no limit). A "
                   "correct key is never delayed")
    p.add_argument("--auth-fail-window", type=float, default=60.0, metavar="S",
                   help="the window of --auth-fail-limit, in seconds (default 60)")
    p.add_argument("--max-reward-concurrency", type=int, default=8, metavar="N",
                   help="the most reward calls in flight a job may ask for (engine.reward.concurrency; default 8)")
    p.add_argument("--max-jobs", type=int, default=1, help="jobs trained at once; the rest wait queued (default 1)")
    p.add_argument("--devices", default=None, metavar="IDS",
                   help="devices jobs are placed on: GPU ids (--devices 0,1,2,3,4,5,6,7: two 4-process jobs run side "
                   "by side, a third waits queued until one ends) handed to each job as CUDA_VISIBLE_DEVICES, or "
                   "cpu:N (N CPU slots, gloo ranks; for machines without GPUs). Default: CUDA_VISIBLE_DEVICES, else "
                   "every GPU torch sees, else one CPU slot per core. A job asks for engine.num_processes (default 1)")
    p.add_argument("--accelerate-config", type=Path, default=None, metavar="FILE",
                   help="accelerate config (accelerate config / FSDP / DeepSpeed) for jobs with several processes; "
                   "default: plain DDP (accelerate launch --multi_gpu). --num_processes is the job's own")
    p.add_argument("--max-processes-per-job", type=int, default=None, metavar="N",
                   help="the most processes (devices) one job may ask for (default: all of --devices)")
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest file upload, in MiB (default 512)")
    p.add_argument("--max-request-mb", type=float, default=16,
                   help="largest JSON request body (jobs, chat, responses), in MiB (default 16)")
    p.add_argument("--max-loaded-models", type=int, default=2, help="models kept loaded for inference (LRU, default 2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the base weights' dtype of training jobs (their engine.dtype) and of inference (auto: bf16 on "
                        "a GPU, fp32 on the CPU; bfloat16 on a CPU with AVX512-BF16 runs the numbers a GPU runs); "
                        "LoRA adapters train and are saved in fp32")
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
        _check_model(name.strip(), path.strip())
        out[name.strip()] = path.strip()
    return out


def _check_model(name: str, path: str) -> None:
    from grpo.errors import UserError

    if (Path(path).is_absolute() or path.startswith((".", "~"))) and not Path(path).expanduser().is_dir():
        raise UserError(f"--model {name}={path}: no such model directory")


def _lambdas(items: list[str]) -> dict[str, str]:
    """--lambda ARN=FILE[:FUNCTION]: the file must exist (it is the operator's, anywhere on this machine)."""
    from grpo.errors import UserError
    from grpo.reward.lambda_client import parse_arn
    from grpo.reward.runner import resolve_handler

    out = {}
    for item in items:
        arn, sep, handler = item.rpartition("=")
        if not sep or not arn.startswith("arn:") or not handler:
            raise UserError(f"--lambda {item!r}: expected ARN=FILE, e.g. --lambda "
                            "arn:aws:lambda:us-west-2:123456789012:function:gsm8k-reward=rewards/gsm8k.py")
        parse_arn(arn)
        spec = resolve_handler(handler)
        out[arn] = f"{spec.path}:{spec.function}"
    return out


def _handler_env(items: list[str]) -> tuple[dict[str, str], list[str]]:
    import re

    from grpo.errors import UserError

    values, names = {}, []
    for item in items:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"--handler-env {item!r}: expected NAME or NAME=VALUE")
        if sep:
            values[name] = value
        else:
            names.append(name)
    return values, names


def _key_file(path: Path | None) -> str | None:
    from grpo.errors import UserError

    if path is None:
        return None
    try:
        key = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    except (OSError, UnicodeDecodeError, IndexError) as e:
        raise UserError(f"--api-key-file {path}: cannot read a key from it ({getattr(e, 'strerror', None) or e})") from None
    if not key:
        raise UserError(f"--api-key-file {path}: the file's first line is empty")
    return key


def run(args) -> int:
    from grpo.errors import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1-65535")
    if args.max_jobs < 1:
        raise UserError(f"--max-jobs {args.max_jobs}: expected at least 1")
    if not args.handlers_dir.is_dir():
        raise UserError(f"--handlers-dir {args.handlers_dir}: no such directory (local graders must lie under it)")
    if args.auth_fail_limit < 0 or not args.auth_fail_window > 0:
        raise UserError("--auth-fail-limit must be >= 0 and --auth-fail-window > 0")
    if args.max_reward_concurrency < 1:
        raise UserError(f"--max-reward-concurrency {args.max_reward_concurrency}: expected at least 1")
    if args.lambda_endpoint_url and not args.invoke_lambdas:
        raise UserError("--lambda-endpoint-url is for --invoke-lambdas (jobs invoking deployed Lambdas)")
    if args.max_processes_per_job is not None and args.max_processes_per_job < 1:
        raise UserError(f"--max-processes-per-job {args.max_processes_per_job}: expected at least 1")
    if args.accelerate_config is not None and not args.accelerate_config.is_file():
        raise UserError(f"--accelerate-config {args.accelerate_config}: no such file")
    models, lambdas = _models(args.models), _lambdas(args.lambdas)
    handler_env, pass_env = _handler_env(args.handler_env)
    from grpo.api.policy import check_client_env_names

    try:
        check_client_env_names(args.client_env, [*handler_env, *pass_env])
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"grpo serve needs the server extras ({e.name} is missing): pip install 'grpo[server]'") from None
    from grpo.api.app import ServerConfig, create_app

    key = args.api_key or _key_file(args.api_key_file) or os.environ.get("GRPO_API_KEY")
    generated = not key
    key = key or "grpo-" + secrets.token_urlsafe(24)
    cfg = ServerConfig(state_dir=args.state_dir.resolve(), api_key=key, handlers_dir=args.handlers_dir,
                       base_models=models, lambdas=lambdas, invoke_lambdas=args.invoke_lambdas,
                       lambda_endpoint_url=args.lambda_endpoint_url, handler_env=handler_env,
                       handler_pass_env=pass_env, client_env=list(args.client_env),
                       show_handler_errors=args.show_handler_errors, auth_fail_limit=args.auth_fail_limit,
                       auth_fail_window_s=args.auth_fail_window, max_reward_concurrency=args.max_reward_concurrency,
                       max_jobs=args.max_jobs, devices=args.devices,
                       accelerate_config=str(args.accelerate_config.resolve()) if args.accelerate_config else None,
                       max_processes_per_job=args.max_processes_per_job,
                       max_upload_bytes=int(args.max_upload_mb * 2**20), max_json_bytes=int(args.max_request_mb * 2**20),
                       max_loaded_models=args.max_loaded_models, inference_dtype=args.dtype,
                       default_max_tokens=args.default_max_tokens)
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            print(f"warning: --host {args.host} accepts connections from other machines; anyone with the key "
                  "can upload data and run jobs", file=sys.stderr)
    except ValueError:
        pass  # a host name: uvicorn resolves it
    pool = cfg.device_pool()  # a bad --devices is a UserError before anything starts
    app = create_app(cfg)
    print(f"grpo serve: http://{args.host}:{args.port}/v1  state: {args.state_dir.resolve()}  "
          f"handlers: {args.handlers_dir.resolve()}  models: {', '.join(cfg.policy(pool).served_models())}  "
          f"devices: {pool.describe()}", flush=True)
    print(f"console: http://{args.host}:{args.port}/console/  (sign in with the API key)", flush=True)
    if generated:
        print(f"API key (generated for this run; set --api-key or GRPO_API_KEY to choose one): {key}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
