"""Rollouts where tools run: an environment file's functions as tools, and the multi-turn sampling loop.

`ToolEnvironment(path)`: the file's public functions (grpo.reward.tool_functions) in persistent worker
processes (grpo.reward.workers: the reward handlers' isolation, explicit environment, timeouts; a hung tool is
killed and its worker replaced, a crash reported), never imported by the trainer. `schemas` are the tools the
prompts show; `run(calls)` executes calls in parallel and gives each its `role: tool` content, or an error.

`rollout_with_tools`: per prompt `n` trajectories, batched across all rows:

    sample a turn -> parse it (grpo.rollout.tools) -> run its calls -> append the results in the template's own
    format -> sample the next turn ... until a turn makes no call, `max_turns` assistant turns were sampled, or
    the trajectory's token budget (`max_new_tokens`, model and tool tokens together, as verl's response_length)
    is spent (tool results that do not fit are cut to it, and the trajectory ends there, truncated).

A finished row leaves the batch: later turns decode only the rows still going. The first turn shares each
prompt's prefill across its group (grpo.rollout.generate); later turns prefill each row's context again (no
KV cache is kept across tool calls). A tool error (exception, timeout, crash) goes back to the model as the
tool's content `error: ...` and is counted. The response of a row is every token after the prompt; its mask
is 1 on the tokens the model sampled and 0 on tool results and template glue, so the loss trains only the
model's own tokens.

`attach_tool_calls`: the single-turn case (records with `tools`, no environment): each sampled response parsed
into the OpenAI assistant message the grader receives, for any rollout backend.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from grpo.batch import StepBatch
from grpo.errors import UserError
from grpo.rollout.batch import RolloutBatch
from grpo.rollout.generate import generate
from grpo.rollout.prompts import encode_prompt, pad_token_id
from grpo.rollout.tools import (
    continuation_text,
    end_texts,
    openai_message,
    parse_assistant,
    template_family,
    tool_message,
)


@dataclass
class Conversation:
    """A prompt's messages and the tools its prompt shows (None: no tools)."""

    messages: list[dict]
    tools: list[dict] | None = None


@dataclass
class ToolResult:
    content: str  # what the model reads as the tool's answer
    error: str | None = None  # the failure (error | timeout | crash), None when the tool answered


