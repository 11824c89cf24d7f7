"""What a rollout returns: `RolloutBatch` (each sample's token ids, decoded answer and reasoning, group and
sample index), `Sampled` (a batch plus the sampler's own token log-probs when it has them), and `pack`, which
lays a batch out as right-padded tensors for the log-prob and update passes."""

from __future__ import annotations

from dataclasses import dataclass, field

from grpo.rollout.prompts import split_reasoning


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    contents: list[str] = field(default_factory=list)
    reasoning: list[str | None] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)  # hit inference_max_tokens without an end token
    group: list[int] = field(default_factory=list)  # index of the prompt within the step
    sample: list[int] = field(default_factory=list)  # index of the response within its group

    def __len__(self) -> int:
        return len(self.response_ids)

    def add(self, tokenizer, prompt: list[int], response: list[int], *, truncated: bool, group: int, sample: int,
            specials: list[str]) -> None:
        """One sampled response: decoded with special tokens kept, then split into (content, reasoning)."""
        content, reasoning = split_reasoning(tokenizer.decode(response, skip_special_tokens=False), specials)
        self.prompt_ids.append(prompt)
        self.response_ids.append(response)
        self.contents.append(content)
        self.reasoning.append(reasoning)
        self.truncated.append(truncated)
        self.group.append(group)
        self.sample.append(sample)








@dataclass
class Sampled:
    batch: RolloutBatch
    logprobs: list[list[float]] | None  # per response token, under the sampler; None: the sampler is the policy
