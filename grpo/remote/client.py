"""The client side: the same job on Bedrock's OpenAI-compatible endpoint or on any other one (`grpo serve`).

`build_job_request` turns a job YAML into what `fine_tuning.jobs.create` receives (the engine section stays
local; local data paths become uploaded file ids); `submit_job` uploads and creates; `list_events`,
`list_checkpoints` and `pull_job` read a job back into a run directory shaped like a local run.

Auth: against Bedrock (https://bedrock-mantle.<region>.api.aws/v1) the key is --api-key, else
AWS_BEARER_TOKEN_BEDROCK, else a short-term key generated from the AWS credentials with
aws-bedrock-token-generator and regenerated before it expires (`RefreshingToken`: the openai SDK calls it
before every request). Against any other endpoint: --api-key, else OPENAI_API_KEY.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from grpo.errors import UserError
from grpo.rundir import RunDir

BEDROCK_HOST = re.compile(r"^bedrock-mantle\.([a-z0-9-]+)\.api\.aws$")
# The only hyperparameters Bedrock documents on its OpenAI-compatible path (spec section 4).
DOCUMENTED_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
FILE_ID = re.compile(r"^file-[A-Za-z0-9_-]+$")
DEPLOY_HINT = ("Bedrock calls a deployed Lambda, not a local file: deploy the handler as a Lambda function "
               "(python3.11; `grpo reward check` runs it locally first) and put its ARN in "
               "method.reinforcement.grader.lambda.function (keep the local file in engine.handler for local runs)")


class RemoteError(UserError):
    """The endpoint answered with an error that is not the user's input (a server failure): exit 1."""

    exit_code = 1


# -- endpoint and auth ---------------------------------------------------------------------------------
def bedrock_region(base_url: str) -> str | None:
    """The region of a Bedrock OpenAI-compatible endpoint URL, or None for any other URL."""
    m = BEDROCK_HOST.match((urlparse(base_url).hostname or "").lower())
    return m.group(1) if m else None


def resolve_base_url(base_url: str | None) -> str:
    url = base_url or os.environ.get("OPENAI_BASE_URL")
    if not url:
        raise UserError("no endpoint: give --base-url URL (e.g. https://bedrock-mantle.us-west-2.api.aws/v1, "
                        "or http://127.0.0.1:8000/v1 for `grpo serve`) or set OPENAI_BASE_URL")
    parts = urlparse(url)
    if parts.scheme not in ("http", "https"):
        raise UserError(f"--base-url {url!r}: expected an http(s) URL, e.g. https://bedrock-mantle.us-west-2.api.aws/v1")
    try:
        import httpx  # the openai SDK's HTTP client
        invalid: tuple = (ValueError, httpx.InvalidURL)
    except ImportError:
        httpx, invalid = None, (ValueError,)
    try:
        host, _ = parts.hostname, parts.port  # .port raises ValueError for a port out of range or not a number
        if httpx is not None:
            httpx.URL(url)  # what the SDK will parse (an IPv4 address with a part over 255 is refused here)
    except invalid as e:
        raise UserError(f"--base-url {url!r}: not a valid URL ({e})") from None
    if not host:
        raise UserError(f"--base-url {url!r}: no host in it, e.g. http://127.0.0.1:8000/v1")
    return url.rstrip("/")


