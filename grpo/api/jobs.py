"""Fine-tuning jobs: the create body checked and turned into a job directory, and the OpenAI views of
jobs, their events and checkpoints, and the model ids they produce.

The body is Bedrock's (model, training_file, validation_file, method.reinforcement.grader and
hyperparameters) plus, on this local server only, an optional `engine` object; it is validated with
the engine's own `JobConfig`, so a bad field is a 400 naming it, and then against the operator's
`grpo.api.policy.ServerPolicy`: the served models, local graders under --handlers-dir only, ARNs as the
operator allows, and the engine section's allowlist with its bounds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from pathlib import Path

import yaml
from pydantic import ValidationError

from grpo.api.errors import bad_request
from grpo.api.policy import ServerPolicy, check_engine, check_hyperparameters
from grpo.api.store import Store, new_id
from grpo.config import JobConfig, flat_aliases, format_validation_error
from grpo.rundir import RunDir, make_event, read_jsonl

ORG = "grpo-local"
GRADER_PARAM = "method.reinforcement.grader.lambda.function"
MODEL_ID = re.compile(r"^ft:(?P<base>.+):grpo:(?P<job>ftjob-[0-9a-f]{24})(?::ckpt-step-(?P<step>0|[1-9]\d{0,17}))?$")
TERMINAL = ("succeeded", "failed", "cancelled")
UPLOAD_VALIDATION = "_validation"  # a file doc's record of the upload's check (grpo.data.validate_file)


# -- ids -------------------------------------------------------------------------------------
def fine_tuned_model_id(job: dict) -> str:
    return f"ft:{job['model']}:grpo:{job['id']}"


def checkpoint_model_id(job: dict, step: int) -> str:
    return f"{fine_tuned_model_id(job)}:ckpt-step-{step}"


def checkpoint_id(job_id: str, step: int) -> str:
    """Stable across restarts (derived, not stored)."""
    return "ftckpt-" + hashlib.sha256(f"{job_id}:{step}".encode()).hexdigest()[:24]


def job_dir(store: Store, job_id: str) -> Path:
    return store.jobs_dir / job_id


def run_dir(store: Store, job_id: str) -> Path:
    return job_dir(store, job_id) / "run"


# -- the create body -------------------------------------------------------------------------
def resolve_handler(text: str, handlers_dir: Path, param: str) -> str:
    """A local `path[.py][:function]` to its real path, which must lie under `handlers_dir`. A relative path
    is looked up under handlers_dir, then under the server's cwd. (ARNs: `resolve_grader`.)"""
    if len(text) > 4096 or not text.isprintable():
        raise bad_request(f"{param}: expected a handler file name (printable characters, at most 4096)", param)
    head, sep, tail = text.rpartition(":")
    path, suffix = (head, sep + tail) if sep and head and tail.isidentifier() else (text, "")
    root = Path(os.path.realpath(handlers_dir))
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [root / p, Path.cwd() / p]
    inside = [Path(os.path.realpath(c)) for c in candidates if Path(os.path.realpath(c)).is_relative_to(root)]
    if not inside:
        raise bad_request(f"{param}: {text!r} is outside the handlers directory {root} this server was started "
                          "with (--handlers-dir); a client can only name handlers that lie under it", param)
    for real in inside:
        if real.is_file():
            if real.suffix != ".py":
                raise bad_request(f"{param}: {text!r} is not a .py file", param)
            return str(real) + suffix
    raise bad_request(f"{param}: no handler file {path!r} under the handlers directory {root}", param)


def resolve_grader(text: str, policy: ServerPolicy, param: str) -> tuple[str, bool]:
    """(what the trainer runs, whether it is a deployed Lambda it invokes). An ARN runs only as the operator
    allows: the local file mapped to it (--lambda ARN=FILE), else the deployed function (--invoke-lambdas)."""
    if not text.startswith("arn:"):
        return resolve_handler(text, policy.handlers_dir, param), False
    if text in policy.lambdas:
        return policy.lambdas[text], False
    if policy.invoke_lambdas:
        return text, True
    raise bad_request(f"{param}: this server does not invoke deployed Lambda functions; its operator can run a "
                      "local file in this ARN's place (grpo serve --lambda ARN=FILE) or allow invoking them "
                      "(--invoke-lambdas); or name a handler file under --handlers-dir in engine.handler", param,
                      code="grader_not_allowed")


