"""A local reward handler's environment, explicit: what its worker process gets, and nothing else.

Lambda gives a function its configured variables, its own runtime variables and its role's credentials;
locally the worker gets `BASE_ENV` from the process that starts it (PATH, HOME, locale, TMPDIR, proxies and CA
bundles, thread counts, `AWS_REGION`), Lambda's runtime variables (`AWS_LAMBDA_FUNCTION_NAME`...), and what is
configured: variables set (`engine.reward.env`, `--env KEY=VALUE`, `grpo serve --handler-env NAME=VALUE`) or
passed by name from the starting process (`engine.reward.pass_env`, `--env KEY`, `--handler-env NAME`).
Never the server's `GRPO_API_KEY` or `GRPO_SERVER_PID`, nor AWS credentials unless named.

A judge handler calling Bedrock needs, as on Lambda, credentials and a region: name `AWS_PROFILE` (the
~/.aws files then stay readable), or `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), or
a Bedrock API key `AWS_BEARER_TOKEN_BEDROCK`; `AWS_REGION` is in the base. Until any AWS variable is named,
`AWS_CONFIG_FILE` and `AWS_SHARED_CREDENTIALS_FILE` point at an empty file and the EC2 metadata lookup is off,
so boto3 in a handler finds no credentials by accident. This module imports only the standard library.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "SHELL", "TERM",
            "VIRTUAL_ENV", "PYTHONPATH", "SYSTEMROOT", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR",
            "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
            "https_proxy", "no_proxy", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONHASHSEED", "CUDA_VISIBLE_DEVICES",
            "AWS_REGION", "AWS_DEFAULT_REGION")
BASE_PREFIXES = ("LC_",)
# Where boto3 would otherwise find credentials by itself (~/.aws files, the EC2 instance role): closed unless
# the configuration names an AWS variable, as a judge handler calling Bedrock needs (AWS_PROFILE, or
# AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY + AWS_SESSION_TOKEN, or AWS_BEARER_TOKEN_BEDROCK).
NO_AMBIENT_AWS = {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                  "AWS_EC2_METADATA_DISABLED": "true"}


def parse_env_options(items: list[str], flag: str = "--env") -> tuple[dict[str, str], list[str]]:
    """`KEY=VALUE` (set) and `KEY` (passed from this process's environment) options: (env, pass_env).
    Raises ValueError naming a malformed one."""
    env, names = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not key.isidentifier():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE or KEY")
        if sep:
            env[key] = value
        else:
            names.append(key)
    return env, names


def handler_env(handler: Path, env: dict[str, str] | None = None, pass_env: list[str] | tuple = (),
                source: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a local handler's worker: BASE_ENV from `source` (default os.environ), Lambda's own
    variables (AWS_LAMBDA_FUNCTION_NAME ...), the names in `pass_env` with their values in `source`, then `env`."""
    source = os.environ if source is None else source
    out = {k: v for k, v in source.items() if k in BASE_ENV or k.startswith(BASE_PREFIXES)}
    root = str(Path(__file__).resolve().parent.parent.parent)  # so `-m grpo.reward.workers` imports
    out["PYTHONPATH"] = root + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    name = handler.stem
    out.update(AWS_LAMBDA_FUNCTION_NAME=name, AWS_LAMBDA_FUNCTION_VERSION="$LATEST",
               AWS_LAMBDA_FUNCTION_MEMORY_SIZE="512", AWS_LAMBDA_LOG_GROUP_NAME=f"/aws/lambda/{name}")
    configured = {k: source[k] for k in pass_env if k in source}
    configured.update(env or {})
    if not any(k.startswith("AWS_") and k not in ("AWS_REGION", "AWS_DEFAULT_REGION") for k in [*pass_env, *configured]):
        out.update(NO_AMBIENT_AWS)
    out.update(configured)
    return out