class ToolEnvironment:
    """An environment file's tools in `concurrency` worker processes; `close()` stops them."""

    def __init__(self, path: str, *, timeout_s: float = 30.0, concurrency: int = 2, env: dict | None = None,
                 pass_env: list[str] | tuple = (), startup_timeout_s: float = 120.0):
        from grpo.reward.tool_functions import TOOLS_ENTRY
        from grpo.reward.workers import HandlerLoadError, WorkerPool

        p = Path(path)
        if not p.is_file():
            raise UserError(f"engine.environment: {path} not found (give a .py file of plain Python functions, the tools)")
        if p.suffix != ".py":
            raise UserError(f"engine.environment: {path} is not a .py file (a file of plain Python functions, the tools)")
        self.path, self.timeout_s = str(p.resolve()), float(timeout_s)
        self._log_dir = tempfile.mkdtemp(prefix="grpo-tools-")
        try:
            self._pool = WorkerPool(self.path, TOOLS_ENTRY, concurrency, self.timeout_s, Path(self._log_dir),
                                    startup_timeout_s, env={str(k): str(v) for k, v in (env or {}).items()},
                                    pass_env=tuple(pass_env))
        except HandlerLoadError as exc:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            raise UserError(f"engine.environment {path} could not be loaded: {exc}") from None
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="tools")
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, self._executor, self._log_dir)
        got = self._pool.call(json.dumps({"schemas": True}).encode())
        if got.kind is not None:
            self.close()
            raise UserError(f"engine.environment {path}: listing its tools failed: {got.message}")
        self.schemas: list[dict] = json.loads(got.answer)
        self.names = [s["function"]["name"] for s in self.schemas]

    def _one(self, name: str, arguments: dict) -> ToolResult:
        out = self._pool.call(json.dumps({"name": name, "arguments": arguments}).encode())
        if out.kind is None:
            return ToolResult(json.loads(out.answer)["content"])
        first = out.message.splitlines()[0] if out.message else out.kind
        return ToolResult(f"error: {first}", error=f"[{out.kind}] {name}: {out.message}")

    def run(self, calls: list[tuple[str, dict]]) -> list[ToolResult]:
        """Each (name, arguments) call's result, in order; calls run in parallel on the workers."""
        return list(self._executor.map(lambda c: self._one(*c), calls))

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> ToolEnvironment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shutdown(pool, executor, log_dir) -> None:
    pool.close()
    executor.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(log_dir, ignore_errors=True)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def attach_tool_calls(batch: StepBatch, tokenizer, conversations: list[Conversation]) -> StepBatch:
    """Single turn: each response of a prompt with tools parsed into its OpenAI assistant message
    (`batch.messages`, `batch.parse_errors`); `contents` / `reasoning` become the message's. No-op without tools."""
    if not any(c.tools for c in conversations):
        return batch
    family = template_family(tokenizer)
    ids, plen, rlen = batch.packed.input_ids, batch.prompt_lengths, batch.response_lengths
    batch.messages, batch.parse_errors = [], []
    for i in range(len(batch)):
        conv = conversations[int(batch.group[i])]
        if not conv.tools:
            batch.messages.append(None)
            batch.parse_errors.append(None)
            continue
        start = int(plen[i])
        parsed = parse_assistant(_decode(tokenizer, ids[i, start:start + int(rlen[i])].tolist()), family, conv.tools)
        batch.messages.append([openai_message(parsed)])
        batch.parse_errors.append(parsed["parse_error"])
        batch.contents[i], batch.reasoning[i] = parsed["content"], parsed["reasoning_content"]
    return batch


@dataclass
class _Row:
    conversation: Conversation
    context: list[int]  # prompt + response so far
    prompt_len: int
    group: int
    sample: int
    mask: list[int]
    messages: list[dict]
    turns: int = 0
    calls: int = 0
    errors: int = 0
    parse_error: str | None = None
    truncated: bool = False
    max_turns_hit: bool = False
    done: bool = False

    @property
    def response(self) -> list[int]:
        return self.context[self.prompt_len:]


