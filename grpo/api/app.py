"""The FastAPI app: OpenAI-shaped routes under /v1, bearer-key auth, OpenAI's error bodies.

Every /v1 request needs `Authorization: Bearer <key>` (401 `invalid_api_key` otherwise, before
anything else is looked at). Errors are `{"error": {"message", "type", "param", "code"}}`: 400 names
the bad field in `param`, 404 says what was not found. Lists are OpenAI's cursor pages
(`{"object": "list", "data", "has_more", "first_id", "last_id"}`, `limit` and `after=<id>`).
"""

from __future__ import annotations

import hmac
import os
import re
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from grpo.api import chat
from grpo.api import jobs as J
from grpo.api.console import add_console
from grpo.api.errors import ApiError, bad_request, not_found, parse_limit
from grpo.api.inference import ModelCache, encode
from grpo.api.limits import AuthThrottle, BodyLimit, PathMask, parse_json_object
from grpo.api.policy import ServerPolicy
from grpo.api.responses import ResponseBuilder
from grpo.api.store import Page, Store, new_id
from grpo.api.worker import JobManager

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
CHUNK = 1 << 20
MULTIPART_SLACK = 64 << 10  # form boundaries and headers around the file, on top of the size limit


@dataclass
class ServerConfig:
    state_dir: Path
    api_key: str
    handlers_dir: Path = Path("rewards")
    base_models: dict[str, str] = field(default_factory=dict)  # --model NAME=PATH
    max_jobs: int = 1
    max_upload_bytes: int = 512 * 2**20
    max_loaded_models: int = 2
    inference_dtype: str = "auto"  # grpo serve --dtype: the weights' dtype of jobs (engine.dtype) and of inference
    default_max_tokens: int = 1024
    max_tokens: int = 32768
    job_env: dict | None = None  # environment of trainer subprocesses (default: the server's, without its key)
    lambdas: dict[str, str] = field(default_factory=dict)  # --lambda ARN=FILE
    invoke_lambdas: bool = False
    lambda_endpoint_url: str | None = None
    handler_env: dict[str, str] = field(default_factory=dict)  # --handler-env NAME=VALUE
    handler_pass_env: list[str] = field(default_factory=list)  # --handler-env NAME
    client_env: list[str] = field(default_factory=list)  # --client-env NAME
    show_handler_errors: bool = False  # --show-handler-errors
    auth_fail_limit: int = 20  # --auth-fail-limit: failed key checks per client address per window (0: off)
    auth_fail_window_s: float = 60.0  # --auth-fail-window
    max_reward_concurrency: int = 8
    max_json_bytes: int = 16 * 2**20
    devices: str | None = None  # --devices: GPU ids or cpu:N (default: this machine's GPUs, else CPU slots)
    accelerate_config: str | None = None  # --accelerate-config: for jobs with several processes
    max_processes_per_job: int | None = None  # default: all the devices

    def device_pool(self):
        from grpo.api.devices import parse_devices

        return parse_devices(self.devices, min_cpu_slots=self.max_jobs)

    def policy(self, pool=None) -> ServerPolicy:
        size = (pool or self.device_pool()).size
        return ServerPolicy(max_processes_per_job=min(self.max_processes_per_job or size, size),
                            handlers_dir=Path(self.handlers_dir), base_models=dict(self.base_models),
                            lambdas=dict(self.lambdas), invoke_lambdas=self.invoke_lambdas,
                            lambda_endpoint_url=self.lambda_endpoint_url, handler_env=dict(self.handler_env),
                            handler_pass_env=list(self.handler_pass_env), client_env=list(self.client_env),
                            show_handler_errors=self.show_handler_errors, max_tokens=self.max_tokens,
                            max_reward_concurrency=self.max_reward_concurrency, dtype=self.inference_dtype)


class AbortingStream(StreamingResponse):
    """A server-sent event stream whose generations stop when the response ends for any reason: the client
    closed the socket (Starlette cancels the stream; the sync generator it was reading is not closed then, only
    whenever it is garbage-collected), the stream finished, or the server is shutting down. Each choice's
    `abort()` only sets a flag its generation thread checks per token, so it needs no await under cancellation;
    that thread then frees the server's generation lock."""

    def __init__(self, content, choices):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.choices = choices

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for choice in self.choices:
                choice.abort()