class RefreshingToken:
    """A bearer token that is regenerated `margin_s` before its `lifetime_s` runs out.

    Callable with no argument, as the openai SDK's `api_key` provider (called before each request).
    `clock` is injectable (seconds, monotonic) so the refresh rule is testable without AWS.
    """

    def __init__(self, generate: Callable[[], str], *, lifetime_s: float = 900.0, margin_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 <= margin_s < lifetime_s:
            raise ValueError(f"margin_s ({margin_s}) must be in [0, lifetime_s={lifetime_s})")
        self.generate, self.lifetime_s, self.margin_s, self.clock = generate, lifetime_s, margin_s, clock
        self._token: str | None = None
        self._born = 0.0
        self.generated = 0  # how many tokens were made (tests and diagnostics)
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            now = self.clock()
            if self._token is None or now - self._born >= self.lifetime_s - self.margin_s:
                self._token, self._born = self.generate(), now
                self.generated += 1
            return self._token


def bedrock_token_generator(region: str, lifetime_s: float) -> Callable[[], str]:
    """A function making short-term Bedrock API keys from the AWS credentials (default chain)."""
    try:
        import aws_bedrock_token_generator as gen
    except ImportError:
        raise UserError("no Bedrock API key: give --api-key, set AWS_BEARER_TOKEN_BEDROCK, or "
                        "`pip install aws-bedrock-token-generator` to make short-term keys from your AWS "
                        "credentials") from None
    from datetime import timedelta

    def make() -> str:
        try:
            if hasattr(gen, "provide_token"):
                return gen.provide_token(region=region, expiry=timedelta(seconds=lifetime_s))
            import boto3  # older releases: BedrockTokenGenerator().get_token(credentials, region)

            return gen.BedrockTokenGenerator().get_token(boto3.Session().get_credentials(), region)
        except Exception as e:  # no credentials, expired SSO session, ...
            raise UserError(f"could not make a Bedrock API key from the AWS credentials: {e}") from None

    return make


def resolve_api_key(base_url: str, api_key: str | None, *, lifetime_s: float = 900.0) -> str | Callable[[], str]:
    if api_key:
        return api_key
    region = bedrock_region(base_url)
    if region is not None:
        if os.environ.get("AWS_BEARER_TOKEN_BEDROCK"):
            return os.environ["AWS_BEARER_TOKEN_BEDROCK"]
        return RefreshingToken(bedrock_token_generator(region, lifetime_s), lifetime_s=lifetime_s)
    if os.environ.get("OPENAI_API_KEY"):
        return os.environ["OPENAI_API_KEY"]
    raise UserError(f"no API key for {base_url}: give --api-key or set OPENAI_API_KEY")


def make_client(base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                max_retries: int = 2):
    """An openai.OpenAI client for the endpoint, with the key rules above."""
    from openai import OpenAI

    url = resolve_base_url(base_url)
    return OpenAI(base_url=url, api_key=resolve_api_key(url, api_key), timeout=timeout, max_retries=max_retries)


def add_connection_arguments(p) -> None:
    p.add_argument("--base-url", default=None, help="endpoint, e.g. https://bedrock-mantle.us-west-2.api.aws/v1 "
                   "or http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL)")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY; for Bedrock $AWS_BEARER_TOKEN_BEDROCK, "
                   "else a short-term key from the AWS credentials (aws-bedrock-token-generator)")


@contextlib.contextmanager
def api_errors(base_url: str):
    """Turn the SDK's exceptions into one-line messages: the user's fault exits 2, the server's 1."""
    import openai

    try:
        yield
    except openai.APIConnectionError as e:
        raise UserError(f"cannot reach {base_url}: {e.__cause__ or e}") from None
    except openai.APIResponseValidationError as e:
        raise UserError(f"{base_url} answered, but not with the OpenAI API's JSON ({e.message}); is it an "
                        "OpenAI-compatible endpoint ending in /v1?") from None
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        detail = body.get("message") or body.get("detail") or e.message
        detail = detail if isinstance(detail, str) else json.dumps(detail)
        cls = RemoteError if e.status_code >= 500 else UserError
        hint = " (check --api-key)" if e.status_code in (401, 403) else ""
        raise cls(f"{base_url} answered {e.status_code}: {detail}{hint}") from None


def expect_object(resp, kind: str, base_url: str, attr: str):
    """The SDK hands back a plain string when an endpoint answers 200 with something other than JSON (an HTML
    page behind a wrong --base-url): a UserError saying so, instead of an AttributeError further on."""
    if not hasattr(resp, attr):
        text = resp if isinstance(resp, str) else type(resp).__name__
        head = " ".join(str(text).split())[:120]
        raise UserError(f"{base_url} answered 200 but not with a {kind} ({head!r}...); is it an OpenAI-compatible "
                        "endpoint ending in /v1?")
    return resp


# -- the job request -----------------------------------------------------------------------------------
@dataclass
class JobRequest:
    """What `fine_tuning.jobs.create` gets; training/validation_file are local paths until uploaded."""

    model: str
    training_file: str
    validation_file: str | None
    method: dict
    seed: int | None = None
    engine: dict | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def create_kwargs(self) -> dict:
        kw: dict[str, Any] = {"model": self.model, "training_file": self.training_file,
                              "extra_body": {"method": self.method}}
        if self.validation_file:
            kw["validation_file"] = self.validation_file
        if self.seed is not None:
            kw["seed"] = self.seed
        if self.engine is not None:
            kw["extra_body"]["engine"] = self.engine
        return kw


def _is_arn(value: str) -> bool:
    return value.startswith("arn:aws:lambda:")


