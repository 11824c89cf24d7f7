"""Sample responses for a set of records and grade them with the reward runner.

Used for the validation reward during training (`val_score_rewards_mean`, verl's
`val-score/rewards/mean@1`: one sample per prompt) and by `grpo eval` for the baseline before
training and the held-out score after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grpo.rollout.generate import GEN_BATCH, generate
from grpo.rollout.prompts import encode_prompt


@dataclass
class EvalResult:
    scores: list[float | None]
    response_lengths: list[int]
    truncated: list[bool]
    failures: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # each score's trajectory id, `<record id>#<sample>`

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
    for i in range(len(batch)):
        rec = records[int(batch.group[i])]
        out.append(make_trajectory(rec.id, int(batch.sample[i]), rec.messages, batch.contents[i],
                                   rec.reference_answer, rec.metadata, reasoning_content=batch.reasoning[i]))
    return out


def sample_and_score(model, tokenizer, records, runner, *, temperature: float, max_new_tokens: int,
                     reasoning_effort: str = "low", top_p: float = 1.0, n: int = 1, batch_size: int = GEN_BATCH,
                     prompt_ids: list[list[int]] | None = None, keep_samples: bool = False,
                     sampler=None) -> EvalResult:
    """Sample `n` responses per record (with `sampler`, a grpo.rollout.samplers backend, when given; else
    transformers generation on `model`) and grade them with `runner`."""
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tokenizer, r.messages, reasoning_effort=reasoning_effort, tools=r.tools) for r in records]
    if sampler is not None:
        rollout = sampler.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p)
    else:
        rollout = generate(model, tokenizer, prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, batch_size=batch_size)
    trajectories = build_trajectories(records, rollout)
    result = runner.score(trajectories)
    samples = []
    if keep_samples:
        samples = [{"id": t["id"], "response": rollout.contents[i], "reasoning_content": rollout.reasoning[i],
                    "score": result.scores[i], "response_tokens": int(rollout.response_lengths[i])}
                   for i, t in enumerate(trajectories)]
    return EvalResult(scores=list(result.scores), response_lengths=[int(n) for n in rollout.response_lengths],
                      truncated=[bool(t) for t in rollout.truncated], failures=list(result.failures), metrics=result.summary(),
                      samples=samples, ids=[t["id"] for t in trajectories])
