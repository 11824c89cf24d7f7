"""Tool calling in the model's own chat template: rendering `tools` and tool results, and parsing a sampled
response into an OpenAI assistant message.

Three template families (`template_family`):

- `qwen3`: templates with a hermes-style tools section (Qwen3, Qwen2.5, Hermes): the schemas in the system
  turn inside `<tools></tools>`, a call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, a
  result comes back as a user turn `<tool_response>\\n...\\n</tool_response>`.
- `harmony`: GPT-OSS. The schemas are a TypeScript `namespace functions` in the developer message; a call is
  a message `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>` (the recipient
  may also stand before the channel), a result `<|start|>functions.NAME to=assistant<|channel|>commentary
  <|message|>...<|end|>`.
- `chatml_fallback`: a template without a tools section (SmolLM2's ChatML, the embedded tiny model). The
  tools are not dropped: the hermes instructions and schemas are put into the system message (a system
  message of the record's own comes first, then the tools text), calls are parsed hermes-style, and tool
  results go back as user turns in `<tool_response>` tags. Said once per model as a warning on stderr.

`parse_assistant(text, family, tools)` -> `{"role": "assistant", "content", "tool_calls", "reasoning_content",
"parse_error"}`. `text` is the decoded response with special tokens kept. A call that is not valid JSON, names
a function not in `tools`, or has arguments the function's schema rejects (`validate_arguments`) stays in
`content` as the text the model wrote and `parse_error` says why; nothing is dropped. `openai_message` gives
the message without `parse_error` and without empty fields, as the OpenAI API and a Bedrock grader read it.
With `tools=None` nothing is parsed as a call: the content is what `split_reasoning` has always given.

`render_messages` renders a conversation (tool calls and `role: tool` results included) through the model's
template, and `continuation_text` is the text that follows a sampled assistant turn when its tool results are
appended (the multi-turn rollout's glue): rendered by the template itself, as the difference between the
conversation with and without the results.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from typing import Any

from grpo.models.loading import chat_template_kwargs

FAMILIES = ("qwen3", "harmony", "chatml_fallback")

#: The hermes instructions Qwen3's template writes; the chatml fallback writes the same text.
_HERMES_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_HERMES_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")

#: Template text that is not part of a message's content (stripped after parsing).
_TEMPLATE_TOKENS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|return|>", "<|call|>", "<|end|>",
                    "<|start|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|eot_id|>", "</s>")

_warned: set[str] = set()


def _template_text(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(tpl, dict):  # several named templates: the default one, and a tool_use one if present
        tpl = "\n".join(str(v) for v in tpl.values())
    return str(tpl)


def template_family(tokenizer) -> str:
    """`qwen3` (hermes `<tool_call>` section), `harmony` (GPT-OSS) or `chatml_fallback` (no tools section)."""
    tpl = _template_text(tokenizer)
    if "<|channel|>" in tpl and "functions" in tpl:
        return "harmony"
    if "<tool_call>" in tpl and "tools" in tpl:
        return "qwen3"
    return "chatml_fallback"


def _warn_fallback(tokenizer) -> None:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _warned:
        _warned.add(name)
        print(f"warning: model '{name}': its chat template has no tools section; the tools are written into the "
              "system message and calls are read as hermes-style <tool_call> JSON (docs/tools.md)", file=sys.stderr)


# -- rendering -----------------------------------------------------------------------------------------------
def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _hermes_call(call: dict) -> str:
    fn = call.get("function", call)
    args = _arguments_object(fn.get("arguments", {}))
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def tools_system_text(tools: list[dict]) -> str:
    """The hermes tools section (Qwen3's wording) for a template that has none."""
    return _HERMES_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + _HERMES_TAIL


def _fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Plain role/content messages for a template without tool support: the tools in the system message,
    calls as hermes text, results as user turns in <tool_response> tags (consecutive results share one turn)."""
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            text = (m.get("content") or "").rstrip()
            calls = "\n".join(_hermes_call(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        elif role == "tool":
            block = "<tool_response>\n" + str(m.get("content", "")) + "\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if tools:
        text = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return [{k: v for k, v in m.items() if k != "_tool_turn"} for m in out]


def _harmony_messages(messages: list[dict]) -> list[dict]:
    """GPT-OSS's template reads `thinking` (not reasoning_content) and dumps `arguments` with tojson (an object,
    not the JSON string OpenAI messages carry)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant":
            reasoning = m.pop("reasoning_content", None)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": _arguments_object(c["function"].get("arguments"))}}
                                   if "function" in c else c for c in m["tool_calls"]]
                if reasoning and not m.get("content"):
                    m["thinking"] = reasoning
                m.setdefault("content", "")
                if not m["content"]:
                    m.pop("content")
            elif reasoning:
                m["thinking"] = reasoning
        out.append(m)
    return out