def build_job_request(cfg, *, bedrock: bool, with_engine: bool = False, drop_undocumented: bool = False) -> JobRequest:
    """The body for Bedrock (`bedrock=True`) or for our own server, from a validated JobConfig.

    Bedrock: the three documented hyperparameters are always sent with the values the local run uses;
    other hyperparameters the YAML sets are sent with a warning (Bedrock may ignore or reject them), or left
    out with `drop_undocumented`; ones it leaves at our defaults are not sent (Bedrock's own apply: a note).
    A grader that is not a Lambda ARN is refused. Our server gets every hyperparameter and, with
    `with_engine`, the engine section (it is local-only otherwise).
    """
    from grpo.config import BEDROCK_MODEL_IDS

    body = cfg.bedrock_body()
    h = cfg.hyperparameters
    req = JobRequest(model=cfg.model, training_file=cfg.training_file, validation_file=cfg.validation_file,
                     method=body["method"], seed=cfg.seed)
    if not bedrock:
        if with_engine:
            req.engine = cfg.engine.model_dump(mode="json", exclude_none=True)
        return req
    if with_engine:
        raise UserError("--with-engine is for our own server (`grpo serve`); Bedrock has no engine section")
    grader = cfg.grader_function
    if not _is_arn(grader):
        raise UserError(f"method.reinforcement.grader.lambda.function is a local handler ({grader}). {DEPLOY_HINT}")
    if cfg.model not in BEDROCK_MODEL_IDS:
        if "/" in cfg.model or Path(cfg.model).exists():
            raise UserError(f"model: {cfg.model!r} is a local path or hub id; Bedrock needs its own model id "
                            f"({', '.join(BEDROCK_MODEL_IDS)}); keep the local one in engine.model")
        req.warnings.append(f"model {cfg.model!r} is not one of the ids known on the OpenAI-compatible path "
                            f"({', '.join(BEDROCK_MODEL_IDS)}); sent as it is")
    req.notes.append(f"learning_rate_multiplier={h.learning_rate_multiplier} scales Bedrock's unpublished base "
                     f"learning rate there; locally it scales engine.base_learning_rate={cfg.engine.base_learning_rate:g}")
    if cfg.engine.handler:
        req.notes.append(f"engine.handler ({cfg.engine.handler}) is local-only: Bedrock calls {grader}")
    sent = {k: getattr(h, k) for k in DOCUMENTED_HYPERPARAMETERS}
    explicit = sorted(k for k in h.model_fields_set if k not in DOCUMENTED_HYPERPARAMETERS and getattr(h, k) is not None)
    undocumented = [f"{k}={getattr(h, k)}" for k in explicit] + ([f"seed={cfg.seed}"] if cfg.seed is not None else [])
    if undocumented and drop_undocumented:
        req.seed = None
        req.warnings.append("not documented on Bedrock's OpenAI-compatible path, so left out (--drop-undocumented): "
                            + ", ".join(undocumented) + "; Bedrock's own unpublished defaults apply")
    elif undocumented:
        sent.update({k: getattr(h, k) for k in explicit})
        req.warnings.append("not documented on Bedrock's OpenAI-compatible path, sent anyway (Bedrock may ignore "
                            "or reject them; --drop-undocumented leaves them out): " + ", ".join(undocumented))
    defaulted = [f"{k}={getattr(h, k)}" for k in type(h).model_fields
                 if k not in DOCUMENTED_HYPERPARAMETERS and k not in explicit and getattr(h, k) is not None]
    if defaulted:
        req.notes.append("not sent (the YAML leaves them at the local defaults; Bedrock's unpublished ones apply): "
                         + ", ".join(defaulted))
    req.method = {"type": "reinforcement", "reinforcement": {"grader": body["method"]["reinforcement"]["grader"],
                                                             "hyperparameters": sent}}
    return req


def check_data_file(path: str, *, bedrock: bool) -> int:
    """Validate a local data file with Bedrock's rules before uploading it; the record count."""
    from grpo.data import load_records

    return len(load_records(path, allow_small=not bedrock))


def upload_file(client, path: str | Path) -> str:
    path = Path(path)
    with path.open("rb") as f:
        return client.files.create(file=(path.name, f), purpose="fine-tune").id


def resolve_file(client, value: str | None, what: str, *, bedrock: bool, say=print) -> str | None:
    """A local path is validated and uploaded (its file id returned; with no client, only validated);
    an existing file id is kept."""
    if value is None:
        return None
    if Path(value).is_file():
        n = check_data_file(value, bedrock=bedrock)
        if client is None:
            return value
        file_id = upload_file(client, value)
        say(f"uploaded {what} {value} ({n} records) -> {file_id}")
        return file_id
    if FILE_ID.match(value):
        return value
    raise UserError(f"{what}: {value}: no such file (and not an uploaded file id like file-abc123)")


def submit_job(client, req: JobRequest, *, bedrock: bool, say=print):
    """Upload the request's local files, then create the job; the job object."""
    req.training_file = resolve_file(client, req.training_file, "training_file", bedrock=bedrock, say=say)
    req.validation_file = resolve_file(client, req.validation_file, "validation_file", bedrock=bedrock, say=say)
    return client.fine_tuning.jobs.create(**req.create_kwargs())


