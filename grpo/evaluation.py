"""Sample responses for a set of records and grade them with the reward runner.

Used for the validation reward during training (`val_score_rewards_mean`, verl's
`val-score/rewards/mean@1`: one sample per prompt) and by `grpo eval` for the baseline before
training and the held-out score after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grpo.rollout import GEN_BATCH, encode_prompt, generate


@dataclass
class EvalResult:
    scores: list[float | None]
    response_lengths: list[int]
    truncated: list[bool]
    failures: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    @property
    def graded(self) -> list[float]:
        return [s for s in self.scores if s is not None]

    @property
    def mean(self) -> float:
        g = self.graded
        return sum(g) / len(g) if g else float("nan")


def build_trajectories(records, rollout) -> list[dict]:
    """One Lambda-contract trajectory per sampled response (the event Bedrock would send)."""
    from grpo.reward import make_trajectory

    out = []
    for i in range(len(rollout)):
        rec = records[rollout.group[i]]
        out.append(make_trajectory(rec.id, rollout.sample[i], rec.messages, rollout.contents[i],
                                   rec.reference_answer, rec.metadata, reasoning_content=rollout.reasoning[i]))
    return out


def sample_and_score(model, tokenizer, records, runner, *, temperature: float, max_new_tokens: int,
                     reasoning_effort: str = "low", top_p: float = 1.0, n: int = 1, batch_size: int = GEN_BATCH,
                     prompt_ids: list[list[int]] | None = None, keep_samples: bool = False,
                     sampler=None) -> EvalResult:
    """Sample `n` responses per record (with `sampler`, a grpo.samplers backend, when given; else
    transformers generation on `model`) and grade them with `runner`."""
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tokenizer, r.messages, reasoning_effort=reasoning_effort, tools=r.tools) for r in records]
    if sampler is not None:
        rollout = sampler.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p).batch
    else:
        rollout = generate(model, tokenizer, prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, batch_size=batch_size)
    trajectories = build_trajectories(records, rollout)
    result = runner.score(trajectories)
    samples = []
    if keep_samples:
        samples = [{"id": t["id"], "response": rollout.contents[i], "reasoning_content": rollout.reasoning[i],
                    "score": result.scores[i]} for i, t in enumerate(trajectories)]
    return EvalResult(scores=list(result.scores), response_lengths=[len(r) for r in rollout.response_ids],
                      truncated=list(rollout.truncated), failures=list(result.failures), metrics=result.summary(),
                      samples=samples)


def _remote_choices(client, model: str, rec, want: int, params: dict) -> tuple[list, int]:
    """`want` chat completions for one record (asked for with n; a server that returns fewer is asked again)."""
    from grpo.remote import RemoteError

    choices, tokens = [], 0
    for _ in range(want):
        kw = dict(params, model=model, messages=rec.messages, n=want - len(choices))
        if rec.tools:
            kw["tools"] = rec.tools
        resp = client.chat.completions.create(**kw)
        if not resp.choices:
            raise RemoteError(f"the endpoint returned no choices for record {rec.id}")
        choices += sorted(resp.choices, key=lambda c: c.index)
        tokens += resp.usage.completion_tokens if resp.usage else 0
        if len(choices) >= want:
            break
    return choices[:want], tokens


def sample_and_score_remote(client, model: str, records, runner, *, temperature: float, max_tokens: int,
                            top_p: float = 1.0, n: int = 1, reasoning_effort: str | None = None,
                            seed: int | None = None, concurrency: int = 4, keep_samples: bool = False) -> EvalResult:
    """The same grading as `sample_and_score`, sampling through an OpenAI-compatible endpoint instead.

    One chat.completions request per record (n samples each), `concurrency` in flight. Response lengths
    come from the usage block (completion tokens; with n > 1 each sample gets the request's mean), and
    a sample is truncated when its finish_reason is "length".
    """
    from concurrent.futures import ThreadPoolExecutor

    from grpo.reward import make_trajectory

    params: dict = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    if reasoning_effort is not None:
        params["reasoning_effort"] = reasoning_effort
    if seed is not None:
        params["seed"] = seed
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        answers = list(pool.map(lambda rec: _remote_choices(client, model, rec, n, params), records))
    trajectories, lengths, truncated, texts = [], [], [], []
    for rec, (choices, tokens) in zip(records, answers):
        for i, c in enumerate(choices):
            extra = c.message.model_extra or {}
            reasoning = extra.get("reasoning_content") or extra.get("reasoning")
            text = c.message.content or ""
            trajectories.append(make_trajectory(rec.id, i, rec.messages, text, rec.reference_answer, rec.metadata,
                                                reasoning_content=reasoning if isinstance(reasoning, str) else None))
            lengths.append(round(tokens / len(choices)))
            truncated.append(c.finish_reason == "length")
            texts.append((text, reasoning))
    result = runner.score(trajectories)
    samples = []
    if keep_samples:
        samples = [{"id": t["id"], "response": texts[i][0], "reasoning_content": texts[i][1],
                    "score": result.scores[i]} for i, t in enumerate(trajectories)]
    return EvalResult(scores=list(result.scores), response_lengths=lengths, truncated=truncated,
                      failures=list(result.failures), metrics=result.summary(), samples=samples)