def render_messages(tokenizer, messages: list[dict], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, reasoning_effort: str = "low") -> str:
    """The conversation as the model's template writes it, tools and tool turns included (see the module
    docstring for the fallback)."""
    family = template_family(tokenizer)
    kwargs = chat_template_kwargs(reasoning_effort)
    has_tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if family == "chatml_fallback":
        if tools or has_tool_turns:
            if tools:
                _warn_fallback(tokenizer)
            messages, tools = _fallback_messages(messages, tools), None
    elif family == "harmony":
        messages = _harmony_messages(messages)
        # GPT-OSS's template writes `// description` unguarded: a tool without one (optional in OpenAI's API) gets ""
        tools = [{**t, "function": {"description": "", **t["function"]}} if isinstance(t.get("function"), dict) else t
                 for t in tools or []]
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def render_tool_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
                       reasoning_effort: str = "low") -> str:
    """A record's prompt text (generation prompt appended), its tools rendered as its template does."""
    return render_messages(tokenizer, messages, tools=tools, add_generation_prompt=True,
                           reasoning_effort=reasoning_effort)


def end_texts(family: str) -> tuple[str, ...]:
    """The tokens that end an assistant turn (the last of them is what the sampler stops at)."""
    return ("<|call|>", "<|return|>", "<|end|>") if family == "harmony" else ("<|im_end|>", "<|endoftext|>")


def continuation_text(tokenizer, messages: list[dict], tool_messages: list[dict], *, tools: list[dict] | None = None,
                      reasoning_effort: str = "low") -> str:
    """What follows the last assistant turn of `messages` (a sampled turn that ended with its end token) when
    `tool_messages` are appended and the model is asked to continue: the template's closing text after that end
    token, the results in the template's format, and the next generation prompt.

    The templates do not always render the earlier turns identically once more follows (Qwen3 writes an empty
    think block only into the last assistant turn), so the text is cut at the end token that closes the
    assistant turn: the k-th end token of the longer conversation, k counted in the shorter one."""
    before = render_messages(tokenizer, messages, tools=tools, add_generation_prompt=False,
                             reasoning_effort=reasoning_effort)
    after = render_messages(tokenizer, messages + tool_messages, tools=tools, add_generation_prompt=True,
                            reasoning_effort=reasoning_effort)
    ends = re.compile("|".join(re.escape(t) for t in end_texts(template_family(tokenizer))))
    k = len(ends.findall(before))
    found = list(ends.finditer(after))
    if k == 0 or len(found) < k:
        raise ValueError("the chat template closes no assistant turn with an end token; cannot append tool results")
    return after[found[k - 1].end():]


# -- parsing -------------------------------------------------------------------------------------------------
_THINK = re.compile(r"^\s*<think>(.*?)(?:</think>|$)", re.S)
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


def call_id(index: int, name: str, arguments: str) -> str:
    """A deterministic call id (`call_` + 24 hex digits) from the call's position and text."""
    return "call_" + hashlib.sha256(f"{index}:{name}:{arguments}".encode()).hexdigest()[:24]


_JSON_TYPE = {"string": str, "boolean": bool, "object": dict, "array": list}


