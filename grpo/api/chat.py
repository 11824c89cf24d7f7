"""`/v1/chat/completions` and `/v1/responses`: request checking, and OpenAI's objects and event streams.

Chat streams are `data: <chat.completion.chunk>` lines ending with `data: [DONE]`; a response stream is
OpenAI's typed event sequence (`response.created`, `response.in_progress`, per output item
`response.output_item.added` / `response.content_part.added` / deltas / `...done`, then
`response.completed`, or `response.incomplete` when `max_output_tokens` cut it). Thinking text (Qwen3
`<think>`, harmony's analysis channel) is a chat message's `reasoning_content` (vLLM's field) and a
response's `reasoning` item with `reasoning_text` content. Parameters this server cannot honour
(stop, logprobs, penalties, structured output, legacy `functions`, non-function tools) are a 400 naming them,
not silently ignored.

Tools (docs/tools_api.md): `tools` are rendered by the model's chat template and the response is parsed back into
OpenAI tool calls by grpo.rollout.tools; `tool_choice` `required` or a named function constrains decoding to a
call (grpo.rollout.constrain); `none` renders no tools and parses no call. History may hold assistant
`tool_calls` and `role: tool` results (responses: `function_call` / `function_call_output` items). While a
response streams, text that may be the start of a call is held back; calls are sent when the response ends.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Iterator

from grpo.api.errors import bad_request
from grpo.api.inference import ModelCache, TextSplitter, stream_tokens
from grpo.api.store import new_id

EFFORTS = {"low": "low", "medium": "medium", "high": "high", "minimal": "low", "none": "low", "xhigh": "high"}
UNSUPPORTED_CHAT = {"functions": [], "function_call": None, "logprobs": False, "top_logprobs": 0, "stop": None,
                    "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "audio": None, "prediction": None}
UNSUPPORTED_RESPONSES = {"previous_response_id": None, "conversation": None, "background": False,
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


def _string(m: dict, key: str, param: str) -> str:
    v = m.get(key)
    if not isinstance(v, str) or not v:
        raise bad_request(f"{param}.{key}: expected a non-empty string", f"{param}.{key}")
    return v


def _tool_call(c, param: str) -> dict:
    """An assistant message's tool call, OpenAI's shape; `arguments` is the JSON text of an object."""
    if not isinstance(c, dict) or c.get("type", "function") != "function" or not isinstance(c.get("function"), dict):
        raise bad_request(f"{param}: expected {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                          f"\"arguments\"}}}}", param)
    fn = c["function"]
    name, args = _string(fn, "name", f"{param}.function"), fn.get("arguments")
    if not isinstance(args, str):
        where = f"{param}.function.arguments"
        raise bad_request(f"{where}: expected the arguments as a JSON string", where)
    return {"id": _string(c, "id", param), "type": "function", "function": {"name": name, "arguments": args}}


def _message(m, param: str) -> dict:
    if not isinstance(m, dict):
        raise bad_request(f"{param}: expected a message object", param)
    role = m.get("role")
    role = {"developer": "system"}.get(role, role) if isinstance(role, str) else None
    if role not in ("system", "user", "assistant", "tool"):
        raise bad_request(f"{param}.role: expected system, developer, user, assistant or tool, got {m.get('role')!r}",
                          f"{param}.role")
    out = {"role": role, "content": _text(m.get("content"), f"{param}.content", role)}
    if role == "tool":
        out["tool_call_id"] = _string(m, "tool_call_id", param)
    calls = m.get("tool_calls") if role == "assistant" else None
    if calls is not None:
        if not isinstance(calls, list):
            raise bad_request(f"{param}.tool_calls: expected a list of tool calls", f"{param}.tool_calls")
        if calls:
            out["tool_calls"] = [_tool_call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls)]
    return out


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
        param = f"input[{i}]"
        if kind == "reasoning":
            continue
        if kind == "function_call":  # consecutive calls are one assistant turn
            call = _tool_call({"id": item.get("call_id"), "type": "function",
                               "function": {"name": item.get("name"), "arguments": item.get("arguments")}}, param)
            if out and out[-1]["role"] == "assistant" and out[-1].get("_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call], "_calls": True})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", param),
                        "content": _text(item.get("output"), f"{param}.output", "tool")})
        elif kind == "message":
            out.append(_message(item, param))
        else:
            raise bad_request(f"{param}: only message, function_call and function_call_output items are supported "
                              f"(got type {kind!r})", param)
    return [{k: v for k, v in m.items() if k != "_calls"} for m in out]


# -- tools -------------------------------------------------------------------------------------------------
@dataclass
class Tools:
    """A request's tools in chat form (for the template and the parser), its tool_choice (`auto`, `none`,
    `required` or `("function", NAME)`) and parallel_tool_calls."""

    tools: list[dict]
    choice: object
    parallel: bool

    @property
    def active(self) -> bool:
        """Tools are rendered and calls parsed (not with tool_choice none)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def constrained(self) -> bool:
        return self.active and self.choice != "auto"


