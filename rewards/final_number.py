"""Final-number reward Lambda: 1.0 when the last integer in the reply equals the reference answer.

Standard library only; deploy this file with handler ``final_number.lambda_handler`` (python3.11, 300 s).
It grades `configs/smollm2.yaml`'s job (single-digit sums asked of SmolLM2-135M-Instruct, "Answer with just
the number."): a small chat model often answers right but buries the number in a sentence, rambles into
other numbers, or never stops; the reward is for the reply whose LAST number is the right one, so GRPO
teaches it to finish with the answer (and, since rambling ends on other numbers, to stop).

Event (Bedrock RFT reward contract): a JSON list of trajectories ``{"id", "messages", "reference_answer",
"metadata"}`` (a ``{"trajectories": [...]}`` object is accepted too). Answer: one ``{"id",
"aggregate_reward_score", "metrics_list"}`` per trajectory, same order.

- The reply is the content of the LAST ``assistant`` message (a string, or the text parts of a list).
- Its answer is its last integer (``-?[0-9]+``, thousands commas removed first); none: score 0.0.
- The reference: ``reference_answer`` (a string, number, or an object's ``text`` / ``answer``; top level or
  under ``metadata``); its ground truth is the number after its last ``####``, or the whole string when it is
  just a number. A reference without one RAISES ValueError naming the trajectory (a data bug, never a
  silent zero).

Metrics: ``accuracy`` (Reward, = the score), ``has_number`` (Metric: the reply contains an integer) and
``just_the_number`` (Metric: the reply, stripped of spaces and a final period, is only the right number).
"""

import re

_INT = re.compile(r"-?[0-9]+")
_STRICT = re.compile(r"####\s*(-?[0-9][0-9,]*)")
_BARE = re.compile(r"\s*(-?[0-9][0-9,]*)\s*")


def _text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def reference_text(trajectory):
    for ref in (trajectory.get("reference_answer"), (trajectory.get("metadata") or {}).get("reference_answer")):
        if isinstance(ref, dict):
            for key in ("text", "answer"):
                value = ref.get(key)
                if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                    return str(value)
        elif isinstance(ref, str) and ref:
            return ref
        elif isinstance(ref, (int, float)) and not isinstance(ref, bool):
            return str(ref)
    return ""


def ground_truth(reference):
    found = _STRICT.findall(reference)
    if found:
        return found[-1].replace(",", "")
    bare = _BARE.fullmatch(reference)
    return bare.group(1).replace(",", "") if bare else None


def response_text(trajectory):
    for message in reversed(trajectory.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return _text(message.get("content"))
    return ""


def last_integer(text):
    found = _INT.findall(re.sub(r"(?<=[0-9]),(?=[0-9]{3})", "", text))
    return found[-1] if found else None


def score_trajectory(trajectory):
    truth = ground_truth(reference_text(trajectory))
    if truth is None:
        raise ValueError(f"trajectory {trajectory.get('id')!r}: reference_answer has no number "
                         f"(got {reference_text(trajectory)[-80:]!r})")
    reply = response_text(trajectory)
    answer = last_integer(reply)
    score = 1.0 if answer is not None and int(answer) == int(truth) else 0.0
    bare = reply.strip().rstrip(".").strip()
    return {
        "id": trajectory.get("id"),
        "aggregate_reward_score": score,
        "metrics_list": [
            {"name": "accuracy", "value": score, "type": "Reward"},
            {"name": "has_number", "value": 1.0 if answer is not None else 0.0, "type": "Metric"},
            {"name": "just_the_number", "value": 1.0 if bare == truth else 0.0, "type": "Metric"},
        ],
    }


def lambda_handler(event, context):
    """Bedrock RFT reward entry point: grade every trajectory of the batch, in order."""
    trajectories = event if isinstance(event, list) else (event or {}).get("trajectories", [])
    return [score_trajectory(t) for t in trajectories]