def _file_path(store: Store, body: dict, field: str, required: bool) -> Path | None:
    ident = body.get(field)
    if ident is None and not required:
        return None
    if not isinstance(ident, str) or not ident:
        raise bad_request(f"{field}: expected a file id (from files.create with purpose 'fine-tune')", field)
    doc = store.get_file(ident)
    if doc is None or doc.get("purpose") != "fine-tune":
        raise bad_request(f"invalid {field}: no file with id '{ident}' and purpose 'fine-tune'", field,
                          code=f"invalid_{field}")
    return store.files_dir / f"{ident}.jsonl"


def validated_at_upload(file_doc: dict | None) -> bool:
    """Whether the upload checked the file as the job worker would (validate_file, allow_small) and found
    no problem. Files uploaded by an older server have no record: the worker checks those itself."""
    record = (file_doc or {}).get(UPLOAD_VALIDATION)
    return isinstance(record, dict) and record.get("allow_small") is True and record.get("problems") == 0


def _error_param(err: ValidationError) -> str | None:
    first = err.errors()[0]["loc"] if err.errors() else ()
    return ".".join(str(p) for p in first) or None


def validate_body(store: Store, body, policy: ServerPolicy) -> tuple[dict, JobConfig, dict | None]:
    """(raw config with files as paths, the operator's model and handlers resolved, the parsed JobConfig,
    metadata)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    raw = copy.deepcopy(body)
    metadata = raw.pop("metadata", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad_request("metadata: expected an object of string keys and string values", "metadata")
    if raw.pop("suffix", None) is not None:
        raise bad_request("suffix: not supported (Bedrock's OpenAI-compatible path does not support it)", "suffix")
    raw["training_file"] = str(_file_path(store, raw, "training_file", True))
    val = _file_path(store, raw, "validation_file", False)
    raw.pop("validation_file", None)
    if val is not None:
        raw["validation_file"] = str(val)
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        msg = format_validation_error("request body", e, flat=flat_aliases(raw)).replace("invalid job config:\n", "invalid job: ")
        raise bad_request(msg.replace("\n", "; "), _error_param(e)) from None
    check_engine(raw.get("engine"), policy)
    check_hyperparameters(cfg.hyperparameters, policy)
    if cfg.seed is not None and not 0 <= cfg.seed < 2**32:
        raise bad_request(f"seed: expected an integer in [0, 2**32 - 1], got {cfg.seed}", "seed")
    engine = raw.setdefault("engine", {})
    local = policy.local_model(cfg.model)
    if cfg.engine.model and cfg.engine.model != local:
        raise bad_request(f"engine.model: this server's operator decides what trains for model {cfg.model!r} (grpo "
                          "serve --model NAME=PATH); leave engine.model out", "engine.model")
    engine["model"] = local
    engine["dtype"] = policy.dtype  # the operator's precision (grpo serve --dtype)
    grader = raw["method"]["reinforcement"]["grader"]
    key = "lambda" if "lambda" in grader else "lambda_"
    if cfg.engine.handler:  # a client's engine.handler: a file under --handlers-dir
        if cfg.engine.handler.startswith("arn:"):
            raise bad_request("engine.handler: a client names a local handler file here; an ARN belongs in the "
                              "grader (method.reinforcement.grader.lambda.function)", "engine.handler")
        engine["handler"] = resolve_handler(cfg.engine.handler, policy.handlers_dir, "engine.handler")
    else:
        handler, invoked = resolve_grader(cfg.grader_function, policy, GRADER_PARAM)
        if invoked:
            grader[key]["function"] = handler
            if (engine.get("reward") or {}).get("env"):
                raise bad_request("engine.reward.env: a deployed Lambda has its own environment", "engine.reward.env")
            if policy.lambda_endpoint_url:
                engine.setdefault("reward", {})["endpoint_url"] = policy.lambda_endpoint_url
        else:
            engine["handler"] = handler
    if cfg.engine.environment:  # a job's tools (engine.environment) lie under --handlers-dir, as handlers do
        engine["environment"] = resolve_handler(cfg.engine.environment, policy.handlers_dir, "engine.environment")
    if (policy.handler_env or policy.handler_pass_env) and ("handler" in engine or "environment" in engine):
        reward = engine.setdefault("reward", {})
        reward["env"] = {**(reward.get("env") or {}), **policy.handler_env}  # the operator's values win
        reward["pass_env"] = list(policy.handler_pass_env)
    if not policy.show_handler_errors:  # a handler's error text may quote its upstream's reply: the operator's
        engine.setdefault("reward", {})["error_detail"] = "withheld"
    try:
        cfg = JobConfig.model_validate(raw)  # what the trainer will read, with the operator's choices in
    except ValidationError as e:
        raise bad_request(format_validation_error("request body", e).replace("\n", "; "), _error_param(e)) from None
    return raw, cfg, metadata


def _link(src: Path, dst: Path) -> None:
    """The job's own name for an uploaded file (a hard link, else a copy): deleting the file later
    does not take it from a queued or resumed job."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def create_job(store: Store, body, policy: ServerPolicy) -> dict:
    """Validate the body, write `jobs/<id>/job.yaml`, record the job (status validating_files) with the
    files whose upload already validated them (`validated_at_upload`: the worker does not read them again)."""
    raw, cfg, metadata = validate_body(store, body, policy)
    job_id = new_id("ftjob-")
    d = job_dir(store, job_id)
    d.mkdir(parents=True)
    for field, name in (("training_file", "training.jsonl"), ("validation_file", "validation.jsonl")):
        if raw.get(field):
            _link(Path(raw[field]), d / name)
            raw[field] = str(d / name)
    (d / "job.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    checked = [f for f in ("training_file", "validation_file")
               if raw.get(f) and validated_at_upload(store.get_file(body[f]))]
    h = cfg.hyperparameters
    doc = {"id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "status": "validating_files",
           "model": cfg.model, "training_file": body["training_file"], "validation_file": body.get("validation_file"),
           "method": copy.deepcopy(body["method"]), "seed": cfg.run_seed, "metadata": metadata,
           "hyperparameters": {"batch_size": h.batch_size, "learning_rate_multiplier": h.learning_rate_multiplier,
                               "n_epochs": h.n_epochs},
           "reasoning_effort": h.reasoning_effort, "local_model": cfg.local_model,
           "fine_tuned_model": None, "finished_at": None, "trained_tokens": None, "error": None, "pid": None,
           "validated_at_upload": checked}
    store.add_job(doc)
    store.add_event(job_id, make_event(f"Created fine-tuning job: {job_id}"))
    for w in cfg.warnings():
        store.add_event(job_id, make_event(w, level="warn"))
    return doc


