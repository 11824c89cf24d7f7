"""LLM-judge reward Lambda: a chat model behind any OpenAI-compatible endpoint grades each response.

Standard library only (urllib); deploy this file as it is with handler ``llm_judge.lambda_handler``
(python3.11; give the Lambda a timeout above JUDGE_TIMEOUT_S x (JUDGE_RETRIES + 1) and reach to the
endpoint). The judge can be a Bedrock model (``https://bedrock-mantle.<region>.api.aws/v1`` with a Bedrock
API key), a fine-tuned model on ``grpo serve``, vLLM, or any server that answers ``/chat/completions``.

Event and answer: Bedrock RFT's reward contract (a JSON list of trajectories, or ``{"trajectories": [...]}``;
one ``{"id", "aggregate_reward_score", "metrics_list"}`` per trajectory, same order).

Configuration, from environment variables as a Lambda's (read on every call):

==========================  =====================================================================
JUDGE_BASE_URL              required: the endpoint's base, ending in /v1
JUDGE_MODEL                 required: the judge's model id
JUDGE_API_KEY               bearer key (a Bedrock API key, grpo serve's --api-key); empty: none sent
JUDGE_RUBRIC                the grading instructions, sent as the system message (DEFAULT_RUBRIC; set
                            but empty: no system message)
JUDGE_PROMPT                the user message, a template with {question}, {response}, {reference} and
                            {max_score} (DEFAULT_PROMPT; write literal braces as {{ }})
JUDGE_MAX_SCORE             top of the judge's scale (10); the reward is score / JUDGE_MAX_SCORE, 0..1
JUDGE_SCORE_PATTERN         regular expression whose group 1 is the score; the LAST match in the reply
                            counts (default ``score\\s*[:=]\\s*(-?\\d+(?:\\.\\d+)?)``, case-insensitive)
JUDGE_TIMEOUT_S             seconds per request (30)
JUDGE_RETRIES               further attempts after a timeout, a connection error, 429 or 5xx (2), waiting
                            1, 2, 4 ... s (a Retry-After header up to 20 s wins)
JUDGE_MAX_TOKENS            the judge's max_tokens (512)
JUDGE_TEMPERATURE           the judge's temperature (0)
JUDGE_REASONING_EFFORT      sent as reasoning_effort when set (low | medium | high)
JUDGE_CONCURRENCY           requests in flight per invocation (4)
==========================  =====================================================================

Failures are per trajectory and never a zero: when the judge cannot be reached after the retries, answers
with an HTTP error, or its reply holds no score in 0..JUDGE_MAX_SCORE, that trajectory's entry has no
``aggregate_reward_score`` and an ``error`` naming why (with the start of the judge's reply), so the reward
runner counts it as a failed trajectory (``on_failure``: fail the step, or skip the sample). A configuration
mistake (a variable missing or not a number, a pattern without a group) fails the whole call, naming it.

Metrics: ``judge_score`` (the judge's raw score, type Metric) and ``judge_attempts`` (requests it took).
"""

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

DEFAULT_RUBRIC = (
    "You are a strict grader. You are shown a task, a reference answer and a response to grade. Judge only "
    "whether the response is correct and complete with respect to the reference answer; ignore style. Give "
    "an integer score from 0 (wrong) to {max_score} (fully correct), and end your reply with a line "
    "'Score: N'.")
DEFAULT_PROMPT = (
    "Task:\n{question}\n\nReference answer:\n{reference}\n\nResponse to grade:\n{response}\n\n"
    "Grade the response from 0 to {max_score}. End with 'Score: N'.")
DEFAULT_PATTERN = r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)"
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
# What may follow a number and still belong to it: digits, a decimal point with digits, an exponent.
_NUMBER_TAIL = re.compile(r"(?:\d|\.\d|[eE][+-]?\d)[\w.+-]*")


class ConfigError(ValueError):
    """A configuration mistake: the whole call fails with this message."""


class JudgeFailure(Exception):
    """One trajectory could not be graded; the message says why."""

    def __init__(self, message, attempts=1):
        super().__init__(message)
        self.attempts = attempts