def _type_ok(value: Any, typ: str) -> bool:
    if typ == "null":
        return value is None
    if typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float) and value.is_integer())
    if typ == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    want = _JSON_TYPE.get(typ)
    return want is None or isinstance(value, want)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", dict: "object", list: "array"}.get(type(value), type(value).__name__)


def validate_arguments(args: Any, schema: dict | None, path: str = "arguments") -> str | None:
    """None if `args` matches `schema`, else the first mismatch (`arguments.x: ...`). The subset of JSON schema
    OpenAI function definitions use: type (one or a list), properties, required, enum, const, items,
    additionalProperties (false or a schema), anyOf/oneOf; other keywords are not checked."""
    if not isinstance(schema, dict) or not schema:
        return None
    typ = schema.get("type")
    if typ is not None:
        types = typ if isinstance(typ, list) else [typ]
        if not any(_type_ok(args, t) for t in types):
            return f"{path}: expected {' or '.join(map(str, types))}, got {_kind(args)}"
    if "enum" in schema and args not in schema["enum"]:
        return f"{path}: {json.dumps(args)[:60]} is not one of {json.dumps(schema['enum'])[:120]}"
    if "const" in schema and args != schema["const"]:
        return f"{path}: expected {json.dumps(schema['const'])[:60]}"
    for key in ("anyOf", "oneOf"):
        subs = schema.get(key)
        if isinstance(subs, list) and subs and all(validate_arguments(args, s, path) for s in subs):
            return f"{path}: matches none of the {key} schemas"
    if isinstance(args, dict):
        props = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in args:
                return f"{path}: missing required property {name!r}"
        extra = schema.get("additionalProperties", True)
        for name, value in args.items():
            if name in props:
                err = validate_arguments(value, props[name], f"{path}.{name}")
                if err:
                    return err
            elif extra is False:
                return f"{path}: unexpected property {name!r} (allowed: {', '.join(props) or 'none'})"
            elif isinstance(extra, dict):
                err = validate_arguments(value, extra, f"{path}.{name}")
                if err:
                    return err
    if isinstance(args, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(args):
            err = validate_arguments(value, schema["items"], f"{path}[{i}]")
            if err:
                return err
    return None


def _tool_schemas(tools: list[dict] | None) -> dict[str, dict]:
    out = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


def check_call(name: Any, arguments: Any, schemas: dict[str, dict]) -> str | None:
    """Why a call (name, parsed arguments) is not a valid call of one of the tools, or None."""
    if not isinstance(name, str) or not name:
        return "the call has no function name"
    if name not in schemas:
        return f"unknown function {name!r} (tools: {', '.join(schemas) or 'none'})"
    if not isinstance(arguments, dict):
        return f"{name}: arguments must be a JSON object, got {_kind(arguments)}"
    err = validate_arguments(arguments, schemas[name])
    return f"{name}: {err}" if err else None


def _strip_tokens(text: str) -> str:
    for t in _TEMPLATE_TOKENS:
        text = text.replace(t, "")
    return text.strip()


def _make_call(index: int, name: str, arguments: dict) -> dict:
    args = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(index, name, args), "type": "function", "function": {"name": name, "arguments": args}}


def _parse_hermes(text: str, schemas: dict[str, dict]) -> tuple[str, list[dict], list[str]]:
    calls, errors, kept, pos = [], [], [], 0
    for m in _HERMES_CALL.finditer(text):
        body = m.group(1).strip()
        err = None
        if not m.group(0).endswith("</tool_call>"):
            err = "unterminated <tool_call> (no </tool_call>)"
        try:
            obj = json.loads(body)
        except ValueError as exc:
            err = err or f"the call is not valid JSON ({exc})"
            obj = None
        # one call object, or a list of them (SmolLM2's tool-calling data writes `<tool_call>[{...}]</tool_call>`)
        objs = obj if isinstance(obj, list) and obj and all(isinstance(o, dict) for o in obj) else [obj]
        block: list[tuple[str, dict]] = []
        for o in objs if err is None else []:
            if not isinstance(o, dict):
                err = f"the call is JSON {_kind(o)}, not an object with name and arguments"
                break
            args = _arguments_object(o.get("arguments", o.get("parameters", {})))
            err = check_call(o.get("name"), args, schemas)
            if err:
                break
            block.append((o["name"], args))
        if err is None:
            kept.append(text[pos:m.start()])
            calls += [_make_call(len(calls) + k, name, args) for k, (name, args) in enumerate(block)]
        else:
            kept.append(text[pos:m.end()])
            errors.append(err)
        pos = m.end()
    kept.append(text[pos:])
    return "".join(kept), calls, errors


