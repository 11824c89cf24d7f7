"""`RolloutBatch`: a sampler's responses as they are decoded (each sample's token ids, decoded answer and
reasoning, group and sample index), and `pack`, which turns them into the step's grpo.batch.StepBatch (the
tensors, and the sampler's own token log-probs when it has them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from grpo.batch import StepBatch, pack_step
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

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    def pack(self, pad_id: int, sampler_logprobs: list[list[float]] | None = None,
             response_masks: list[list[int]] | None = None) -> StepBatch:
        """The step batch: right-padded tensors, and `sampler_logprobs` (one per response token, under the
        sampler; None when the sampler is the trained policy) in the same layout; `response_masks`: which
        response tokens the model sampled (multi-turn rollouts with tools; None: all)."""
        return pack_step(self.prompt_ids, self.response_ids, pad_id, group=self.group, sample=self.sample,
                         truncated=self.truncated, contents=self.contents, reasoning=self.reasoning,
                         sampler_logprobs=sampler_logprobs, response_masks=response_masks)
