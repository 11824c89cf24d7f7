"""`/v1/chat/completions` and `/v1/responses`: request checking, and OpenAI's objects and event streams.

Chat streams are `data: <chat.completion.chunk>` lines ending with `data: [DONE]`; a response stream is
OpenAI's typed event sequence (`response.created`, `response.in_progress`, per output item
`response.output_item.added` / `response.content_part.added` / deltas / `...done`, then
`response.completed`, or `response.incomplete` when `max_output_tokens` cut it). Thinking text (Qwen3
`<think>`, harmony's analysis channel) is a chat message's `reasoning_content` (vLLM's field) and a
response's `reasoning` item with `reasoning_text` content. Parameters this server cannot honour
(tools, stop, logprobs, penalties, structured output) are a 400 naming them, not silently ignored.
"""

from __future__ import annotations

import json
import math
import time
from typing import Iterator

from grpo.api.errors import bad_request
from grpo.api.inference import ModelCache, TextSplitter, stream_tokens
from grpo.api.store import new_id

EFFORTS = {"low": "low", "medium": "medium", "high": "high", "minimal": "low", "none": "low", "xhigh": "high"}
UNSUPPORTED_CHAT = {"tools": [], "functions": [], "logprobs": False, "top_logprobs": 0, "stop": None,
                    "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "audio": None, "prediction": None}
UNSUPPORTED_RESPONSES = {"tools": [], "previous_response_id": None, "conversation": None, "background": False,
                         "prompt": None, "top_logprobs": 0}


def sse(data: dict, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"


# -- request checks --------------------------------------------------------------------------
def reject_unsupported(body: dict, table: dict) -> None:
    for key, neutral in table.items():
        if body.get(key) not in (None, neutral):
            raise bad_request(f"{key}: not supported by this local server", key)
    fmt, text = body.get("response_format"), body.get("text")
    if fmt is None and isinstance(text, dict):
        fmt = text.get("format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise bad_request("structured output (response_format / text.format) is not supported by this local server",
                          "response_format" if "response_format" in body else "text.format")


def check_common(body: dict, *, responses: bool = False) -> None:
    """Fields both endpoints take whose type the rest does not check: `stream` a boolean, `metadata` OpenAI's
    (at most 16 string keys of <= 64 characters with string values of <= 512), and a response's
    `instructions` a string."""
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise bad_request(f"stream: expected true or false, got {body['stream']!r}", "stream")
    meta = body.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict) or len(meta) > 16:
            raise bad_request("metadata: expected an object of at most 16 string keys and string values", "metadata")
        for k, v in meta.items():
            if len(k) > 64 or not isinstance(v, str) or len(v) > 512:
                raise bad_request(f"metadata.{k[:64]}: keys are strings of at most 64 characters and values strings "
                                  "of at most 512", "metadata")
    if responses and body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise bad_request(f"instructions: expected a string, got {type(body['instructions']).__name__}",
                          "instructions")


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > hi or v < lo \
            or (lo_open and v == lo):
        raise bad_request(f"{key}: expected a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", key)
    return float(v)


def int_param(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad_request(f"{key}: expected an integer in [{lo}, {hi}], got {v!r}", key)
    return v


def sampling(body: dict, token_keys: tuple[str, ...], default_tokens: int, max_tokens: int) -> dict:
    tokens = None
    for key in token_keys:
        tokens = tokens or int_param(body, key, None, 1, max_tokens)
    return {"temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "max_new_tokens": tokens or default_tokens, "seed": int_param(body, "seed", None, -2**63, 2**63 - 1)}


def effort(value, default: str, param: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or value not in EFFORTS:
        raise bad_request(f"{param}: expected one of {', '.join(EFFORTS)}, got {value!r}", param)
    return EFFORTS[value]


def _text(content, param: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text")
                    and isinstance(part.get("text"), str)):
                raise bad_request(f"{param}[{j}]: only text parts are supported", f"{param}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{param}: expected a string or a list of text parts", param)


def _message(m, param: str) -> dict:
    if not isinstance(m, dict):
        raise bad_request(f"{param}: expected a message object", param)
    role = m.get("role")
    role = {"developer": "system"}.get(role, role) if isinstance(role, str) else None
    if role not in ("system", "user", "assistant"):
        raise bad_request(f"{param}.role: expected system, developer, user or assistant, got {m.get('role')!r}",
                          f"{param}.role")
    return {"role": role, "content": _text(m.get("content"), f"{param}.content", role)}


def include_usage(body: dict) -> bool:
    """`stream_options: {"include_usage": true}` (an object, or null)."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options: expected an object like {\"include_usage\": true}", "stream_options")
    return bool((options or {}).get("include_usage"))


def chat_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: expected a non-empty list of messages", "messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def response_messages(body: dict) -> list[dict]:
    """Responses `input` (a string or a list of messages) with `instructions` as the system message."""
    inp, out = body.get("input"), []
    if isinstance(body.get("instructions"), str):
        out.append({"role": "system", "content": body["instructions"]})
    if isinstance(inp, str):
        return out + [{"role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp:
        raise bad_request("input: expected a string or a non-empty list of messages", "input")
    for i, item in enumerate(inp):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "reasoning":
            continue
        if kind != "message":
            raise bad_request(f"input[{i}]: only messages are supported (got type {kind!r})", f"input[{i}]")
        out.append(_message(item, f"input[{i}]"))
    return out


# -- one generated choice ----------------------------------------------------------------------
class Choice:
    """Iterate for (content delta, reasoning delta); afterwards: content, reasoning, tokens, finish_reason.

    `source` replaces the model's sampled tokens with given ones (a recorded generation)."""

    def __init__(self, cache: ModelCache, loaded, prompt_ids: list[int], params: dict, source=None):
        self.cache, self.loaded, self.prompt_ids, self.params, self.source = cache, loaded, prompt_ids, params, source
        self.tokens, self.aborted = None, False

    def abort(self) -> None:
        """Stop this choice's generation at its next token (the client went away); safe from any thread."""
        if self.tokens is not None and hasattr(self.tokens, "abort"):
            self.tokens.abort()
        self.aborted = True

    def __iter__(self) -> Iterator[tuple[str, str]]:
        sp = TextSplitter(self.loaded)
        if self.aborted:
            return
        tokens = self.source if self.source is not None else stream_tokens(self.cache, self.loaded, self.prompt_ids,
                                                                           **self.params)
        self.tokens = tokens
        for tok in tokens:
            c, r = sp.push(tok)
            if c or r:
                yield c, r
        c, r = sp.finish()
        if c or r:
            yield c, r
        self.content, self.reasoning = sp.final_content, sp.final_reasoning
        self.tokens, self.reasoning_tokens = len(sp.ids), sp.reasoning_tokens()
        self.finish_reason = "stop" if sp.hit_end else "length"

    def run(self) -> "Choice":
        for _ in self:
            pass
        return self


# -- chat completions --------------------------------------------------------------------------
def chat_usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    done = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": sum(c.reasoning_tokens for c in choices)}}


def _assistant(c: Choice) -> dict:
    msg = {"role": "assistant", "content": c.content, "refusal": None}
    if c.reasoning:
        msg["reasoning_content"] = c.reasoning
    return msg


def chat_completion(model: str, choices: list[Choice], prompt_tokens: int) -> dict:
    return {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "message": _assistant(c), "finish_reason": c.finish_reason, "logprobs": None}
                        for i, c in enumerate(choices)],
            "usage": chat_usage(prompt_tokens, choices)}


def chat_stream(model: str, choices: list[Choice], prompt_tokens: int, include_usage: bool) -> Iterator[str]:
    cid, created = new_id("chatcmpl-"), int(time.time())

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": None,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    try:
        for i, choice in enumerate(choices):
            yield chunk(i, {"role": "assistant", "content": ""})
            for c, r in choice:
                yield chunk(i, {**({"reasoning_content": r} if r else {}), **({"content": c} if c else {})})
            yield chunk(i, {}, choice.finish_reason)
        if include_usage:
            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "system_fingerprint": None, "choices": [], "usage": chat_usage(prompt_tokens, choices)})
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in the stream
        yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None, "code": None}})
    yield "data: [DONE]\n\n"