_HARMONY_MSG = re.compile(r"(?:<\|start\|>)?([^<]*(?:<\|channel\|>[^<]*)?(?:<\|constrain\|>[^<]*)?)<\|message\|>(.*?)"
                          r"(<\|end\|>|<\|call\|>|<\|return\|>|(?=<\|start\|>)|$)", re.S)


def _parse_harmony(text: str, schemas: dict[str, dict], with_tools: bool) -> tuple[str, str | None, list[dict], list[str]]:
    finals, analysis, preambles, calls, errors = [], [], [], [], []
    for m in _HARMONY_MSG.finditer(text):
        header, body = m.group(1), m.group(2)
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        channel = channel.group(1) if channel else ""
        recipient = re.search(r"to=(\S+?)(?=\s|<\||$)", header)
        recipient = recipient.group(1) if recipient else None
        if recipient and with_tools:
            name = recipient.removeprefix("functions.")
            try:
                args, err = json.loads(body), None
            except ValueError as exc:
                args, err = None, f"the call's arguments are not valid JSON ({exc})"
            err = err or (None if recipient.startswith("functions.") else f"unknown recipient {recipient!r}")
            err = err or check_call(name, args, schemas)
            if err is None:
                calls.append(_make_call(len(calls), name, args))
            else:
                errors.append(err)
                preambles.append(f"to={recipient} {body}".strip())
        elif channel == "analysis":
            analysis.append(body.strip())
        elif channel == "final":
            finals.append(body)
        else:
            preambles.append(body)
    if not (finals or analysis or preambles or calls or errors):
        return _strip_tokens(text), None, [], []
    reasoning = "\n".join(a for a in analysis if a) or None
    content = finals[-1] if finals else "\n".join(p.strip() for p in preambles if p.strip())
    return _strip_tokens(content), reasoning, calls, errors


def parse_assistant(text: str, family: str, tools: list[dict] | None = None) -> dict:
    """The sampled `text` (decoded with special tokens kept) as an OpenAI assistant message plus `parse_error`
    (None, or why a call in it was not taken: it is then left in `content`). Without tools no call is parsed."""
    if family not in FAMILIES:
        raise ValueError(f"unknown template family {family!r}; known: {', '.join(FAMILIES)}")
    schemas = _tool_schemas(tools)
    calls: list[dict] = []
    errors: list[str] = []
    if family == "harmony" and "<|message|>" in text:
        content, reasoning, calls, errors = _parse_harmony(text, schemas, tools is not None)
    else:
        reasoning = None
        m = _THINK.match(text)
        if m:
            reasoning = m.group(1).strip() or None
            text = text[m.end():]
        if tools is not None:
            text, calls, errors = _parse_hermes(text, schemas)
        content = _strip_tokens(text)
    return {"role": "assistant", "content": content, "tool_calls": calls, "reasoning_content": reasoning,
            "parse_error": "; ".join(errors) if errors else None}


def openai_message(parsed: dict) -> dict:
    """`parse_assistant`'s message as the OpenAI API writes it: no `parse_error`, `tool_calls` and
    `reasoning_content` only when there are some."""
    out = {"role": "assistant", "content": parsed.get("content") or ""}
    if parsed.get("tool_calls"):
        out["tool_calls"] = parsed["tool_calls"]
    if parsed.get("reasoning_content") is not None:
        out["reasoning_content"] = parsed["reasoning_content"]
    return out


def tool_message(call: dict, content: str) -> dict:
    """The `role: tool` message answering `call` (an OpenAI tool call)."""
    return {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": content}