# -- views -----------------------------------------------------------------------------------
def job_object(job: dict) -> dict:
    """OpenAI's FineTuningJob."""
    keys = ("id", "object", "created_at", "error", "fine_tuned_model", "finished_at", "hyperparameters", "model",
            "seed", "status", "trained_tokens", "training_file", "validation_file", "metadata", "method")
    out = {k: job.get(k) for k in keys}
    out.update(organization_id=ORG, result_files=[], estimated_finish=None, integrations=[])
    return out


def finite(obj):
    """NaN and infinities as null: JSON has no such numbers (a validation with nothing graded is NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def event_object(event: dict, job: dict) -> dict:
    """OpenAI's FineTuningJobEvent: level info|warn|error, type message|metrics. The trainer's checkpoint
    events carry the checkpoint's model id (not a path on the server's disk)."""
    ev = {k: event.get(k) for k in ("object", "id", "created_at", "level", "type", "message")}
    ev["level"] = {"warning": "warn"}.get(ev["level"], ev["level"]) or "info"
    data = event.get("data")
    if ev["type"] == "checkpoint" and isinstance(data, dict) and "step" in data:
        data = {"step": data["step"], "fine_tuned_model_checkpoint": checkpoint_model_id(job, data["step"])}
    if ev["type"] not in ("message", "metrics"):
        ev["type"] = "message"
    ev["data"] = finite(data)
    return ev


def _numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _checkpoint_created(ckpt: Path) -> int | None:
    """When a checkpoint was written (its state.json, written last), or None when it is not there."""
    try:
        st = (ckpt / "state.json").stat()
    except OSError:  # removed while listing
        return None
    return int(st.st_mtime) if stat.S_ISREG(st.st_mode) else None


def checkpoint_objects(store: Store, job: dict) -> list[dict]:
    """OpenAI's FineTuningJobCheckpoint for each checkpoint on disk, newest first; `metrics` holds the
    step's metrics line (Bedrock's names) with `step`."""
    from grpo.training.checkpoint import list_checkpoints

    run = run_dir(store, job["id"])
    rows = {r.get("step"): r for r in read_jsonl(RunDir(run).metrics)}
    out = []
    for step, path in reversed(list_checkpoints(run)):
        created = _checkpoint_created(path)
        if created is None:
            continue
        out.append({"object": "fine_tuning.job.checkpoint", "id": checkpoint_id(job["id"], step), "created_at": created,
                    "fine_tuned_model_checkpoint": checkpoint_model_id(job, step), "fine_tuning_job_id": job["id"],
                    "metrics": finite({**_numeric(rows.get(step, {})), "step": step}), "step_number": step})
    return out


def trained_tokens(store: Store, job_id: str) -> int:
    """Sum of `perf_total_num_tokens` (prompt + response tokens of every sequence each step trained on)."""
    rows = read_jsonl(RunDir(run_dir(store, job_id)).metrics)
    return int(sum(r.get("perf_total_num_tokens", 0) for r in rows))


def resolve_model(store: Store, model_id: str, served: dict[str, str]) -> tuple[str, str | None, str] | None:
    """(base model path, adapter dir or None, default reasoning effort) for a model id, or None.

    Known ids: a served model (`ServerPolicy.served_models`), a succeeded job's fine_tuned_model, a
    checkpoint's model (on the base the job trained). Nothing else is loaded: not another job's base id."""
    from grpo.models.loading import resolve_model_path
    from grpo.training.checkpoint import checkpoint_dir, latest_checkpoint

    m = MODEL_ID.match(model_id)
    if m:
        job = store.get_job(m["job"])
        if job is None or fine_tuned_model_id(job) != model_id.rsplit(":ckpt-step-", 1)[0]:
            return None
        run = run_dir(store, job["id"])
        if m["step"] is not None:
            ckpt = checkpoint_dir(run, int(m["step"]))
            if not (ckpt / "state.json").is_file():
                return None
        else:
            ckpt = latest_checkpoint(run) if job["status"] == "succeeded" else None
            if ckpt is None:
                return None
        return resolve_model_path(job["local_model"], progress=False), str(ckpt / "adapter"), job.get("reasoning_effort", "low")
    if model_id in served:
        return resolve_model_path(served[model_id], progress=False), None, "low"
    return None


def _model(mid: str, created: int, owner: str) -> dict:
    return {"id": mid, "object": "model", "created": created, "owned_by": owner}


def model_objects(store: Store, base_models: dict[str, str], started: int) -> list[dict]:
    """/v1/models: base models (--model and those of jobs), fine-tuned models, checkpoint models.
    Checkpoints are found from their directories (no run's metrics are read)."""
    from grpo.training.checkpoint import list_checkpoints

    out, seen = [], set()

    def add(mid: str, created: int, owner: str) -> None:
        if mid not in seen:
            seen.add(mid)
            out.append(_model(mid, created, owner))

    for name in base_models:
        add(name, started, "system")
    jobs = store.all_jobs()
    for job in jobs:
        add(job["model"], job["created_at"], "system")
    for job in jobs:
        if job["status"] == "succeeded" and job.get("fine_tuned_model"):
            add(job["fine_tuned_model"], job.get("finished_at") or job["created_at"], ORG)
        for step, path in list_checkpoints(run_dir(store, job["id"])):
            created = _checkpoint_created(path)
            if created is not None:
                add(checkpoint_model_id(job, step), created, ORG)
    return out


def model_object(store: Store, model_id: str, base_models: dict[str, str], started: int) -> dict | None:
    """The /v1/models entry listed under `model_id`, looked up directly (a fine-tuned or checkpoint id
    names its job; one checkpoint directory is looked at), or None."""
    from grpo.training.checkpoint import checkpoint_dir

    if model_id in base_models:
        return _model(model_id, started, "system")
    m = MODEL_ID.match(model_id)
    job = store.get_job(m["job"]) if m else None
    if job is not None and m["step"] is None:
        if job["status"] == "succeeded" and job.get("fine_tuned_model") == model_id:
            return _model(model_id, job.get("finished_at") or job["created_at"], ORG)
    elif job is not None and checkpoint_model_id(job, int(m["step"])) == model_id:
        created = _checkpoint_created(checkpoint_dir(run_dir(store, job["id"]), int(m["step"])))
        if created is not None:
            return _model(model_id, created, ORG)
    for job in store.all_jobs():  # oldest first, as the list has it
        if job["model"] == model_id:
            return _model(model_id, job["created_at"], "system")
    return None


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_bytes()[-16384:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def failure_message(store: Store, job_id: str, code: int) -> str:
    """Why a trainer exited non-zero: its summary's error, else its `error:` lines, else its log's tail."""
    d = job_dir(store, job_id)
    try:
        summary = json.loads((d / "run" / "summary.json").read_text())
        if summary.get("status") == "failed" and summary.get("error"):
            return summary["error"]
    except (OSError, ValueError):
        pass
    tail = log_tail(d / "train.log", 200)
    errors = [ln[len("error: "):] for ln in tail.splitlines() if ln.startswith("error: ")]
    if errors:
        return "\n".join(errors)
    what = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return f"the trainer stopped ({what}); the end of its log:\n" + "\n".join(tail.splitlines()[-20:])
