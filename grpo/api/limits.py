"""Request size and shape limits: a request body is counted as it arrives (a chunked upload without
Content-Length included) and refused with 413 once past the route's limit, before it is written or parsed
whole; a JSON body nested deeper than `MAX_JSON_DEPTH` is a 400, never a RecursionError, and so is one holding
a lone surrogate (valid JSON, but not text: it could be neither tokenized nor echoed back as UTF-8)."""

from __future__ import annotations

import json

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