# ------------------------------------------------------------------------------ configuration
def _number(env, name, default, parse, ok, bound):
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = parse(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected a number") from None
    if not ok(value):
        raise ConfigError(f"{name}={text!r}: must be {bound}")
    return value


def load_config(env=None):
    """The judge's settings from `env` (default os.environ); ConfigError naming the variable."""
    env = os.environ if env is None else env
    cfg = {"base_url": env.get("JUDGE_BASE_URL", "").strip().rstrip("/"), "model": env.get("JUDGE_MODEL", "").strip(),
           "api_key": env.get("JUDGE_API_KEY", "").strip()}
    for name in ("JUDGE_BASE_URL", "JUDGE_MODEL"):
        if not cfg[name[6:].lower()]:
            raise ConfigError(f"{name} is not set (the judge's endpoint and model id come from the environment)")
    if not cfg["base_url"].startswith(("http://", "https://")):
        raise ConfigError(f"JUDGE_BASE_URL={cfg['base_url']!r}: expected an http:// or https:// URL ending in /v1")
    cfg["max_score"] = _number(env, "JUDGE_MAX_SCORE", 10.0, float, lambda v: 0 < v < float("inf"), "> 0")
    cfg["timeout_s"] = _number(env, "JUDGE_TIMEOUT_S", 30.0, float, lambda v: 0 < v < float("inf"), "> 0")
    cfg["retries"] = _number(env, "JUDGE_RETRIES", 2, int, lambda v: 0 <= v <= 10, "an integer in 0..10")
    cfg["max_tokens"] = _number(env, "JUDGE_MAX_TOKENS", 512, int, lambda v: v >= 1, "an integer >= 1")
    cfg["temperature"] = _number(env, "JUDGE_TEMPERATURE", 0.0, float, lambda v: 0 <= v <= 2, "in 0..2")
    cfg["concurrency"] = _number(env, "JUDGE_CONCURRENCY", 4, int, lambda v: 1 <= v <= 64, "an integer in 1..64")
    cfg["reasoning_effort"] = env.get("JUDGE_REASONING_EFFORT", "").strip() or None
    cfg["rubric"] = env["JUDGE_RUBRIC"] if "JUDGE_RUBRIC" in env else DEFAULT_RUBRIC  # set but empty: no system message
    cfg["prompt"] = env.get("JUDGE_PROMPT") or DEFAULT_PROMPT
    pattern = env.get("JUDGE_SCORE_PATTERN") or DEFAULT_PATTERN
    try:
        cfg["pattern"] = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"JUDGE_SCORE_PATTERN={pattern!r}: not a regular expression ({exc})") from None
    if cfg["pattern"].groups < 1:
        raise ConfigError(f"JUDGE_SCORE_PATTERN={pattern!r}: needs a group, e.g. (\\d+), around the score")
    for name in ("rubric", "prompt"):
        try:
            _fill(cfg[name], question="q", response="r", reference="a", max_score=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"JUDGE_{name.upper()}: bad template ({type(exc).__name__}: {exc}); the fields are "
                              "{question}, {response}, {reference}, {max_score} (literal braces as {{ }})") from None
    return cfg


def _fill(template, **fields):
    return template.format(**fields)


# ------------------------------------------------------------------------------ the trajectory
def _text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def split_trajectory(trajectory):
    """(question, response, reference) as text: the messages before the last assistant message (one user
    message as it is, several as 'role: content' lines), that message's content, the reference."""
    messages = [m for m in trajectory.get("messages") or [] if isinstance(m, dict)]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    response = _text(messages[last].get("content")) if last is not None else ""
    before = messages[:last] if last is not None else messages
    if len(before) == 1:
        question = _text(before[0].get("content"))
    else:
        question = "\n".join(f"{m.get('role')}: {_text(m.get('content'))}" for m in before)
    ref = trajectory.get("reference_answer")
    if ref is None:
        ref = (trajectory.get("metadata") or {}).get("reference_answer")
    if isinstance(ref, dict) and isinstance(ref.get("text"), str):
        reference = ref["text"]
    elif isinstance(ref, str):
        reference = ref
    else:
        reference = json.dumps(ref, ensure_ascii=False)
    return question, response, reference


def parse_score(reply, pattern, max_score):
    """The judge's score: the last match of `pattern` in the reply (thinking removed); JudgeFailure when there
    is none, it is not a finite number, or it lies outside 0..max_score. The number is read whole where the
    match stops inside one ("Score: 1e400" or "Score: 7.5.1" are not 1 or 7.5)."""
    text = _THINK.sub("", reply or "")
    matches = list(pattern.finditer(text))
    if not matches:
        raise JudgeFailure(f"the judge's reply has no score (JUDGE_SCORE_PATTERN {pattern.pattern!r} does not "
                           f"match): {_excerpt(text)}")
    last = matches[-1]
    raw = last.group(1)
    if raw is None:
        raise JudgeFailure(f"the judge's reply has no score (the pattern's group did not match): {_excerpt(text)}")
    tail = _NUMBER_TAIL.match(text, last.end(1))
    if tail and tail.group(0):
        raise JudgeFailure(f"the judge's score {raw + tail.group(0)!r} is not a plain number: {_excerpt(text)}")
    try:
        score = float(raw)
    except ValueError:
        raise JudgeFailure(f"the judge's score {raw!r} is not a number: {_excerpt(text)}") from None
    if not math.isfinite(score) or not 0 <= score <= max_score:
        raise JudgeFailure(f"the judge's score {raw} is outside 0..{max_score:g}: {_excerpt(text)}")
    return score


