"""The reward runner: Bedrock RFT's reward Lambda contract, run locally or against a deployed Lambda.

Event (BEDROCK_RFT.md section 2): a JSON list of trajectories, each
``{"id", "messages", "reference_answer", "metadata"}`` built by :func:`make_trajectory`:
``messages`` are the prompt messages plus the sampled response as the last assistant message (with
``reasoning_content`` on it when the response has separate reasoning text); ``reference_answer`` is an
object (a string reference arrives as ``{"text": ...}``, an object as it is); ``metadata`` holds the
original ``reference_answer`` plus every extra field of the record.

Trajectory ids: ``f"{record_id}#{sample_index}"`` (:func:`trajectory_id`), unique within a step
because record ids are unique and the sample index is the text after the LAST ``#``
(:func:`split_trajectory_id` inverts it).

Handlers: a file path (entry ``lambda_handler``), ``path:function``, or a Lambda ARN
``arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]`` (boto3, optional ``endpoint_url``; retries
in :mod:`grpo.reward.lambda_client`). Local files run in persistent worker processes
(:mod:`grpo.reward.workers`), imported once per worker, reused across steps until :meth:`close`;
``env`` adds environment variables for them (the Lambda's configuration, e.g. GSM8K_REWARD_MODE).

Batching: at most ``batch_size`` trajectories per call, fewer when the serialized JSON would pass
``max_payload_bytes`` (Lambda's 6 MiB synchronous limit, applied locally too so that what runs here
runs on Lambda); ``max_concurrency`` calls at once.

Answer checks: a list of the same length, ids equal and in order, a finite numeric
``aggregate_reward_score`` (bool is not numeric), and ``metrics_list`` (optional) a list of
``{"name": non-empty str, "value": finite number, "type": "Reward"|"Metric"}`` with distinct names.
A wrong length / wrong ids fail the whole call; a bad entry fails that trajectory only. An entry
without a score that carries a string ``error`` (``{"id", "error": "judge unreachable"}``, as
rewards/llm_judge.py answers) is such a failure, and its message quotes that error.

Failure policy ``on_failure``: every failure (handler exception or FunctionError, timeout, dead
worker, malformed answer, invoke error after retries, oversized trajectory) is recorded as a
:class:`RewardFailure` with the handler's own error text. ``"fail"`` (default): after the whole call
set finishes, raise :class:`RewardError` (the trainer turns it into a failed step). ``"skip"``: the
failed trajectories get score ``None``, the caller leaves them out, ``summary()["reward_failures"]``
counts them. Never a silent zero.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from grpo.errors import UserError

LAMBDA_MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # synchronous invoke, request and response
DEFAULT_BATCH_SIZE = 64
DEFAULT_TIMEOUT_S = 300.0  # the AWS sample Lambdas' timeout
MAX_TIMEOUT_S = 900.0  # Lambda's maximum timeout: what runs here runs there
ON_FAILURE = ("fail", "skip")
METRIC_TYPES = ("Reward", "Metric")


def trajectory_id(record_id: str, sample_index: int) -> str:
    """The one trajectory id format: ``f"{record_id}#{sample_index}"``."""
    return f"{record_id}#{sample_index}"


def split_trajectory_id(tid: str) -> tuple[str, int]:
    """Inverse of :func:`trajectory_id`: (record_id, sample_index)."""
    record_id, _, index = tid.rpartition("#")
    return record_id, int(index)


def make_trajectory(record_id: str, sample_index: int, prompt_messages: list[dict], response: str,
                    reference_answer: str | dict, metadata: dict | None = None,
                    reasoning_content: str | None = None, response_messages: list[dict] | None = None,
                    tool_call_parse_error: str | None = None, with_tools: bool = False) -> dict:
    """One trajectory of the event, exactly as section 2 of the spec shows it. With tools
    (grpo.rollout.tools), `response_messages` replace the one assistant message: the parsed assistant message
    with its `tool_calls` (single turn), or every assistant turn and `role: tool` result of a multi-turn
    rollout; `metadata["tool_call_parse_error"]` is then the reason a call the model wrote could not be
    taken (it stays in that message's content), None when every call parsed."""
    if response_messages is None:
        assistant: dict[str, Any] = {"role": "assistant", "content": response}
        if reasoning_content is not None:
            assistant["reasoning_content"] = reasoning_content
        response_messages = [assistant]
    extra = {"tool_call_parse_error": tool_call_parse_error} if with_tools else {}
    return {
        "id": trajectory_id(record_id, sample_index),
        "messages": [dict(m) for m in prompt_messages] + [dict(m) for m in response_messages],
        "reference_answer": ({"text": reference_answer} if isinstance(reference_answer, str)
                             else reference_answer),
        # as the spec's example: reference_answer first, then the extras (it wins over a namesake)
        "metadata": {"reference_answer": reference_answer,
                     **{k: v for k, v in (metadata or {}).items() if k != "reference_answer"}, **extra},
    }


@dataclass
class RewardFailure:
    trajectory_ids: list[str]
    kind: str  # error | timeout | crash | malformed | invoke | too_large
    message: str  # the handler's own error text (type: message + last traceback lines)


@dataclass
class RewardResult:
    scores: list[float | None]  # aligned with the trajectories given; None = failed (skip policy)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # metrics_list values by name
    metric_types: dict[str, str] = field(default_factory=dict)  # name -> Reward | Metric (first seen)
    failures: list[RewardFailure] = field(default_factory=list)
    n_calls: int = 0
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return sum(len(f.trajectory_ids) for f in self.failures)

    def summary(self) -> dict[str, float]:
        """Flat numbers for the trainer's log: reward_score_mean, reward_<name>_mean, reward_failures..."""
        ok = [s for s in self.scores if s is not None]
        out: dict[str, float] = {}
        if ok:
            out["reward_score_mean"] = sum(ok) / len(ok)
        for name, values in self.metrics.items():
            if values:
                out[f"reward_{name}_mean"] = sum(values) / len(values)
        out.update(reward_failures=float(self.n_failed), reward_calls=float(self.n_calls),
                   reward_seconds=self.seconds)
        return out


ERROR_DETAIL = ("full", "withheld")


class RewardError(Exception):
    """The handler failed (on_failure="fail"): the message quotes the handler's own error."""

    def __init__(self, message: str, result: RewardResult):
        super().__init__(message)
        self.result = result
        self.failures = result.failures


@dataclass(frozen=True)
class HandlerSpec:
    text: str
    path: str | None = None  # local file
    function: str = "lambda_handler"
    arn: Any = None  # grpo.reward.lambda_client.LambdaArn


def resolve_handler(handler: str) -> HandlerSpec:
    """A file path, ``path:function`` or a Lambda ARN; a UserError says what is wrong."""
    text = str(handler).strip()
    if text.startswith("arn:"):
        from grpo.reward.lambda_client import parse_arn

        return HandlerSpec(text, arn=parse_arn(text))
    path, function = text, "lambda_handler"
    head, sep, tail = text.rpartition(":")
    if sep and head and tail.isidentifier():
        path, function = head, tail
    p = Path(path)
    if not p.is_file():
        raise UserError(f"reward handler file {path} not found (give a .py file, FILE:FUNCTION, "
                        "or a Lambda ARN arn:aws:lambda:REGION:ACCOUNT:function:NAME)")
    if p.suffix != ".py":
        raise UserError(f"reward handler {path} is not a .py file")
    return HandlerSpec(text, path=str(p.resolve()), function=function)


_JSON_TYPES = {bool: "boolean", str: "string", dict: "object", list: "array", type(None): "null"}


def _bad_number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (f"is {_JSON_TYPES.get(type(value), type(value).__name__)} {json.dumps(value)[:40]}, "
                "not a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer past a float's range, e.g. 10**400
        return f"is an integer of {len(str(abs(value)))} digits, too large for a float"
    if not finite:
        return f"is {value}, not a finite number"
    return None


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"entry is {_JSON_TYPES.get(type(entry), type(entry).__name__)}, not an object"
    if "aggregate_reward_score" not in entry:
        if isinstance(entry.get("error"), str) and entry["error"]:  # the handler's own word on this trajectory
            return f"the handler could not grade it: {entry['error'][:2000]}"
        return "entry has no aggregate_reward_score"
    bad = _bad_number(entry["aggregate_reward_score"])
    if bad:
        return f"aggregate_reward_score {bad}"
    metrics = entry.get("metrics_list")
    if metrics is None:
        return None
    if not isinstance(metrics, list):
        return f"metrics_list is {_JSON_TYPES.get(type(metrics), type(metrics).__name__)}, not a list"
    seen = set()
    for m in metrics:
        if not isinstance(m, dict):
            return f"metrics_list item is {_JSON_TYPES.get(type(m), type(m).__name__)}, not an object"
        name = m.get("name")
        if not isinstance(name, str) or not name:
            return f"metrics_list item has name {name!r}, not a non-empty string"
        if name in seen:
            return f"metrics_list names {name!r} twice"
        seen.add(name)
        bad = _bad_number(m.get("value"))
        if bad:
            return f"metrics_list {name!r} value {bad}"
        if m.get("type") not in METRIC_TYPES:
            return f"metrics_list {name!r} has type {m.get('type')!r}, not 'Reward' or 'Metric'"
    return None


def check_answer(body: bytes | str, ids: list[str]) -> tuple[list[dict | None], list[RewardFailure]]:
    """Parse and check one call's answer: per trajectory the entry (or None) and the failures."""
    def whole(problem: str) -> tuple[list[dict | None], list[RewardFailure]]:
        return [None] * len(ids), [RewardFailure(list(ids), "malformed", f"malformed answer: {problem}")]

    try:
        answer = json.loads(body)
    except ValueError as exc:
        return whole(f"not JSON ({exc}): {bytes(body[:200]) if isinstance(body, bytes) else body[:200]!r}")
    if not isinstance(answer, list):
        kind = _JSON_TYPES.get(type(answer), type(answer).__name__)
        return whole(f"expected a JSON list of {len(ids)} entries, got {kind}: {json.dumps(answer)[:200]}")
    if len(answer) != len(ids):
        return whole(f"{len(answer)} entries for {len(ids)} trajectories (one per id, same order)")
    for i, (entry, tid) in enumerate(zip(answer, ids)):
        got = entry.get("id") if isinstance(entry, dict) else None
        if got != tid:
            return whole(f"entry {i} has id {got!r}, expected {tid!r} (answers must keep the event's ids "
                         "and order)")
    entries: list[dict | None] = []
    grouped: dict[str, list[str]] = {}
    for entry, tid in zip(answer, ids):
        problem = _entry_problem(entry)
        if problem:
            grouped.setdefault(problem, []).append(tid)
            entries.append(None)
        else:
            entries.append(entry)
    failures = [RewardFailure(tids, "malformed", f"malformed answer: {p} (id {tids[0]!r}"
                              + (f" and {len(tids) - 1} more)" if len(tids) > 1 else ")"))
                for p, tids in grouped.items()]
    return entries, failures


def plan_batches(sizes: list[int], batch_size: int, max_payload: int) -> tuple[list[list[int]], list[int]]:
    """Index batches of <= batch_size whose JSON list (2 + sizes + commas) fits max_payload, plus the
    indices of trajectories that cannot fit in any batch."""
    batches, oversized, current, used = [], [], [], 2
    for i, size in enumerate(sizes):
        if size + 2 > max_payload:
            oversized.append(i)
            continue
        extra = size + (1 if current else 0)
        if current and (len(current) >= batch_size or used + extra > max_payload):
            batches.append(current)
            current, used, extra = [], 2, size
        current.append(i)
        used += extra
    if current:
        batches.append(current)
    return batches, oversized


class RewardRunner:
    """Scores trajectories with one handler; lives for the whole training run (see module docstring)."""

    def __init__(self, handler: str, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_concurrency: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 on_failure: str = "fail", endpoint_url: str | None = None, region: str | None = None,
                 max_retries: int = 8, retry_base_s: float = 0.25, retry_max_s: float = 20.0,
                 max_payload_bytes: int = LAMBDA_MAX_PAYLOAD_BYTES, startup_timeout_s: float = 120.0,
                 env: dict[str, str] | None = None, pass_env: list[str] | tuple = (),
                 error_detail: str = "full", error_log: str | Path | None = None):
        if error_detail not in ERROR_DETAIL:
            raise UserError(f"reward error_detail must be one of {ERROR_DETAIL}, got {error_detail!r}")
        if on_failure not in ON_FAILURE:
            raise UserError(f"reward on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        for name, value in (("batch_size", batch_size), ("max_payload_bytes", max_payload_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"reward {name} must be a positive integer, got {value!r}")
        if max_concurrency is None:
            max_concurrency = min(4, os.cpu_count() or 1)
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise UserError(f"reward max_concurrency must be a positive integer, got {max_concurrency!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise UserError(f"reward timeout must be more than 0 and at most {MAX_TIMEOUT_S:g} s (Lambda's maximum), "
                            f"got {timeout_s!r}")
        self.spec = resolve_handler(handler)
        self.handler = self.spec.text
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        self.timeout_s, self.on_failure = float(timeout_s), on_failure
        self.max_payload_bytes = max_payload_bytes
        self.error_detail, self.error_log = error_detail, (Path(error_log) if error_log else None)
        self._lock = threading.Lock()
        self._log_dir: str | None = None
        if self.spec.arn is not None:
            from grpo.reward.lambda_client import LambdaInvoker

            if env or pass_env:
                raise UserError("reward env variables apply to local handler files only; a deployed "
                                "Lambda has its own environment")

            self._backend = LambdaInvoker(
                self.spec.arn, region=region, endpoint_url=endpoint_url, timeout_s=self.timeout_s,
                max_retries=max_retries, retry_base_s=retry_base_s, retry_max_s=retry_max_s,
                max_pool_connections=max_concurrency)
        else:
            from grpo.reward.workers import HandlerLoadError, WorkerPool

            self._log_dir = tempfile.mkdtemp(prefix="grpo-reward-")
            try:
                self._backend = WorkerPool(self.spec.path, self.spec.function, max_concurrency,
                                           self.timeout_s, Path(self._log_dir), startup_timeout_s,
                                           env={str(k): str(v) for k, v in (env or {}).items()},
                                           pass_env=tuple(pass_env))
            except HandlerLoadError as exc:
                shutil.rmtree(self._log_dir, ignore_errors=True)
                raise UserError(f"reward handler {self.handler} could not be loaded: {exc}") from None
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="reward")
        self._finalizer = weakref.finalize(self, _shutdown, self._backend, self._executor, self._log_dir)

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (or the boto3 client) and remove their logs; idempotent."""
        self._finalizer()

    def _call(self, payload: bytes, ids: list[str]) -> tuple[list[dict | None], list[RewardFailure]]:
        outcome = self._backend.call(payload)
        if outcome.kind is not None:
            return [None] * len(ids), [RewardFailure(list(ids), outcome.kind, outcome.message)]
        if len(outcome.answer) > self.max_payload_bytes:
            return [None] * len(ids), [RewardFailure(list(ids), "error", (
                f"Function.ResponseSizeTooLarge: answer is {len(outcome.answer)} bytes, over Lambda's "
                f"{self.max_payload_bytes} byte response limit"))]
        return check_answer(outcome.answer, ids)

    def score(self, trajectories: list[dict], progress: Callable[[int], None] | None = None) -> RewardResult:
        """Score every trajectory (see the module docstring for checks and the failure policy).
        ``progress(n)`` is called with the number of trajectories each finished call covered."""
        if not self._finalizer.alive:
            raise RuntimeError("RewardRunner is closed")
        ids = [t.get("id") if isinstance(t, dict) else None for t in trajectories]
        if not all(isinstance(i, str) and i for i in ids):
            raise ValueError("every trajectory must be a dict with a non-empty string 'id'")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"trajectory ids must be unique within a call; {dup!r} repeats")
        with self._lock:
            return self._score(trajectories, ids, progress)

    def _score(self, trajectories, ids, progress) -> RewardResult:
        start = time.perf_counter()
        encoded = []
        for t in trajectories:
            try:
                encoded.append(json.dumps(t, separators=(",", ":")).encode())
            except (TypeError, ValueError) as exc:
                raise ValueError(f"trajectory {t['id']!r} is not JSON-serialisable: {exc}") from None
        batches, oversized = plan_batches([len(e) for e in encoded], self.batch_size, self.max_payload_bytes)
        entries: list[dict | None] = [None] * len(trajectories)
        failures = [RewardFailure([ids[i]], "too_large", (
            f"trajectory is {len(encoded[i])} bytes as JSON, over the {self.max_payload_bytes} byte "
            "synchronous Lambda payload limit; it fits in no batch")) for i in oversized]
        try:
            futures = {self._executor.submit(self._call, b"[" + b",".join(encoded[i] for i in batch) + b"]",
                                             [ids[i] for i in batch]): batch for batch in batches}
        except RuntimeError:  # the executor was shut down: close() ran in another thread
            raise RuntimeError("RewardRunner is closed") from None
        for future in as_completed(futures):
            batch = futures[future]
            got, failed = future.result()
            for i, entry in zip(batch, got):
                entries[i] = entry
            failures.extend(failed)
            if progress is not None:
                progress(len(batch))
        if progress is not None and oversized:
            progress(len(oversized))
        if failures and self.error_detail == "withheld":
            failures = self._withhold(failures)
        result = RewardResult(scores=[None] * len(trajectories), failures=failures, n_calls=len(batches))
        for i, entry in enumerate(entries):
            if entry is None:
                continue
            result.scores[i] = float(entry["aggregate_reward_score"])
            for m in entry.get("metrics_list") or ():
                result.metrics.setdefault(m["name"], []).append(float(m["value"]))
                result.metric_types.setdefault(m["name"], m["type"])
        result.seconds = time.perf_counter() - start
        if failures and self.on_failure == "fail":
            first = failures[0]
            raise RewardError(
                f"reward handler {self.handler} failed on {result.n_failed} of {len(trajectories)} "
                f"trajectories ({len(failures)} failure(s)); first: [{first.kind}] trajectories "
                f"{', '.join(first.trajectory_ids[:3])}{' ...' if len(first.trajectory_ids) > 3 else ''}: "
                f"{first.message}", result)
        return result


    def _withhold(self, failures: list[RewardFailure]) -> list[RewardFailure]:
        """The failures with their text replaced by a note (kind and ids stay); the text is appended to
        ``error_log`` for whoever runs the handler. A handler's error can quote what an upstream service
        answered (a judge endpoint's reply), which a server does not pass on to the client that sent the job."""
        if self.error_log is not None:
            try:
                with open(self.error_log, "a", encoding="utf-8") as f:
                    for fail in failures:
                        f.write(json.dumps({"time": time.time(), "kind": fail.kind, "ids": fail.trajectory_ids,
                                            "message": fail.message}) + "\n")
            except OSError:
                pass  # the note below still says the text was withheld
        where = f" (in {self.error_log.name} of the run, for the operator)" if self.error_log else ""
        return [RewardFailure(f.trajectory_ids, f.kind, f"the handler's error text is withheld by this server"
                              f"{where}") for f in failures]


def _shutdown(backend: Any, executor: ThreadPoolExecutor, log_dir: str | None) -> None:
    backend.close()  # first: calls in flight end now (their workers are killed), then the threads
    executor.shutdown(wait=True, cancel_futures=True)
    if log_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