def request_tools(body: dict, *, responses: bool) -> Tools:
    """`tools`, `tool_choice` and `parallel_tool_calls` checked; responses' flat function tools made chat's."""
    from grpo.data import _check_tools
    from grpo.rollout.constrain import ToolChoiceError, function_name, normalize_tool_choice

    raw = body.get("tools")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise bad_request("tools: expected a list of function tools", "tools")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise bad_request(f"tools[{i}].type: {kind!r} tools are not supported by this local server (only "
                              f"'function')", f"tools[{i}].type")
        if responses:
            t = {"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                  if k in t}}
        tools.append(t)
    for field, msg in _check_tools(tools):
        field = field.replace(".function.", ".") if responses else field
        raise bad_request(f"{field}: {msg}", field)
    names = [function_name(t) for t in tools]
    try:
        choice = normalize_tool_choice(body.get("tool_choice"), names)
    except ToolChoiceError as e:
        raise bad_request(str(e), e.param) from None
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request(f"parallel_tool_calls: expected true or false, got {parallel!r}", "parallel_tool_calls")
    return Tools(tools, choice, parallel is not False)


# -- one generated choice ----------------------------------------------------------------------
class ToolSetup:
    """What a request's tools need at generation: the template family, the end tokens (harmony's `<|call|>`
    ends a call's turn) and, for `required` or a named function, a fresh grammar constraint per choice."""

    def __init__(self, loaded, tools: Tools, effort: str):
        from grpo.rollout.constrain import call_end_ids
        from grpo.rollout.tools import template_family

        self.tools, self.family = tools, template_family(loaded.tokenizer)
        self.ends = sorted(set(loaded.ends) | call_end_ids(loaded.tokenizer, self.family))
        self.grammar = None
        if tools.constrained:
            from grpo.errors import UserError
            from grpo.rollout.constrain import ToolChoiceError, ToolConstraints, call_grammar

            try:
                self.grammar = call_grammar(loaded.tokenizer, self.family, tools.tools, tools.choice,
                                            parallel=tools.parallel, thinking=effort != "low")
                vocab = loaded.model.get_output_embeddings().weight.shape[0]
                self.constraints = ToolConstraints.for_tokenizer(loaded.tokenizer, vocab, loaded.ends)
                self._first = self.constraints.new(self.grammar, self.family)  # a schema it cannot compile: a 400
            except ToolChoiceError as e:
                raise bad_request(str(e), e.param) from None
            except UserError as e:  # llguidance missing
                raise bad_request(str(e), "tool_choice") from None

    def constraint(self):
        """A fresh matcher for one choice (None when nothing is constrained)."""
        if self.grammar is None:
            return None
        first, self._first = self._first, None
        return first or self.constraints.new(self.grammar, self.family)


class Choice:
    """Iterate for (content delta, reasoning delta); afterwards: content, reasoning, tool_calls, tokens,
    finish_reason.

    `source` replaces the model's sampled tokens with given ones (a recorded generation). With `tools` (a
    ToolSetup whose tools are active) the response is parsed into tool calls at the end, and content that may
    be a call is not streamed (hermes: from `<tool_call>` on; harmony: anything outside the final channel)."""

    def __init__(self, cache: ModelCache, loaded, prompt_ids: list[int], params: dict, source=None,
                 tools: ToolSetup | None = None):
        self.cache, self.loaded, self.prompt_ids, self.params, self.source = cache, loaded, prompt_ids, params, source
        self.tools = tools if tools is not None and tools.tools.active else None
        self.constraint = self.tools.constraint() if self.tools else None
        self.tool_calls: list[dict] = []
        self.parse_error = None
        self.tokens, self.aborted = None, False

    def abort(self) -> None:
        """Stop this choice's generation at its next token (the client went away); safe from any thread."""
        if self.tokens is not None and hasattr(self.tokens, "abort"):
            self.tokens.abort()
        self.aborted = True

    def _visible(self, sp: TextSplitter) -> str:
        """The content that may be streamed so far."""
        text = sp.content
        if self.tools.family == "harmony":
            return text if "<|channel|>final" in sp.text else ""
        cut = text.find("<tool_call>")
        if cut >= 0:
            text = text[:cut]
        else:
            for k in range(len("<tool_call>") - 1, 0, -1):
                if text.endswith("<tool_call>"[:k]):
                    text = text[:-k]
                    break
        return text.rstrip()

    def _content_delta(self, sp: TextSplitter, c: str) -> str:
        if self.tools is None:
            return c
        vis = self._visible(sp)
        if vis.startswith(self.sent) and len(vis) > len(self.sent):
            c, self.sent = vis[len(self.sent):], vis
            return c
        return ""

    def __iter__(self) -> Iterator[tuple[str, str]]:
        ends = self.tools.ends if self.tools else None
        sp = TextSplitter(self.loaded, ends)
        self.sent = ""
        if self.aborted:
            return
        tokens = self.source if self.source is not None else stream_tokens(
            self.cache, self.loaded, self.prompt_ids, constraint=self.constraint, ends=ends, **self.params)
        self.tokens = tokens
        for tok in tokens:
            c, r = sp.push(tok)
            c = self._content_delta(sp, c)
            if c or r:
                yield c, r
        c, r = sp.finish()
        self.content, self.reasoning = sp.final_content, sp.final_reasoning
        if self.tools is not None:
            from grpo.rollout.tools import parse_assistant

            parsed = parse_assistant(sp.text, self.tools.family, self.tools.tools.tools)
            self.content, self.reasoning = parsed["content"], parsed["reasoning_content"]
            self.tool_calls, self.parse_error = parsed["tool_calls"], parsed["parse_error"]
            c = self.content[len(self.sent):] if self.content.startswith(self.sent) else ""
        if c or r:
            yield c, r
        self.tokens, self.reasoning_tokens = len(sp.ids), sp.reasoning_tokens()
        self.finish_reason = "tool_calls" if self.tool_calls else "stop" if sp.hit_end else "length"

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
    msg = {"role": "assistant", "content": c.content or (None if c.tool_calls else ""), "refusal": None}
    if c.tool_calls:
        msg["tool_calls"] = c.tool_calls
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
            for j, call in enumerate(choice.tool_calls):  # each call: its id and name, then its arguments
                fn = call["function"]
                yield chunk(i, {"tool_calls": [{"index": j, "id": call["id"], "type": "function",
                                                "function": {"name": fn["name"], "arguments": ""}}]})
                yield chunk(i, {"tool_calls": [{"index": j, "function": {"arguments": fn["arguments"]}}]})
            yield chunk(i, {}, choice.finish_reason)
        if include_usage:
            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "system_fingerprint": None, "choices": [], "usage": chat_usage(prompt_tokens, choices)})
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in the stream
        yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None, "code": None}})
    yield "data: [DONE]\n\n"