def _excerpt(text, limit=200):
    text = " ".join(text.split())
    return repr(text[:limit] + (" ..." if len(text) > limit else ""))


# ------------------------------------------------------------------------------ the request
def _post(cfg, body):
    """One chat.completions request: the reply's text, or an exception (HTTPError, URLError, timeout)."""
    req = urllib.request.Request(cfg["base_url"] + "/chat/completions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    if cfg["api_key"]:
        req.add_header("Authorization", f"Bearer {cfg['api_key']}")
    with urllib.request.urlopen(req, timeout=cfg["timeout_s"]) as resp:
        data = json.loads(resp.read().decode("utf-8"))
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise JudgeFailure(f"the judge's endpoint answered without choices[0].message: {_excerpt(json.dumps(data))}")
    return _text(message.get("content"))


def _http_error_text(exc):
    try:
        detail = exc.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the body is only quoted
        detail = ""
    return f"HTTP {exc.code} from {exc.url}: {_excerpt(detail)}"


def ask_judge(cfg, trajectory, context=None):
    """(raw score, attempts) for one trajectory; JudgeFailure saying why not."""
    question, response, reference = split_trajectory(trajectory)
    fields = {"question": question, "response": response, "reference": reference, "max_score": f"{cfg['max_score']:g}"}
    body = {"model": cfg["model"], "temperature": cfg["temperature"], "max_tokens": cfg["max_tokens"],
            "messages": ([{"role": "system", "content": _fill(cfg["rubric"], **fields)}] if cfg["rubric"] else [])
            + [{"role": "user", "content": _fill(cfg["prompt"], **fields)}]}
    if cfg["reasoning_effort"]:
        body["reasoning_effort"] = cfg["reasoning_effort"]
    attempts, last = 0, ""
    for attempt in range(cfg["retries"] + 1):
        attempts = attempt + 1
        wait = 2.0 ** attempt
        try:
            reply = _post(cfg, body)
        except urllib.error.HTTPError as exc:
            last = _http_error_text(exc)
            if exc.code not in RETRY_STATUS:
                raise JudgeFailure(f"the judge's endpoint refused the request: {last}", attempts) from None
            after = exc.headers.get("Retry-After") if exc.headers else None
            if after and after.strip().isdigit():
                wait = min(float(after), 20.0)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"{type(reason).__name__}: {reason} ({cfg['base_url']})"
        except (ValueError, UnicodeDecodeError) as exc:
            last = f"the judge's endpoint answered with something that is not JSON: {exc}"
        else:
            try:
                return parse_score(reply, cfg["pattern"], cfg["max_score"]), attempts
            except JudgeFailure as exc:
                exc.attempts = attempts
                raise
        if attempt == cfg["retries"]:
            break
        remaining = context.get_remaining_time_in_millis() / 1000 if hasattr(context, "get_remaining_time_in_millis") else None
        if remaining is not None and remaining < wait + cfg["timeout_s"] + 1:
            last += " (no time left in this invocation to retry)"
            break
        time.sleep(wait)
    raise JudgeFailure(f"the judge could not be reached after {attempts} attempt(s): {last}", attempts)


def grade(cfg, trajectory, context=None):
    """One answer entry: the normalized score and metrics, or the id and an `error` (no score)."""
    tid = trajectory.get("id")
    try:
        raw, attempts = ask_judge(cfg, trajectory, context)
    except JudgeFailure as exc:
        return {"id": tid, "error": f"llm_judge: {exc}", "metrics_list": [
            {"name": "judge_attempts", "value": float(exc.attempts), "type": "Metric"}]}
    return {"id": tid, "aggregate_reward_score": raw / cfg["max_score"], "metrics_list": [
        {"name": "judge_score", "value": raw, "type": "Metric"},
        {"name": "judge_attempts", "value": float(attempts), "type": "Metric"}]}


def lambda_handler(event, context):
    """Bedrock RFT reward entry point: every trajectory of the batch graded by the judge, in order."""
    cfg = load_config()
    trajectories = event if isinstance(event, list) else (event or {}).get("trajectories", [])
    if not trajectories:
        return []
    with ThreadPoolExecutor(min(cfg["concurrency"], len(trajectories))) as pool:
        return list(pool.map(lambda t: grade(cfg, t, context), trajectories))
