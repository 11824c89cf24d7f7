"""GSM8K reward Lambda: AWS's GSM8K grader (verl's ``gsm8k.compute_score``), deployable as it is.

Standard library only; deploy this file with handler ``gsm8k.lambda_handler`` (python3.11, 300 s).

Event (Bedrock RFT reward contract): a JSON list of trajectories
``{"id", "messages", "reference_answer", "metadata"}`` (a ``{"trajectories": [...]}`` object is accepted
too, like AWS's sample). Answer: one ``{"id", "aggregate_reward_score", "metrics_list"}`` per trajectory,
same order.

Grading (verl / AWS sample semantics):
- The response is the content of the LAST ``assistant`` message; only its last 300 characters are read.
- ``strict`` mode (default): the last match of ``#### (-?[0-9.,]+)``, with ``,`` and ``$`` stripped.
- ``flexible`` mode: the last match of ``(-?[0-9.,]+)`` that is not ``""`` or ``"."``, with ``,`` and
  ``$`` stripped. verl's and AWS's flexible mode keep the commas (so ``3,000`` never equals ``3000``);
  we strip them as the spec's wording says, which is the one difference: AWS's Lambda only calls strict
  mode, and with the stripping flexible mode agrees with the human ``is_correct`` labels of all 5,276
  example GSM8K solutions (verl's version disagrees on the 2 whose final answer has a comma).
- Score 1.0 if the extracted string equals the ground truth string, else 0.0 (``format_score`` is 0.0).
- Mode: environment variable ``GSM8K_REWARD_MODE`` = ``strict`` | ``flexible`` (read on every call).

Ground truth: the number after the last ``####`` in the reference, with ``,`` and ``$`` stripped. The
reference is read from the top-level ``reference_answer`` (an object's ``text`` or ``answer``, or a
string), else from ``metadata.reference_answer``. A reference that is just a number (``{"answer": "72"}``)
is accepted as the ground truth itself.

Odd input (decided here, on purpose):
- A trajectory with no assistant message, or with empty content, scores 0.0 with ``format_ok`` 0.0:
  the model produced nothing gradable, which is a legitimate zero.
- A trajectory whose reference has no ground truth number RAISES ValueError naming its id (so the whole
  call fails, visibly): a broken reference is a data bug, and grading it 0 would be a silent zero.
- An unknown ``GSM8K_REWARD_MODE`` raises ValueError.

Metrics: ``accuracy`` (type Reward, equal to the score) and ``format_ok`` (type Metric: 1.0 if a
``#### <number>`` is present in the last 300 characters, whatever the mode).
"""

import os
import re

_SOLUTION_CLIP_CHARS = 300
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")
_BARE_NUMBER = re.compile(r"\s*\$?(\-?[0-9\.\,]+)\s*")
MODES = ("strict", "flexible")


def _clean(number):
    return number.replace(",", "").replace("$", "")


def extract_solution(solution_str, method="strict"):
    """The answer string the grader compares, or None: verl's extract_solution (see module docstring)."""
    if method not in MODES:
        raise ValueError(f"GSM8K_REWARD_MODE must be one of {MODES}, got {method!r}")
    tail = solution_str[-_SOLUTION_CLIP_CHARS:]
    if method == "strict":
        found = _STRICT.findall(tail)
        return _clean(found[-1]) if found else None
    for answer in reversed(_NUMBER.findall(tail)):
        if answer not in ("", "."):
            return _clean(answer)
    return None


def ground_truth(reference_text):
    """The number after the last ``####`` (or a bare number), cleaned; None if there is none."""
    found = _STRICT.findall(reference_text)
    if found:
        return _clean(found[-1])
    bare = _BARE_NUMBER.fullmatch(reference_text)
    if bare and bare.group(1) not in ("", "."):
        return _clean(bare.group(1))
    return None


def _text(value):
    """A message content or reference as text: a string, the text parts of a content list, or ''."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def reference_text(trajectory):
    """The reference as text, from either placement (top-level object/string, or metadata)."""
    for ref in (trajectory.get("reference_answer"), (trajectory.get("metadata") or {}).get("reference_answer")):
        if isinstance(ref, dict):
            for key in ("text", "answer"):
                if isinstance(ref.get(key), (str, int, float)) and not isinstance(ref.get(key), bool):
                    return str(ref[key])
        elif isinstance(ref, str) and ref:
            return ref
        elif isinstance(ref, (int, float)) and not isinstance(ref, bool):
            return str(ref)
    return ""


def response_text(trajectory):
    """Content of the last assistant message, or '' if there is none."""
    for message in reversed(trajectory.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return _text(message.get("content"))
    return ""


def score_trajectory(trajectory, mode="strict"):
    """One answer entry of the contract for one trajectory."""
    truth = ground_truth(reference_text(trajectory))
    if truth is None:
        raise ValueError(
            f"trajectory {trajectory.get('id')!r}: reference_answer has no '#### <number>' ground truth"
            f" (got {reference_text(trajectory)[-80:]!r})"
        )
    response = response_text(trajectory)
    answer = extract_solution(response, mode)
    score = 1.0 if answer is not None and answer == truth else 0.0
    format_ok = 1.0 if _STRICT.search(response[-_SOLUTION_CLIP_CHARS:]) else 0.0
    return {
        "id": trajectory.get("id"),
        "aggregate_reward_score": score,
        "metrics_list": [
            {"name": "accuracy", "value": score, "type": "Reward"},
            {"name": "format_ok", "value": format_ok, "type": "Metric"},
        ],
    }


def lambda_handler(event, context):
    """Bedrock RFT reward entry point: grade every trajectory of the batch, in order."""
    mode = os.environ.get("GSM8K_REWARD_MODE", "strict").strip().lower() or "strict"
    if mode not in MODES:
        raise ValueError(f"GSM8K_REWARD_MODE must be one of {MODES}, got {mode!r}")
    trajectories = event if isinstance(event, list) else (event or {}).get("trajectories", [])
    return [score_trajectory(t, mode) for t in trajectories]