def rollout_with_tools(model, tokenizer, prompts: list[list[int]], conversations: list[Conversation],
                       env: ToolEnvironment, *, n: int, max_new_tokens: int, max_turns: int, temperature: float,
                       top_p: float = 1.0, reasoning_effort: str = "low") -> StepBatch:
    """`n` multi-turn trajectories per prompt (see the module docstring); the StepBatch carries the response
    mask of the model's own tokens, every row's messages and `tool_stats`."""
    family = template_family(tokenizer)
    vocab = tokenizer.get_vocab()
    stop = [vocab[t] for t in end_texts(family) if t in vocab]  # harmony: a call (<|call|>) ends the turn
    rows = [_Row(conversations[g], list(p), len(p), g, s, [], []) for g, p in enumerate(prompts) for s in range(n)]
    tool_seconds, errors_seen = 0.0, []
    active = rows
    turn = 0
    while active:
        budget = max(max_new_tokens - len(r.response) for r in active)
        if turn == 0:  # every row is at its prompt: one prefill per prompt for its whole group
            out = generate(model, tokenizer, prompts, n=n, max_new_tokens=budget, temperature=temperature,
                           top_p=top_p, stop_ids=stop)
        else:
            out = generate(model, tokenizer, [r.context for r in active], n=1, max_new_tokens=budget,
                           temperature=temperature, top_p=top_p, stop_ids=stop)
        turn += 1
        pending: list[tuple[_Row, list[dict]]] = []
        for r, sampled, cut in zip(active, out.response_ids, out.truncated):
            room = max_new_tokens - len(r.response)
            if len(sampled) > room:
                sampled, cut = sampled[:room], True
            r.context += sampled
            r.mask += [1] * len(sampled)
            r.turns += 1
            parsed = parse_assistant(_decode(tokenizer, sampled), family, r.conversation.tools)
            r.messages.append(openai_message(parsed))
            r.parse_error = r.parse_error or parsed["parse_error"]
            if cut:
                r.truncated, r.done = True, True
            elif not parsed["tool_calls"]:
                r.done = True
            elif r.turns >= max_turns:
                r.max_turns_hit, r.done = True, True
            else:
                pending.append((r, parsed["tool_calls"]))
        if pending:
            t0 = time.perf_counter()
            calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for _, cs in pending for c in cs]
            results = iter(env.run(calls))
            tool_seconds += time.perf_counter() - t0
            for r, cs in pending:
                answers = []
                for c in cs:
                    res = next(results)
                    r.calls += 1
                    if res.error:
                        r.errors += 1
                        errors_seen.append(res.error)
                    answers.append(tool_message(c, res.content))
                glue = continuation_text(tokenizer, r.conversation.messages + r.messages, answers,
                                         tools=r.conversation.tools, reasoning_effort=reasoning_effort)
                glue_ids = tokenizer(glue, add_special_tokens=False)["input_ids"]
                r.messages += answers
                room = max_new_tokens - len(r.response)
                if len(glue_ids) >= room:  # no room for another turn: the results cut to the budget (as verl)
                    glue_ids, r.truncated, r.done = glue_ids[:room], True, True
                r.context += glue_ids
                r.mask += [0] * len(glue_ids)
        active = [r for r in rows if not r.done]

    batch = RolloutBatch()
    for r in rows:
        last = next(m for m in reversed(r.messages) if m["role"] == "assistant")
        batch.prompt_ids.append(r.context[:r.prompt_len])
        batch.response_ids.append(r.response)
        batch.contents.append(last["content"])
        batch.reasoning.append(last.get("reasoning_content"))
        batch.truncated.append(r.truncated)
        batch.group.append(r.group)
        batch.sample.append(r.sample)
    step = batch.pack(pad_token_id(tokenizer, model), response_masks=[r.mask for r in rows])
    step.messages = [r.messages for r in rows]
    step.parse_errors = [r.parse_error for r in rows]
    step.tool_stats = {"turns": [r.turns for r in rows], "calls": [r.calls for r in rows],
                       "errors": [r.errors for r in rows], "max_turns": [r.max_turns_hit for r in rows],
                       "seconds": tool_seconds, "error_messages": errors_seen[:3]}
    return step


class ToolSampler:
    """The transformers sampler with tools that run (engine.environment): `generate` takes each prompt's
    Conversation and runs `rollout_with_tools`; the environment's workers live until `close`."""

    name = "transformers"

    def __init__(self, policy, tokenizer, env: ToolEnvironment, *, max_turns: int, reasoning_effort: str = "low"):
        self.policy, self.tok, self.env = policy, tokenizer, env
        self.max_turns, self.reasoning_effort = max_turns, reasoning_effort

    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, conversations: list[Conversation] | None = None) -> StepBatch:
        if conversations is None:
            raise ValueError("a rollout with tools needs each prompt's conversation")
        return rollout_with_tools(self.policy, self.tok, prompts, conversations, self.env, n=n,
                                  max_new_tokens=max_new_tokens, max_turns=self.max_turns, temperature=temperature,
                                  top_p=top_p, reasoning_effort=self.reasoning_effort)

    def sleep(self) -> None:
        pass

    def sync(self, policy) -> None:
        pass

    def close(self) -> None:
        self.env.close()


def conversation_prompt(tokenizer, conversation: Conversation, reasoning_effort: str = "low") -> list[int]:
    """A conversation's prompt ids (its tools rendered by the template)."""
    return encode_prompt(tokenizer, conversation.messages, reasoning_effort=reasoning_effort, tools=conversation.tools)
