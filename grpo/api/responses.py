"""`/v1/responses`: OpenAI's Response object and its typed event stream (what `client.responses.create(
stream=True)` and `client.responses.stream(...)` parse).

Output items: a `reasoning` item (content `reasoning_text`) when the model thought, then a `message`
item with one `output_text` part (left out when the response is only tool calls), then one `function_call`
item per tool call (streamed as `response.output_item.added`, `response.function_call_arguments.delta` /
`.done`, `response.output_item.done`). Status `incomplete` (reason `max_output_tokens`) when generation hit
the token limit without an end token, else `completed`.
"""

from __future__ import annotations

import time
from typing import Iterator

from grpo.api.chat import Choice, sse
from grpo.api.store import new_id


def _usage(prompt_tokens: int, c: Choice) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": c.tokens, "output_tokens_details": {"reasoning_tokens": c.reasoning_tokens},
            "total_tokens": prompt_tokens + c.tokens}


def _reasoning_item(rid: str, text: str | None, status: str) -> dict:
    return {"id": rid, "type": "reasoning", "summary": [], "status": status,
            "content": [] if text is None else [{"type": "reasoning_text", "text": text}]}


def _message_item(mid: str, text: str | None, status: str) -> dict:
    return {"id": mid, "type": "message", "role": "assistant", "status": status,
            "content": [] if text is None else [_text_part(text)]}


def _call_item(fid: str, call: dict, arguments: str, status: str) -> dict:
    return {"id": fid, "type": "function_call", "status": status, "call_id": call["id"],
            "name": call["function"]["name"], "arguments": arguments}


def _tool_echo(t: dict) -> dict:
    """A request's function tool as the Response object lists it (every field present)."""
    return {"type": "function", "name": t.get("name"), "description": t.get("description"),
            "parameters": t.get("parameters"), "strict": t.get("strict")}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseBuilder:
    def __init__(self, model: str, body: dict, effort: str, params: dict):
        self.id, self.created, self.model = new_id("resp_"), int(time.time()), model
        self.body, self.effort, self.params = body, effort, params
        self.rs_id, self.msg_id = new_id("rs_"), new_id("msg_")
        self.fc_ids: list[str] = []

    def call_ids(self, c: Choice) -> list[str]:
        while len(self.fc_ids) < len(c.tool_calls):
            self.fc_ids.append(new_id("fc_"))
        return self.fc_ids

    def obj(self, status: str, output: list[dict], usage: dict | None = None) -> dict:
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
                "model": self.model, "output": output, "parallel_tool_calls": b.get("parallel_tool_calls") is not False,
                "previous_response_id": None,
                "reasoning": {"effort": self.effort, "summary": None}, "store": False,
                "temperature": self.params["temperature"], "top_p": self.params["top_p"],
                "text": {"format": {"type": "text"}}, "tool_choice": b.get("tool_choice") or "auto",
                "tools": [_tool_echo(t) for t in b.get("tools") or []], "truncation": "disabled",
                "usage": usage, "metadata": b.get("metadata") or {}, "user": None,
                "completed_at": int(time.time()) if status in ("completed", "incomplete") else None}

    def final_output(self, c: Choice) -> list[dict]:
        out = [_reasoning_item(self.rs_id, c.reasoning, "completed")] if c.reasoning else []
        if c.content or not c.tool_calls:
            out.append(_message_item(self.msg_id, c.content, "completed"))
        return out + [_call_item(f, call, call["function"]["arguments"], "completed")
                      for f, call in zip(self.call_ids(c), c.tool_calls)]

    def complete(self, c: Choice, prompt_tokens: int) -> dict:
        status = "incomplete" if c.finish_reason == "length" else "completed"
        return self.obj(status, self.final_output(c), _usage(prompt_tokens, c))

    def stream(self, c: Choice, prompt_tokens: int) -> Iterator[str]:
        seq = iter(range(1 << 30))

        def ev(kind: str, **fields) -> str:
            return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        yield ev("response.created", response=self.obj("in_progress", []))
        yield ev("response.in_progress", response=self.obj("in_progress", []))
        open_item, index, texts = None, -1, {"reasoning": "", "message": ""}

        def close(kind: str) -> Iterator[str]:
            at = {"output_index": index, "content_index": 0}
            if kind == "reasoning":
                text = texts["reasoning"]
                yield ev("response.reasoning_text.done", item_id=self.rs_id, text=text, **at)
                yield ev("response.content_part.done", item_id=self.rs_id, part={"type": "reasoning_text", "text": text}, **at)
                yield ev("response.output_item.done", output_index=index, item=_reasoning_item(self.rs_id, text, "completed"))
            else:
                text = texts["message"]
                yield ev("response.output_text.done", item_id=self.msg_id, text=text, logprobs=[], **at)
                yield ev("response.content_part.done", item_id=self.msg_id, part=_text_part(text), **at)
                yield ev("response.output_item.done", output_index=index, item=_message_item(self.msg_id, text, "completed"))

        def opening(kind: str) -> Iterator[str]:
            at = {"output_index": index, "content_index": 0}
            if kind == "reasoning":
                yield ev("response.output_item.added", output_index=index, item=_reasoning_item(self.rs_id, None, "in_progress"))
                yield ev("response.content_part.added", item_id=self.rs_id, part={"type": "reasoning_text", "text": ""}, **at)
            else:
                yield ev("response.output_item.added", output_index=index, item=_message_item(self.msg_id, None, "in_progress"))
                yield ev("response.content_part.added", item_id=self.msg_id, part=_text_part(""), **at)

        try:
            for content, reasoning in c:
                for kind, delta in (("reasoning", reasoning), ("message", content)):
                    if not delta or (kind == "reasoning" and open_item == "message"):
                        continue  # reasoning after the answer began stays in the final object only
                    if open_item != kind:
                        if open_item is not None:
                            yield from close(open_item)
                        open_item, index = kind, index + 1
                        yield from opening(kind)
                    texts[kind] += delta
                    item_id = self.rs_id if kind == "reasoning" else self.msg_id
                    name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                    extra = {} if kind == "reasoning" else {"logprobs": []}
                    yield ev(name, item_id=item_id, output_index=index, content_index=0, delta=delta, **extra)
            if c.tool_calls:  # a message item only if text came; then one item per call
                if open_item is not None:
                    yield from close(open_item)
                for fid, call in zip(self.call_ids(c), c.tool_calls):
                    index += 1
                    args = call["function"]["arguments"]
                    yield ev("response.output_item.added", output_index=index,
                             item=_call_item(fid, call, "", "in_progress"))
                    yield ev("response.function_call_arguments.delta", item_id=fid, output_index=index, delta=args)
                    yield ev("response.function_call_arguments.done", item_id=fid, output_index=index, arguments=args)
                    yield ev("response.output_item.done", output_index=index,
                             item=_call_item(fid, call, args, "completed"))
            else:
                if open_item == "reasoning" or open_item is None:  # the message item comes last, even if empty
                    if open_item is not None:
                        yield from close(open_item)
                    open_item, index = "message", index + 1
                    yield from opening("message")
                yield from close("message")
            final = self.complete(c, prompt_tokens)
            kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
            yield ev(kind, response=final)
        except Exception as e:  # noqa: BLE001 - headers are sent: report the failure in the stream
            yield ev("error", code="server_error", message=f"generation failed: {e}", param=None)
