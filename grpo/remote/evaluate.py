"""A remote model (Bedrock, or `grpo serve`) sampled through the OpenAI chat API and graded by the local reward
runner, the same result as `grpo.training.validation.sample_and_score` gives for a local model."""

from __future__ import annotations

from grpo.training.validation import EvalResult


def _remote_choices(client, model: str, rec, want: int, params: dict) -> tuple[list, int]:
    """`want` chat completions for one record (asked for with n; a server that returns fewer is asked again)."""
    from grpo.remote.client import RemoteError, expect_object

    choices, tokens = [], 0
    for _ in range(want):
        kw = dict(params, model=model, messages=rec.messages, n=want - len(choices))
        if rec.tools:
            kw["tools"] = rec.tools
        resp = expect_object(client.chat.completions.create(**kw), "chat completion", str(client.base_url), "choices")
        if not resp.choices:
            raise RemoteError(f"the endpoint returned no choices for record {rec.id}")
        choices += sorted(resp.choices, key=lambda c: c.index)
        tokens += resp.usage.completion_tokens if resp.usage else 0
        if len(choices) >= want:
            break
    return choices[:want], tokens


def sample_and_score_remote(client, model: str, records, runner, *, temperature: float, max_tokens: int,
                            top_p: float = 1.0, n: int = 1, reasoning_effort: str | None = None,
                            seed: int | None = None, concurrency: int = 4, keep_samples: bool = False,
                            progress=None, score_progress=None) -> EvalResult:
    """The same grading as `sample_and_score`, sampling through an OpenAI-compatible endpoint instead.

    One chat.completions request per record (n samples each), `concurrency` in flight. Response lengths
    come from the usage block (completion tokens; with n > 1 each sample gets the request's mean), and
    a sample is truncated when its finish_reason is "length". `progress(1)` after each record's answer,
    `score_progress(k)` as the grading goes (progress bars' updates).
    """
    from concurrent.futures import ThreadPoolExecutor

    from grpo.reward.runner import make_trajectory

    params: dict = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    if reasoning_effort is not None:
        params["reasoning_effort"] = reasoning_effort
    if seed is not None:
        params["seed"] = seed
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        def one(rec):
            got = _remote_choices(client, model, rec, n, params)
            if progress is not None:
                progress(1)
            return got

        answers = list(pool.map(one, records))
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
    result = runner.score(trajectories, progress=score_progress)
    samples = []
    if keep_samples:
        samples = [{"id": t["id"], "response": texts[i][0], "reasoning_content": texts[i][1],
                    "score": result.scores[i], "response_tokens": lengths[i]} for i, t in enumerate(trajectories)]
    return EvalResult(scores=list(result.scores), response_lengths=lengths, truncated=truncated,
                      failures=list(result.failures), metrics=result.summary(), samples=samples,
                      ids=[t["id"] for t in trajectories])
