"""An environment file's tools: its plain Python functions, described as OpenAI function schemas and called by
name. Runs inside the worker process that imports the file (grpo.reward.workers with the entry TOOLS_ENTRY), so
the trainer never imports user code. Standard library only.

A tool is every public function defined in the file (not imported into it, name not starting with `_`). Its
schema (what `transformers.utils.get_json_schema` and TRL's `tools=` make of a function):

- `name`: the function's name; `description`: the docstring up to its `Args:` section;
- `parameters`: an object with one property per parameter, its JSON type from the type hint (`int` -> integer,
  `float` -> number, `str` -> string, `bool` -> boolean, `list[X]` -> array of X, `dict` -> object,
  `Literal[...]` -> enum, `X | None` -> X, nullable), its description from the `Args:` line `name: text` or
  `name (type): text`; parameters without a default are `required`. A parameter without a type hint, or with
  `*args` / `**kwargs`, is an error naming the function: the model could not be told what to pass.

A call `{"name", "arguments"}` returns `{"content": str}`: a string result as it is, anything else as JSON
(`str()` for what JSON cannot hold). An exception is the worker's error frame, with the function's traceback.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing

#: The worker's entry name that serves an environment file's tools instead of a Lambda handler.
TOOLS_ENTRY = "*tools*"

_SIMPLE = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}


def _json_type(hint, where: str) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if origin is typing.Literal:
        kinds = {_SIMPLE.get(type(a)) for a in args}
        out: dict = {"enum": list(args)}
        if len(kinds) == 1 and None not in kinds:
            out["type"] = kinds.pop()
        return out
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            schema = _json_type(inner[0], where)
            if len(inner) < len(args) and "type" in schema:
                schema["type"] = [schema["type"], "null"]
            return schema
        return {"anyOf": [_json_type(a, where) for a in args]}
    if origin in (list, tuple, set, frozenset):
        out = {"type": "array"}
        if args and args[0] is not Ellipsis:
            out["items"] = _json_type(args[0], where)
        return out
    if origin is dict:
        return {"type": "object"}
    if hint is typing.Any:
        return {}
    raise TypeError(f"{where}: type hint {hint!r} has no JSON schema type (use int, float, str, bool, list[...], "
                    "dict, Literal[...] or X | None)")


_ARG_LINE = re.compile(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) of a Google-style docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    head, params, current, in_args = [], {}, None, False
    for line in lines:
        stripped = line.strip()
        if re.match(r"^(Args|Arguments|Parameters)\s*:\s*$", stripped):
            in_args = True
            continue
        if in_args and re.match(r"^(Returns?|Raises|Yields|Examples?|Notes?)\s*:\s*$", stripped):
            in_args = False
            current = None
            continue
        if in_args:
            m = _ARG_LINE.match(line)
            if m and not line.startswith("        "):
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current and stripped:
                params[current] = (params[current] + " " + stripped).strip()
        elif not params:
            head.append(line)
    return "\n".join(head).strip(), params


def function_schema(fn) -> dict:
    """The OpenAI tool definition `{"type": "function", "function": {name, description, parameters}}` of `fn`."""
    name = fn.__name__
    description, docs = _docstring_parts(fn.__doc__ or "")
    hints = typing.get_type_hints(fn)
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        where = f"tool {name}, parameter {p.name}"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool {name}: *args / **kwargs cannot be described to the model; name each parameter")
        if p.name not in hints:
            raise TypeError(f"{where}: no type hint (the model is told each parameter's JSON type)")
        schema = _json_type(hints[p.name], where)
        if p.name in docs:
            schema["description"] = docs[p.name]
        props[p.name] = schema
        if p.default is p.empty:
            required.append(p.name)
    parameters = {"type": "object", "properties": props, "required": required}
    return {"type": "function", "function": {"name": name, "description": description or name,
                                             "parameters": parameters}}


def module_tools(module) -> dict:
    """name -> function for every public function the module defines itself."""
    return {n: f for n, f in vars(module).items()
            if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__}


def tool_dispatcher(module):
    """The worker's handler for an environment file: `{"schemas": true}` -> the tool definitions;
    `{"name", "arguments"}` -> `{"content": str}`."""
    tools = module_tools(module)
    if not tools:
        raise ValueError(f"{module.__file__} defines no public function: an environment file's tools are its "
                         "plain Python functions")
    schemas = [function_schema(f) for f in tools.values()]  # errors (a missing type hint) when the file loads

    def handle(event, context):
        if event.get("schemas"):
            return schemas
        name, args = event.get("name"), event.get("arguments") or {}
        if name not in tools:
            raise NameError(f"no tool {name!r} in {module.__file__}")
        result = tools[name](**args)
        if isinstance(result, str):
            return {"content": result}
        return {"content": json.dumps(result, ensure_ascii=False, default=str)}

    return handle