# -- reading a job back --------------------------------------------------------------------------------
def as_dict(obj) -> dict:
    """An SDK object as the JSON the endpoint sent. The SDK types the grader as OpenAI's own kinds, so a
    Lambda grader would make pydantic warn on the way back out: the warning is noise, the data is intact."""
    return obj.to_dict(warnings=False)


def _paginate(fetch: Callable[..., Any], page_size: int) -> list[dict]:
    """Every item of an OpenAI cursor list (follow `after` = the last id while `has_more`)."""
    out, after = [], None
    while True:
        kw = {"limit": page_size} | ({"after": after} if after else {})
        page = fetch(**kw)
        items = [as_dict(x) for x in page.data]
        out += items
        if not getattr(page, "has_more", False):
            return out
        if not items or items[-1]["id"] == after:
            raise RemoteError(f"the endpoint said has_more but returned no new items after {after}")
        after = items[-1]["id"]


def list_events(client, job_id: str, page_size: int = 100) -> list[dict]:
    """All of a job's events, oldest first, each id once (OpenAI lists them newest first)."""
    events = _paginate(lambda **kw: client.fine_tuning.jobs.list_events(job_id, **kw), page_size)
    first, last = (events[0].get("created_at") or 0, events[-1].get("created_at") or 0) if events else (0, 0)
    if not first < last:  # OpenAI's order; a server that lists oldest first shows rising timestamps
        events.reverse()
    seen, out = set(), []
    for ev in events:
        if ev.get("id") not in seen:
            seen.add(ev.get("id"))
            out.append(ev)
    return out


def list_checkpoints(client, job_id: str, page_size: int = 100) -> list[dict]:
    cps = _paginate(lambda **kw: client.fine_tuning.jobs.checkpoints.list(job_id, **kw), page_size)
    return sorted(cps, key=lambda c: c.get("step_number") or 0)


def metrics_rows(events: list[dict]) -> list[dict]:
    """The data of the metrics events, one row per step, sorted; a repeated step keeps its latest data."""
    by_step: dict[int, dict] = {}
    for ev in events:
        data = ev.get("data")
        if ev.get("type") == "metrics" and isinstance(data, dict) and isinstance(data.get("step"), int):
            by_step[data["step"]] = data
    return [by_step[s] for s in sorted(by_step)]


def latest_metrics(client, job_id: str, page_size: int = 20) -> dict | None:
    """The newest metrics event's data, reading as few pages (newest first) as it takes."""
    after = None
    for _ in range(1000):
        page = client.fine_tuning.jobs.list_events(job_id, limit=page_size, **({"after": after} if after else {}))
        items = [as_dict(x) for x in page.data]
        found = [e for e in items if e.get("type") == "metrics" and isinstance(e.get("data"), dict)]
        if found:
            return max(found, key=lambda e: e["data"].get("step", 0))["data"]
        if not page.has_more or not items:
            return None
        after = items[-1]["id"]
    return None


def _write_json_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def pull_job(client, job_id: str, out_dir: Path, *, base_url: str = "") -> dict:
    """Write a run directory from a job: metrics.jsonl, events.jsonl, checkpoints.json, summary.json."""
    job = as_dict(client.fine_tuning.jobs.retrieve(job_id))
    events = list_events(client, job_id)
    checkpoints = list_checkpoints(client, job_id)
    rows = metrics_rows(events)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(RunDir(out_dir).metrics, "".join(json.dumps(r) + "\n" for r in rows))
    _write_json_atomic(RunDir(out_dir).events, "".join(json.dumps(e) + "\n" for e in events))
    _write_json_atomic(out_dir / "checkpoints.json", json.dumps(checkpoints, indent=2))
    baseline = next((e["data"]["val_score_rewards_mean"] for e in events if isinstance(e.get("data"), dict)
                     and e["data"].get("step") == 0 and "val_score_rewards_mean" in e["data"]), None)
    total = rows[-1].get("total_steps") if rows else None
    last = rows[-1]["step"] if rows else 0
    summary = {"status": job.get("status"), "steps": last, "total_steps": total,
               "stopped_early": bool(job.get("status") == "succeeded" and total and last < total),
               "baseline_val_score_rewards_mean": baseline,
               "final": {k: v for k, v in (rows[-1] if rows else {}).items() if not k.startswith(("timing_", "perf_"))},
               "fine_tuned_model": job.get("fine_tuned_model"), "error": job.get("error"),
               "checkpoints": len(checkpoints), "events": len(events), "source": base_url, "job": job,
               "pulled_at": int(time.time())}
    _write_json_atomic(RunDir(out_dir).summary, json.dumps(summary, indent=2))
    return summary


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)