def file_object(doc: dict) -> dict:
    """OpenAI's FileObject: the stored doc without the server's own `_` fields (the upload's validation)."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def page(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


def _error(status: int, message: str, *, param=None, code=None, type="invalid_request_error") -> JSONResponse:
    return JSONResponse(ApiError(status, message, param=param, code=code, type=type).body(), status_code=status)


async def json_body(request: Request) -> dict:
    """The JSON object of the request (its size is bounded by the BodyLimit middleware, its depth here)."""
    return parse_json_object(await request.body())


def _safe_filename(name: str | None) -> str:
    base = os.path.basename((name or "").replace("\\", "/"))
    base = "".join(ch for ch in base if ch.isprintable())[:255]
    return base or "upload.jsonl"


def create_app(cfg: ServerConfig) -> FastAPI:
    store = Store(cfg.state_dir)
    pool = cfg.device_pool()
    manager = JobManager(store, max_jobs=cfg.max_jobs, env=cfg.job_env, devices=pool,
                         accelerate_config=cfg.accelerate_config)
    cache = ModelCache(cfg.max_loaded_models, dtype=cfg.inference_dtype)
    started = int(time.time())
    policy = cfg.policy(pool)
    for orphan in store.files_dir.glob(".upload-*"):  # an upload cut short by a killed server
        orphan.unlink(missing_ok=True)

    @asynccontextmanager
    async def lifespan(app):
        manager.start()
        try:
            yield
        finally:
            await run_in_threadpool(manager.stop)
            store.close()

    app = FastAPI(title="grpo local OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.store, app.state.manager, app.state.cache = store, manager, cache

    def body_limit(scope):
        if not scope["path"].startswith("/v1"):
            return None
        if scope["path"] == "/v1/files" and scope["method"] == "POST":
            return cfg.max_upload_bytes + MULTIPART_SLACK, "a file upload (--max-upload-mb)"
        return cfg.max_json_bytes, "a JSON request"

    app.add_middleware(BodyLimit, limit_for=body_limit)
    throttle = app.state.auth_throttle = AuthThrottle(cfg.auth_fail_limit, cfg.auth_fail_window_s)

    # -- auth, limits, errors ------------------------------------------------------------------
    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            addr = throttle.address(request.scope)
            if (retry := throttle.retry_after(addr)) is not None:
                return throttle.refusal(retry)
            header = request.headers.get("authorization", "")
            scheme, _, key = header.partition(" ")
            if not header:  # no key tried: not a guess (an expired console session polling, say)
                return _error(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                              code="invalid_api_key")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
                throttle.failed(addr)
                return _error(401, "Incorrect API key provided.", code="invalid_api_key")
            size = request.headers.get("content-length")
            if request.url.path == "/v1/files" and request.method == "POST" and size and size.isdigit() \
                    and int(size) > cfg.max_upload_bytes + MULTIPART_SLACK:
                return _error(413, f"file: the upload is larger than this server's limit of "
                                   f"{cfg.max_upload_bytes} bytes (--max-upload-mb)", param="file")
            if size and size.isdigit() and int(size) > cfg.max_json_bytes and request.url.path != "/v1/files":
                return _error(413, f"the request body is larger than this server's limit of {cfg.max_json_bytes} "
                                   "bytes for a JSON request", code="request_too_large")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405) else str(exc.detail)
        return _error(exc.status_code, msg, code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err["loc"] if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return _error(400, f"{param}: {err['msg']}" if param else err["msg"], param=param)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        # The client learns only that it failed: the exception's text can hold paths on this machine or SQL.
        # Here one line names the request; Starlette re-raises the exception after this response, and
        # uvicorn logs its traceback (once) below that line.
        print(f"grpo serve: internal error on {request.method} {request.url.path}: {type(exc).__name__}",
              file=sys.stderr, flush=True)
        return _error(500, "The server had an error while processing your request; its log has the details.",
                      type="server_error")

    # -- files ---------------------------------------------------------------------------------
    def get_file(file_id: str) -> dict:
        doc = store.get_file(file_id) if FILE_ID.match(file_id) else None
        if doc is None:
            raise not_found("file", file_id, "file_not_found")
        return doc

    @app.post("/v1/files")
    def upload_file(file: UploadFile = File(...), purpose: str = Form(...)):
        from grpo.data import validate_file

        if purpose != "fine-tune":
            raise bad_request(f"purpose: '{purpose}' is not supported here; use 'fine-tune'", "purpose")
        file_id, name = new_id("file-"), _safe_filename(file.filename)
        tmp = store.files_dir / f".upload-{file_id}"
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := file.file.read(CHUNK):
                    size += len(chunk)
                    if size > cfg.max_upload_bytes:
                        raise ApiError(413, f"file: the upload is larger than this server's limit of "
                                            f"{cfg.max_upload_bytes} bytes (--max-upload-mb)", param="file")
                    out.write(chunk)
            rep = validate_file(tmp, allow_small=True, keep_records=False)
            if rep.problems:
                shown = [str(p).replace(str(tmp), name) for p in rep.problems[:20]]
                more = f" (and {rep.problem_count - 20:,} more)" if rep.problem_count > 20 else ""
                raise bad_request(f"file: {name} is not valid RFT data: " + "; ".join(shown) + more, "file",
                                  code="invalid_file")
            os.replace(tmp, store.files_dir / f"{file_id}.jsonl")
        finally:
            tmp.unlink(missing_ok=True)
        notes = [str(w).replace(str(tmp), name) for w in rep.warnings]
        doc = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()), "filename": name,
               "purpose": purpose, "status": "processed", "expires_at": None,
               "status_details": "; ".join(notes) or None,
               # what the job worker would check again: these bytes never change (jobs hard-link them)
               J.UPLOAD_VALIDATION: {"allow_small": True, "problems": rep.problem_count}}
        store.add_file(doc)
        return file_object(doc)

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, limit: str | None = None, after: str | None = None,
                   order: str = "desc"):
        if order not in ("asc", "desc"):
            raise bad_request(f"order: expected 'asc' or 'desc', got {order!r}", "order")
        got = store.list_files(purpose=purpose, limit=parse_limit(limit, 10000, 10000), after=after,
                               desc=order == "desc")
        return page([file_object(f) for f in got], got.has_more)

    @app.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str):
        return file_object(get_file(file_id))

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str):
        get_file(file_id)
        store.delete_file(file_id)
        (store.files_dir / f"{file_id}.jsonl").unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str):
        """Streamed from disk in chunks (an upload may be hundreds of MiB), never read whole."""
        get_file(file_id)
        path = store.files_dir / f"{file_id}.jsonl"
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ApiError(404, f"The content of file '{file_id}' is no longer on this server's disk",
                           param="file_id", code="file_not_found") from None
        return FileResponse(path, media_type="application/jsonl", stat_result=st)

    # -- fine-tuning jobs ------------------------------------------------------------------------
    def get_job(job_id: str) -> dict:
        doc = store.get_job(job_id)
        if doc is None:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_not_found", "fine_tuning_job_id")
        return doc

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        body = await json_body(request)
        return J.job_object(await run_in_threadpool(J.create_job, store, body, policy))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(limit: str | None = None, after: str | None = None):
        got = store.list_jobs(limit=parse_limit(limit, 20, 1000), after=after)
        return page([J.job_object(j) for j in got], got.has_more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve_job(job_id: str):
        return J.job_object(get_job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str):
        get_job(job_id)
        return J.job_object(manager.cancel(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str):
        get_job(job_id)
        return J.job_object(manager.pause(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str):
        get_job(job_id)
        return J.job_object(manager.resume(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, limit: str | None = None, after: str | None = None):
        job = get_job(job_id)
        manager.sync_events(job_id)
        got = store.list_events(job_id, limit=parse_limit(limit, 20, 1000), after=after)
        return page([J.event_object(e, job) for e in got], got.has_more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, limit: str | None = None, after: str | None = None):
        items = J.checkpoint_objects(store, get_job(job_id))
        n = parse_limit(limit, 10, 1000)
        if after:
            ids = [c["id"] for c in items]
            if after not in ids:
                raise bad_request(f"after: no checkpoint with id '{after}' in this list", "after")
            items = items[ids.index(after) + 1:]
        got = Page(items[:n])
        return page(got, len(items) > n)

    # -- models and inference ------------------------------------------------------------------------
    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": J.model_objects(store, cfg.base_models, started)}

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(model_id: str):
        found = J.model_object(store, model_id, cfg.base_models, started)
        if found is None:
            raise not_found("model", model_id, "model_not_found", "model")
        return found

    def load_model(body: dict):
        from grpo.errors import UserError

        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise bad_request("model: expected a model id (see /v1/models)", "model")
        resolved = J.resolve_model(store, model_id, policy.served_models())
        if resolved is None:
            raise ApiError(404, f"The model '{model_id}' does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        base, adapter, default_effort = resolved
        try:
            return model_id, cache.get(base, adapter), default_effort
        except (UserError, OSError, ValueError) as e:  # the client learns the id; the log, the reason (paths)
            print(f"grpo serve: model {model_id!r} could not be loaded: {e}", file=sys.stderr, flush=True)
            raise ApiError(500, f"The model '{model_id}' could not be loaded on this server; its log has the "
                                "details.", param="model", type="server_error") from None

    def prepare_chat(body: dict):
        chat.reject_unsupported(body, chat.UNSUPPORTED_CHAT)
        chat.check_common(body)
        tools = chat.request_tools(body, responses=False)
        messages = chat.chat_messages(body.get("messages"))
        params = chat.sampling(body, ("max_completion_tokens", "max_tokens"), cfg.default_max_tokens, cfg.max_tokens)
        n = chat.int_param(body, "n", 1, 1, 16)
        model_id, loaded, default_effort = load_model(body)
        eff = chat.effort(body.get("reasoning_effort"), default_effort, "reasoning_effort")
        setup = chat.ToolSetup(loaded, tools, eff)
        prompt = encode(loaded, messages, eff, tools.tools if tools.active else None)
        choices = [chat.Choice(cache, loaded, prompt, dict(params, seed=params["seed"] if i == 0 else None),
                               tools=setup) for i in range(n)]
        return model_id, choices, len(prompt)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        model_id, choices, prompt_tokens = await run_in_threadpool(prepare_chat, body)
        if body.get("stream"):
            include = chat.include_usage(body)
            return AbortingStream(chat.chat_stream(model_id, choices, prompt_tokens, include), choices)
        done = await run_in_threadpool(lambda: [c.run() for c in choices])
        return chat.chat_completion(model_id, done, prompt_tokens)

    def prepare_response(body: dict):
        chat.reject_unsupported(body, chat.UNSUPPORTED_RESPONSES)
        chat.check_common(body, responses=True)
        tools = chat.request_tools(body, responses=True)
        messages = chat.response_messages(body)
        params = chat.sampling(body, ("max_output_tokens",), cfg.default_max_tokens, cfg.max_tokens)
        reasoning = body.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, dict):
            raise bad_request("reasoning: expected an object like {\"effort\": \"low\"}", "reasoning")
        model_id, loaded, default_effort = load_model(body)
        eff = chat.effort((reasoning or {}).get("effort"), default_effort, "reasoning.effort")
        setup = chat.ToolSetup(loaded, tools, eff)
        prompt = encode(loaded, messages, eff, tools.tools if tools.active else None)
        return (ResponseBuilder(model_id, body, eff, params), chat.Choice(cache, loaded, prompt, params, tools=setup),
                len(prompt))

    @app.post("/v1/responses")
    async def responses(request: Request):
        body = await json_body(request)
        builder, choice, prompt_tokens = await run_in_threadpool(prepare_response, body)
        if body.get("stream"):
            return AbortingStream(builder.stream(choice, prompt_tokens), [choice])
        return builder.complete(await run_in_threadpool(choice.run), prompt_tokens)

    add_console(app, cfg)  # the browser console at /console/; its gate runs before the auth above
    app.add_middleware(PathMask, paths={str(cfg.state_dir): "$STATE", os.path.abspath(cfg.handlers_dir): "$HANDLERS"})
    return app
