"""The console: pages for a person, served by `grpo serve` on its own port, at /console/.

Pages (static HTML + JS under `static/console/`, no build step): the jobs list, a job (live charts of the
six step metrics and validation reward with health alarms marked, checkpoints, events, config, error, and
cancel / pause / resume where the API has them), and a compare view (`grpo compare` on two jobs, or a job
and a run pulled under the state dir's `runs/`). Charts are uPlot (MIT, vendored in `static/console/vendor`).

Security, as the API's:
- Nothing but the login form and its stylesheet is served without the server's key. Signing in (POST
  /console/login with the key) sets an HttpOnly, SameSite=Strict session cookie (random, held in memory:
  a restart signs everyone out; 12 h). `/console/api/*` takes that cookie or the API's bearer key.
- The pages' JSON goes through the API's own auth: a /v1 request that carries the session cookie and no
  Authorization header gets the server's bearer key added here, then meets the same check as any client.
- CSRF: a state-changing request carrying a live session cookie (and no bearer key) needs the session's token
  in X-CSRF-Token (the pages read it from /console/api/session, which another origin cannot read) and, when
  the browser sends them, an Origin of this server and Sec-Fetch-Site same-origin; otherwise 403 csrf_failed,
  on /v1 and /console alike. A read from another origin is not let in with the cookie (401 invalid_api_key,
  as without it). SameSite=Strict on top.
- No user data is put into HTML by the server; the scripts set it as text (textContent). A strict
  Content-Security-Policy (scripts and styles from this origin only, nothing inline) backs that up.
- Files: only the packaged static files (a fixed list), and run data under the state dir (console_runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.datastructures import Headers, MutableHeaders

from grpo.api.console_runs import RunReader
from grpo.api.errors import ApiError

STATIC = Path(__file__).parent / "static" / "console"
PUBLIC_STATIC = ("console.css", "login.js")
SESSION_S = 12 * 3600
MAX_SESSIONS = 256
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOGIN_FAIL_DELAY_S = 1.0
MAX_LOGIN_BYTES = 8192
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "same-origin", "x-frame-options": "DENY", "cache-control": "no-store"}
SCOPE_SESSION = "grpo.console_session"  # the request's session token, set by the gate
ACTION_ROUTE = re.compile(r"^/v1/fine_tuning/jobs/\{[^}]+\}/(?P<action>cancel|pause|resume)$")


def cookie_name(scope) -> str:
    """One cookie per port: browsers share 127.0.0.1's cookies across ports, so two servers on one machine
    would otherwise sign each other out."""
    server = scope.get("server") or ("", 0)
    return f"grpo_console_{server[1] or 0}"


class Sessions:
    """Signed-in browsers: sha256(cookie token) -> (expiry, CSRF token). In memory only."""

    def __init__(self):
        self._by_hash: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def new(self) -> str:
        token, now = secrets.token_urlsafe(32), time.time()
        with self._lock:
            self._by_hash = {k: v for k, v in self._by_hash.items() if v[0] > now}
            while len(self._by_hash) >= MAX_SESSIONS:  # the oldest sign-in goes first
                self._by_hash.pop(min(self._by_hash, key=lambda k: self._by_hash[k][0]))
            self._by_hash[self._key(token)] = (now + SESSION_S, secrets.token_urlsafe(32))
        return token

    def csrf(self, token: str | None) -> str | None:
        """The session's CSRF token, or None when `token` is no live session."""
        if not token:
            return None
        with self._lock:
            got = self._by_hash.get(self._key(token))
        return got[1] if got and got[0] > time.time() else None

    def drop(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._by_hash.pop(self._key(token), None)


def _session_token(headers: Headers, scope) -> str | None:
    name = cookie_name(scope)
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def _own_origin(headers: Headers, scope) -> str:
    return f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"


def cross_site(headers: Headers, scope) -> bool:
    """The browser says this request came from another origin (Origin or Sec-Fetch-Site)."""
    origin, site = headers.get("origin"), headers.get("sec-fetch-site")
    return (origin is not None and origin != _own_origin(headers, scope)) or site not in (None, "same-origin", "none")


def _json(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(ApiError(status, message, code=code).body(), status_code=status)


class ConsoleGate:
    """ASGI middleware in front of the API's: the console's auth, the cookie -> bearer key bridge for /v1,
    CSRF checks, and the security headers of every console response."""

    def __init__(self, app, *, api_key: str, sessions: Sessions, throttle=None):
        self.app, self.key, self.sessions, self.throttle = app, api_key, sessions, throttle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        headers = Headers(scope=scope)
        if path.startswith("/v1"):
            csrf = None if "authorization" in headers else self.sessions.csrf(_session_token(headers, scope))
            if csrf is not None and method not in SAFE_METHODS and not self._csrf_ok(headers, scope, csrf):
                # a state change riding on the cookie without this page's token, or from another origin
                # (another port on this host gets the same cookies): 403 csrf_failed, as docs/console.md says
                return await self._csrf_refused(scope, receive, send)
            if csrf is not None and not cross_site(headers, scope):  # a console page calling the API: the same
                # bearer check as any client (a read from another origin is not let in: 401 from the API)
                scope = {**scope, "headers": [*scope["headers"], (b"authorization", f"Bearer {self.key}".encode())]}
            return await self.app(scope, receive, send)
        if path == "/":
            return await RedirectResponse("/console/", 303)(scope, receive, send)
        if path != "/console" and not path.startswith("/console/"):
            return await self.app(scope, receive, send)
        return await self._console(scope, receive, self._with_headers(send), headers)

    async def _console(self, scope, receive, send, headers: Headers):
        path, method = scope["path"], scope["method"]
        if path == "/console/login" or path in (f"/console/static/{n}" for n in PUBLIC_STATIC):
            return await self.app(scope, receive, send)
        token = _session_token(headers, scope)
        csrf = self.sessions.csrf(token)
        bearer = False
        if path.startswith("/console/api/") and "authorization" in headers:  # a key tried: throttled per address
            addr = self.throttle.address(scope)
            if (retry := self.throttle.retry_after(addr)) is not None:
                return await self.throttle.refusal(retry)(scope, receive, send)
            bearer = self._bearer_ok(headers)
            if not bearer:
                self.throttle.failed(addr)
        if csrf is not None and not bearer and method not in SAFE_METHODS and not self._csrf_ok(headers, scope, csrf):
            return await self._csrf_refused(scope, receive, send)  # before the cross-origin read rule below
        if csrf is not None and cross_site(headers, scope) and path.startswith(("/console/api/", "/console/static/")):
            csrf = None  # the pages' data and scripts are for the console's own pages only
        if csrf is None and not bearer:
            if method == "GET" and not path.startswith(("/console/api/", "/console/static/")):
                target = "/console/login?next=" + quote(path + (f"?{scope['query_string'].decode('latin-1')}"
                                                                if scope.get("query_string") else ""), safe="")
                return await RedirectResponse(target, 303)(scope, receive, send)
            return await _json(401, "Sign in at /console/login, or send 'Authorization: Bearer KEY'.",
                               "invalid_api_key")(scope, receive, send)
        scope[SCOPE_SESSION] = token if csrf is not None else None
        return await self.app(scope, receive, send)

    def _bearer_ok(self, headers: Headers) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.key.encode())

    @staticmethod
    def _csrf_ok(headers: Headers, scope, csrf: str) -> bool:
        sent = headers.get("x-csrf-token", "")
        return hmac.compare_digest(sent.encode(), csrf.encode()) and not cross_site(headers, scope)

    @staticmethod
    async def _csrf_refused(scope, receive, send):
        return await _json(403, "This request changes state and came without this page's CSRF token "
                                "(X-CSRF-Token) or from another origin; reload the console page.",
                           "csrf_failed")(scope, receive, send)

    @staticmethod
    def _with_headers(send):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    h[k] = v
            await send(message)
        return wrapped


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html; charset=utf-8")


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if value and value.startswith("/console/") and "\\" not in value and not value.startswith("//") \
            and all(ch.isprintable() and not ch.isspace() for ch in value):
        return value
    return "/console/"


def add_console(app: FastAPI, cfg) -> None:
    """Mount the console on the API's app (`cfg`: its ServerConfig). Call it after the app's own
    middleware is added, so that this gate runs first."""
    store, api_key = app.state.store, cfg.api_key
    reader = RunReader(store, Path(cfg.handlers_dir))
    sessions = Sessions()
    static = {str(p.relative_to(STATIC)): p for p in STATIC.rglob("*") if p.is_file() and not p.name.endswith(".html")}
    throttle = app.state.auth_throttle
    app.add_middleware(ConsoleGate, api_key=api_key, sessions=sessions, throttle=throttle)

    @app.get("/console", include_in_schema=False)
    def console_root():
        return RedirectResponse("/console/", 303)

    @app.get("/console/", include_in_schema=False)
    def jobs_page():
        return _page("jobs.html")

    @app.get("/console/jobs/{job_id}", include_in_schema=False)
    def job_page(job_id: str):
        return _page("job.html")

    @app.get("/console/compare", include_in_schema=False)
    def compare_page():
        return _page("compare.html")

    @app.get("/console/login", include_in_schema=False)
    def login_page():
        return _page("login.html")

    @app.post("/console/login", include_in_schema=False)
    async def login(request: Request):
        body = b""
        async for chunk in request.stream():  # anyone may post here: read a small form, never a big body
            body += chunk
            if len(body) > MAX_LOGIN_BYTES:
                return _json(413, "The sign-in form is larger than it can be.", "request_too_large")
        form = parse_qs(body.decode("utf-8", "replace"))
        nxt = _safe_next((form.get("next") or [None])[0])
        if cross_site(request.headers, request.scope):
            return _json(403, "Sign in from this server's own login page.", "csrf_failed")
        addr = throttle.address(request.scope)
        if (retry := throttle.retry_after(addr)) is not None:  # before the key is compared: says nothing of it
            return throttle.refusal(retry)
        key = (form.get("key") or [""])[0].strip()
        if not hmac.compare_digest(key.encode(), api_key.encode()):
            throttle.failed(addr)
            await asyncio.sleep(LOGIN_FAIL_DELAY_S)  # a guess per second, per connection
            return RedirectResponse(f"/console/login?failed=1&next={quote(nxt, safe='')}", 303)
        resp = RedirectResponse(nxt, 303)
        resp.set_cookie(cookie_name(request.scope), sessions.new(), max_age=SESSION_S, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
        return resp

    @app.post("/console/logout", include_in_schema=False)
    def logout(request: Request):
        sessions.drop(request.scope.get(SCOPE_SESSION))
        resp = Response(status_code=204)
        resp.delete_cookie(cookie_name(request.scope), path="/", httponly=True, samesite="strict")
        return resp

    @app.get("/console/static/{name:path}", include_in_schema=False)
    def static_file(name: str):
        path = static.get(name)
        if path is None:
            raise ApiError(404, f"no console file {name!r}", code="not_found")
        return FileResponse(path)

    # -- the pages' JSON -------------------------------------------------------------------------
    @app.get("/console/api/session", include_in_schema=False)
    def session(request: Request):
        token = request.scope.get(SCOPE_SESSION)
        actions = sorted({m["action"] for r in app.routes if (m := ACTION_ROUTE.match(getattr(r, "path", "")))
                          and "POST" in getattr(r, "methods", ())})
        return {"csrf": sessions.csrf(token), "actions": actions}

    @app.get("/console/api/jobs", include_in_schema=False)
    def jobs():
        return {"data": [reader.job_row(j) for j in reversed(store.all_jobs())], "runs": reader.pulled_runs()}

    @app.get("/console/api/jobs/{job_id}", include_in_schema=False)
    def job(job_id: str):
        return {"job": reader.job_row(reader.job(job_id)), "config": reader.config_text(job_id)}

    @app.get("/console/api/jobs/{job_id}/metrics", include_in_schema=False)
    def job_metrics(job_id: str):
        return reader.chart_data(job_id)

    @app.get("/console/api/jobs/{job_id}/samples", include_in_schema=False)
    def job_samples(job_id: str, step: int | None = None):
        return reader.samples(job_id, step)

    @app.get("/console/api/compare", include_in_schema=False)
    def compare(a: str = "", b: str = ""):
        return reader.compare(a, b)
