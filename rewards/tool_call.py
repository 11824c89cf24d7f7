"""Tool-call reward Lambda: grades the function calls in a response against the reference calls.

Standard library only; deploy this file as it is with handler ``tool_call.lambda_handler`` (python3.11).

Event (Bedrock RFT reward contract): a JSON list of trajectories ``{"id", "messages", "reference_answer",
"metadata"}`` (a ``{"trajectories": [...]}`` object is accepted too). grpo puts the sampled response in as an
OpenAI assistant message: ``tool_calls`` (``[{"id", "type": "function", "function": {"name", "arguments":
<JSON string>}}]``), ``content`` and ``reasoning_content``. A call the model wrote but that could not be taken
(bad JSON, unknown function, arguments against the schema) stays in ``content`` and
``metadata["tool_call_parse_error"]`` says why; it scores as no call.

The calls graded are those of every assistant message after the last user message (one message in a
single-turn job; all of a multi-turn trajectory's tool turns).

Reference (``reference_answer``, top level or under ``metadata``): an object with ``tool_calls`` (a list), or one
call; a call is ``{"name", "arguments"}`` or OpenAI's ``{"function": {"name", "arguments"}}``, ``arguments`` an
object or a JSON string. ``{"tool_calls": []}`` means no call is expected. A reference without them RAISES
ValueError naming the trajectory (a data bug, never a silent zero).

Score, in [0, 1], with partial credit: expected and made calls are paired in order; a pair whose names differ
scores 0; a pair with the same name scores 0.5 + 0.5 x (argument keys whose values are equal) / (keys in
either call's arguments). Values compare JSON-normalised: 3 == 3.0, object key order ignored, strings exact.
The score is the sum over pairs divided by max(expected calls, made calls), so a missing or an extra call
costs its share. No call expected: 1.0 for no call, 0.0 otherwise. Exactly the reference calls: 1.0.

Metrics: ``score`` (Reward), ``name_match`` (share of expected calls whose name the paired call has),
``exact_match`` (1 when every call matches name and arguments exactly and the counts agree),
``parse_error`` (1 when the response held a call that could not be parsed), ``calls`` (calls made).
"""

import json


def _normalise(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def _arguments(value, where):
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ValueError(f"{where}: arguments are not valid JSON: {value[:80]!r}") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: arguments must be an object, got {type(value).__name__}")
    return value


def _call(raw, where):
    fn = raw.get("function") if isinstance(raw, dict) and isinstance(raw.get("function"), dict) else raw
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}: a call needs a string name, got {json.dumps(raw)[:120]}")
    return fn["name"], _arguments(fn.get("arguments"), where)


def reference_calls(trajectory):
    tid = trajectory.get("id")
    for ref in (trajectory.get("reference_answer"), (trajectory.get("metadata") or {}).get("reference_answer")):
        if isinstance(ref, str):
            try:
                ref = json.loads(ref)
            except ValueError:
                continue
        if isinstance(ref, dict) and isinstance(ref.get("tool_calls"), list):
            return [_call(c, f"trajectory {tid!r}: reference_answer.tool_calls[{i}]")
                    for i, c in enumerate(ref["tool_calls"])]
        if isinstance(ref, dict) and ("name" in ref or "function" in ref):
            return [_call(ref, f"trajectory {tid!r}: reference_answer")]
    raise ValueError(f"trajectory {tid!r}: reference_answer has no tool_calls list and is not a call "
                     "({\"name\", \"arguments\"})")


def response_calls(trajectory):
    messages = [m for m in trajectory.get("messages") or [] if isinstance(m, dict)]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    calls = []
    for m in messages[last_user + 1:]:
        if m.get("role") == "assistant":
            for c in m.get("tool_calls") or []:
                try:
                    calls.append(_call(c, "response"))
                except ValueError:
                    calls.append((None, {}))  # a call without a usable name or arguments matches nothing
    return calls


def pair_score(expected, made):
    (want_name, want_args), (got_name, got_args) = expected, made
    if want_name != got_name:
        return 0.0
    keys = set(want_args) | set(got_args)
    if not keys:
        return 1.0
    same = sum(1 for k in keys if k in want_args and k in got_args
               and _normalise(want_args[k]) == _normalise(got_args[k]))
    return 0.5 + 0.5 * same / len(keys)


def score_trajectory(trajectory):
    expected, made = reference_calls(trajectory), response_calls(trajectory)
    if not expected:
        score = 1.0 if not made else 0.0
        names = 1.0
    else:
        pairs = list(zip(expected, made))
        score = sum(pair_score(e, m) for e, m in pairs) / max(len(expected), len(made))
        names = sum(1 for e, m in pairs if e[0] == m[0]) / len(expected)
    exact = float(len(expected) == len(made) and all(pair_score(e, m) == 1.0 for e, m in zip(expected, made)))
    parse_error = float(bool((trajectory.get("metadata") or {}).get("tool_call_parse_error")))
    return {"id": trajectory.get("id"), "aggregate_reward_score": score, "metrics_list": [
        {"name": "score", "value": score, "type": "Reward"},
        {"name": "name_match", "value": names, "type": "Metric"},
        {"name": "exact_match", "value": exact, "type": "Metric"},
        {"name": "parse_error", "value": parse_error, "type": "Metric"},
        {"name": "calls", "value": float(len(made)), "type": "Metric"}]}


def lambda_handler(event, context):
    trajectories = event.get("trajectories", event) if isinstance(event, dict) else event
    return [score_trajectory(t) for t in trajectories]
