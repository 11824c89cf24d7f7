"""Sample responses for a set of records and grade them with the reward runner.

Used for the validation reward during training (`val_score_rewards_mean`, verl's
`val-score/rewards/mean@1`: one sample per prompt) and by `grpo eval` for the baseline before
training and the held-out score after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grpo.rollout.generate import GEN_BATCH, generate
from grpo.rollout.multiturn import Conversation, attach_tool_calls
from grpo.rollout.prompts import encode_prompt, pad_token_id


@dataclass
class EvalResult:
    scores: list[float | None]
    response_lengths: list[int]
    truncated: list[bool]
    failures: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # each score's trajectory id, `<record id>#<sample>`
    tool_calls: list[int] | None = None  # tool calls per trajectory (None: no record has tools)

    @property
    def graded(self) -> list[float]:
        return [s for s in self.scores if s is not None]

    @property
    def mean(self) -> float:
        g = self.graded
        return sum(g) / len(g) if g else float("nan")


def build_trajectories(records, batch) -> list[dict]:
    """One Lambda-contract trajectory per sampled response (the event Bedrock would send); `batch` is a
    grpo.batch.StepBatch or a grpo.rollout.batch.RolloutBatch (the same group, sample and text fields)."""
    from grpo.reward.runner import make_trajectory

    out = []
    messages = getattr(batch, "messages", None)
    for i in range(len(batch)):
        rec = records[int(batch.group[i])]
        tools = messages is not None and messages[i] is not None
        out.append(make_trajectory(rec.id, int(batch.sample[i]), rec.messages, batch.contents[i],
                                   rec.reference_answer, rec.metadata, reasoning_content=batch.reasoning[i],
                                   response_messages=messages[i] if tools else None, with_tools=tools,
                                   tool_call_parse_error=batch.parse_errors[i] if tools else None))
    return out


def tool_calls_per_row(batch) -> list[int] | None:
    """Tool calls each trajectory made (every assistant message's tool_calls), None without tools."""
    messages = getattr(batch, "messages", None)
    if messages is None:
        return None
    return [sum(len(m.get("tool_calls") or []) for m in row if m.get("role") == "assistant") if row else 0
            for row in messages]


def sample_and_score(model, tokenizer, records, runner, *, temperature: float, max_new_tokens: int,
                     reasoning_effort: str = "low", top_p: float = 1.0, n: int = 1, batch_size: int = GEN_BATCH,
                     prompt_ids: list[list[int]] | None = None, keep_samples: bool = False,
                     sampler=None, conversations=None, grammars: list[str | None] | None = None,
                     progress=None, score_progress=None) -> EvalResult:
    """Sample `n` responses per record (with `sampler`, a grpo.rollout.samplers backend, when given; else
    transformers generation on `model`) and grade them with `runner`. `conversations` (grpo.rollout.multiturn:
    each record's messages and the tools its prompt shows; default its own `tools`): what a sampler with
    tools that run (engine.environment) needs; responses to prompts with tools are parsed into tool calls.
    `grammars`: tool-call constraints per record (engine.rollout.tool_choice; single-turn samplers).
    `progress(k)`: k more prompts sampled (per generation chunk; a sampler backend reports once, at its end);
    `score_progress(k)`: k more trajectories graded."""
    if conversations is None:
        conversations = [Conversation(r.messages, r.tools) for r in records]
    more = {"grammars": grammars} if grammars else {}
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tokenizer, c.messages, reasoning_effort=reasoning_effort, tools=c.tools)
                      for c in conversations]
    multiturn = getattr(sampler, "env", None) is not None
    if sampler is not None:
        rollout = sampler.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, **({"conversations": conversations} if multiturn else more))
        if progress is not None:
            progress(len(prompt_ids))
    else:
        rollout = generate(model, tokenizer, prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, batch_size=batch_size, progress=progress, **more).pack(pad_token_id(tokenizer, model))
    if not multiturn:
        attach_tool_calls(rollout, tokenizer, conversations)
    trajectories = build_trajectories(records, rollout)
    result = runner.score(trajectories, progress=score_progress)
    samples = []
    if keep_samples:
        samples = [{"id": t["id"], "response": rollout.contents[i], "reasoning_content": rollout.reasoning[i],
                    "score": result.scores[i], "response_tokens": int(rollout.response_lengths[i]),
                    **({"messages": rollout.messages[i]} if rollout.messages and rollout.messages[i] else {})}
                   for i, t in enumerate(trajectories)]
    return EvalResult(scores=list(result.scores), response_lengths=[int(n) for n in rollout.response_lengths],
                      truncated=[bool(t) for t in rollout.truncated], failures=list(result.failures), metrics=result.summary(),
                      samples=samples, ids=[t["id"] for t in trajectories], tool_calls=tool_calls_per_row(rollout))
