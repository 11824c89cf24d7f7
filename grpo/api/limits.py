"""Request size and shape limits: a request body is counted as it arrives (a chunked upload without
Content-Length included) and refused with 413 once past the route's limit, before it is written or parsed
whole; a JSON body nested deeper than `MAX_JSON_DEPTH` is a 400, never a RecursionError, and so is one holding
a lone surrogate (valid JSON, but not text: it could be neither tokenized nor echoed back as UTF-8)."""

from __future__ import annotations

import collections
import json
import os
import threading
import time

from grpo.api.errors import ApiError, bad_request
from grpo.jsonl import SURROGATE_ESCAPE, lone_surrogate

MAX_JSON_DEPTH = 64


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, what: str):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes for {what}",
                         code="request_too_large")


class BodyLimit:
    """ASGI middleware: `limit_for(scope) -> (bytes, description)` or None for no limit. Over the limit, the
    next read raises BodyTooLarge and whatever response the app then starts is replaced by the 413."""

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        limit = self.limit_for(scope) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        cap, what = limit
        state = {"seen": 0, "error": None, "started": False}

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > cap:
                    state["error"] = BodyTooLarge(cap, what)
                    raise state["error"]
            return message

        async def guarded_send(message):
            if state["error"] is not None:  # the app answered after the limit hit: answer 413 instead
                if message["type"] == "http.response.start" and not state["started"]:
                    await self._send_error(send, state)
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if state["error"] is None:
                raise
            if not state["started"]:
                await self._send_error(send, state)

    @staticmethod
    async def _send_error(send, state) -> None:
        err = state["error"]
        state["started"] = True
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _depth_over(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def parse_json_object(raw: bytes) -> dict:
    """The request's JSON object; 400 for bad JSON, a body nested deeper than MAX_JSON_DEPTH, or not an object."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e})") from None
    except RecursionError:
        raise bad_request(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if _depth_over(body, MAX_JSON_DEPTH):
        raise bad_request(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if SURROGATE_ESCAPE.search(raw or b""):
        where = lone_surrogate(body)
        if where:  # valid JSON, but no text: it could not be tokenized, nor echoed back in UTF-8
            raise bad_request(f"{where}: holds a lone surrogate escape (\\ud800-\\udfff without its pair)", where)
    return body


class AuthThrottle:
    """Failed sign-ins (a wrong bearer key on /v1 or /console/api, a wrong key on the console's login form)
    counted per client address over a sliding window. Past `limit` failures in `window_s` seconds, that
    address gets 429 with Retry-After (seconds until its oldest counted failure leaves the window) on every
    request that would check a key, before the key is compared: a guess answered 429 tells nothing, so the
    address can try at most `limit` keys a window. A correct key is never delayed and never counted; while its
    address is throttled it waits like the rest (behind a proxy every client shares the proxy's address).
    The table is bounded (`max_addresses`, least recently failed dropped first)."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, max_addresses: int = 10_000, clock=None):
        self.limit, self.window_s, self.max_addresses = limit, window_s, max_addresses
        self.clock = clock or time.monotonic
        self._fails: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, addr: str, now: float):
        fails = self._fails.get(addr)
        while fails and fails[0] <= now - self.window_s:
            fails.popleft()
        if fails is not None and not fails:
            del self._fails[addr]
            return None
        return fails

    def retry_after(self, addr: str) -> int | None:
        """Seconds to wait when `addr` is throttled, else None."""
        if self.limit <= 0:
            return None
        with self._lock:
            now = self.clock()
            fails = self._recent(addr, now)
            if fails is None or len(fails) < self.limit:
                return None
            return max(1, int(fails[0] + self.window_s - now + 0.999))

    def failed(self, addr: str) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            now = self.clock()
            fails = self._recent(addr, now)
            if fails is None:
                fails = self._fails[addr] = collections.deque(maxlen=self.limit)
            fails.append(now)
            self._fails.move_to_end(addr)
            while len(self._fails) > self.max_addresses:
                self._fails.popitem(last=False)

    @staticmethod
    def address(scope) -> str:
        client = scope.get("client")
        return client[0] if client else "unknown"

    def refusal(self, retry: int):
        """The 429 answer (a Starlette JSONResponse)."""
        from starlette.responses import JSONResponse

        body = ApiError(429, f"Too many failed sign-in attempts from this address; try again in {retry} s.",
                        code="rate_limit_exceeded", type="rate_limit_error").body()
        return JSONResponse(body, status_code=429, headers={"Retry-After": str(retry)})


class PathMask:
    """ASGI middleware: in every JSON answer under /v1 and /console/api (errors, jobs, events, checkpoints),
    this machine's paths are shown as `$STATE` (the state directory) and `$HANDLERS` (the handlers
    directory), as the console shows them; a client learns nothing of the server's disk layout. Streams and
    file downloads (`application/jsonl`, a client's own data) pass untouched."""

    def __init__(self, app, *, paths: dict[str, str]):
        self.app = app
        pairs = []
        for path, name in paths.items():
            for p in {path, os.path.realpath(path)}:
                if p and p != "/":
                    pairs.append((json.dumps(p)[1:-1].encode(), name.encode()))
        self.pairs = sorted(pairs, key=lambda kv: -len(kv[0]))  # the longest first: a path inside another

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(("/v1", "/console/api")) or not self.pairs:
            return await self.app(scope, receive, send)
        held: dict = {}

        async def masked_send(message):
            if message["type"] == "http.response.start":
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                if ctype.split(b";")[0].strip() == b"application/json":
                    held["start"], held["body"] = message, b""
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                body = held.pop("body")
                for path, name in self.pairs:
                    body = body.replace(path, name)
                start = held.pop("start")
                headers = [(k, v) for k, v in start.get("headers") or [] if k != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, masked_send)
