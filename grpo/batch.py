"""A step's samples as tensors, and the one batch a GRPO step moves (torchtune's `GRPOTrajectory`).

`pack` lays prompts and responses out right-padded, with the masks the log-prob and update passes read.
`StepBatch` is what flows one way through a step: the sampler returns it packed (ids, masks, group and sample
indices, the text the grader reads, the sampler's own token log-probs when it has them); scoring fills
`scores` and `scored`; the advantage estimator fills `advantages`; the log-prob passes fill `ref_logprobs` /
`old_logprobs`; one metrics function reads it (grpo.training.metrics). Pure data, no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from grpo.algorithms.core import call_with_knobs, outcome_token_rewards


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@dataclass
class PackedBatch:
    """Right-padded prompt+response sequences; `response_mask[i, t]` says whether token t+1 of row i
    is a response token, i.e. it is aligned with the model's next-token predictions at position t."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    response_mask: torch.Tensor  # [N, L-1], float

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx) -> "PackedBatch":
        """Rows `idx`, trimmed to the longest of them (no compute spent on padding beyond it)."""
        width = int(self.attention_mask[idx].sum(dim=1).max())
        return PackedBatch(self.input_ids[idx, :width], self.attention_mask[idx, :width], self.response_mask[idx, :width - 1])


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> PackedBatch:
    return _pack(prompt_ids, response_ids, pad_id)[0]


def _pack(prompt_ids, response_ids, pad_id, response_values=None, response_masks=None) -> tuple[PackedBatch, torch.Tensor | None]:
    """The packed batch, and `response_values` (one float per response token, e.g. log-probs) laid out like its
    response_mask: token j of row i's response at column len(prompt_i) - 1 + j, the position predicting it.
    `response_masks` (0/1 per response token; None: all 1): which response tokens the model sampled, so that
    tool results and template glue inside a multi-turn response are no part of the loss."""
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    n = len(prompt_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    resp = torch.zeros((n, width - 1), dtype=torch.float32)
    vals = None if response_values is None else torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :len(p) + len(r)] = 1
        if response_masks is None:
            resp[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
        elif r:
            if len(response_masks[i]) != len(r):
                raise ValueError(f"row {i}: {len(r)} response tokens but {len(response_masks[i])} mask values")
            resp[i, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(response_masks[i], dtype=torch.float32)
        if vals is not None:
            if len(response_values[i]) != len(r):
                raise ValueError(f"row {i}: {len(r)} response tokens but {len(response_values[i])} values")
            if r:
                vals[i, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(response_values[i], dtype=torch.float32)
    return PackedBatch(ids, attn, resp), vals


@dataclass
class StepBatch:
    """One step's responses, rows in (prompt, sample) order; see the module docstring for who fills what."""

    packed: PackedBatch  # the sampler's layout: input_ids, attention_mask, response_mask
    group: torch.Tensor  # [N] long: index of the row's prompt within the step
    sample: torch.Tensor  # [N] long: index of the response within its group
    prompt_lengths: torch.Tensor  # [N] long
    response_lengths: torch.Tensor  # [N] long: every generated token, thinking included
    truncated: torch.Tensor  # [N] bool: hit the token limit without an end token
    contents: list[str]  # the final answer, what the grader reads
    reasoning: list[str | None]  # the thinking text, if the template has one
    sampler_logprobs: torch.Tensor | None = None  # [N, L-1] as response_mask; None: the sampler is the policy
    scores: torch.Tensor | None = None  # [N] float64, 0 where not scored (fill_scores)
    scored: torch.Tensor | None = None  # [N] bool: rows with a score; the others take no part in the update
    advantages: torch.Tensor | None = None  # [N, L-1] token-level, 0 outside loss_mask (fill_advantages)
    ref_logprobs: torch.Tensor | None = None  # [N, L-1] under the reference (KL), when kl_coef > 0
    old_logprobs: torch.Tensor | None = None  # [N, L-1] under the policy before the update, when needed
    # Tool calling (grpo.rollout.tools): per row the messages after the prompt (assistant, and tool results in a
    # multi-turn rollout) as the grader receives them, None for rows without tools; the parse error of a
    # malformed call; per-row counts of a multi-turn rollout (turns, calls, errors, max_turns) and its seconds
    messages: list[list[dict] | None] | None = None
    parse_errors: list[str | None] | None = None
    tool_stats: dict | None = None

    def __len__(self) -> int:
        return len(self.packed)

    @property
    def loss_mask(self) -> torch.Tensor:
        """response_mask on scored rows, zero on the others: a failed trajectory stays a row (every process
        keeps the same mini-batch layout, which DDP's collectives need) but is no token and no sequence of the loss."""
        if self.scored is None:
            raise RuntimeError("the batch has no scores yet (fill_scores)")
        return self.packed.response_mask * self.scored.to(self.packed.response_mask.dtype)[:, None]

    @property
    def trained(self) -> PackedBatch:
        """The packed rows with loss_mask as their response mask: what the log-prob and update passes read."""
        return PackedBatch(self.packed.input_ids, self.packed.attention_mask, self.loss_mask)

    def fill_scores(self, scores: Sequence[float | None]) -> None:
        """The grader's scores, one per row; None (a failure skipped under on_failure=skip) leaves the row unscored."""
        if len(scores) != len(self):
            raise ValueError(f"{len(scores)} scores for {len(self)} rows")
        self.scored = torch.tensor([s is not None for s in scores], dtype=torch.bool)
        self.scores = torch.tensor([0.0 if s is None else s for s in scores], dtype=torch.float64)

    def fill_advantages(self, estimator: Callable[..., tuple[torch.Tensor, torch.Tensor]], *,
                        reward_baselines: torch.Tensor | None = None, **knobs) -> None:
        """`estimator` (a grpo.algorithms ADVANTAGE_ESTIMATORS entry, verl's convention) over the scored rows: their
        float32 scores as token-level rewards (on each response's last token), their response masks and group ids,
        the knobs it declares (norm_adv_by_std, gamma...) and `reward_baselines` [N] (remax's greedy scores).
        Unscored rows, and every position outside the loss mask, get 0."""
        if self.scored is None:
            raise RuntimeError("advantages need scores first (fill_scores)")
        mask = self.loss_mask
        adv = torch.zeros(mask.shape)
        sel = self.scored
        if bool(sel.any()):
            m = mask[sel]
            if reward_baselines is not None:
                knobs["reward_baselines"] = reward_baselines[sel].float()
            a, _ = call_with_knobs(estimator, outcome_token_rewards(self.scores[sel].float(), m), m, self.group[sel],
                                   knobs=knobs)
            adv[sel] = a.float() * m
        self.advantages = adv

    def select_groups(self, groups: Sequence[int]) -> "StepBatch":
        """The rows of `groups` (in that order), renumbered 0..len(groups)-1, trimmed to their widest row; the
        filled fields (scores, advantages, log-probs) come along."""
        rows = [i for g in groups for i in (self.group == g).nonzero().flatten().tolist()]
        new_id = {g: k for k, g in enumerate(groups)}
        idx = torch.tensor(rows, dtype=torch.long)
        width = int(self.packed.attention_mask[idx].sum(dim=1).max()) if rows else 1
        cut = lambda x: None if x is None else x[idx, :width - 1]  # noqa: E731 - [N, L-1] fields
        return StepBatch(
            PackedBatch(self.packed.input_ids[idx, :width], self.packed.attention_mask[idx, :width],
                        self.packed.response_mask[idx, :width - 1]),
            group=torch.tensor([new_id[int(self.group[i])] for i in rows], dtype=torch.long), sample=self.sample[idx],
            prompt_lengths=self.prompt_lengths[idx], response_lengths=self.response_lengths[idx],
            truncated=self.truncated[idx], contents=[self.contents[i] for i in rows],
            reasoning=[self.reasoning[i] for i in rows], sampler_logprobs=cut(self.sampler_logprobs),
            scores=None if self.scores is None else self.scores[idx], scored=None if self.scored is None else self.scored[idx],
            advantages=cut(self.advantages), ref_logprobs=cut(self.ref_logprobs), old_logprobs=cut(self.old_logprobs),
            messages=None if self.messages is None else [self.messages[i] for i in rows],
            parse_errors=None if self.parse_errors is None else [self.parse_errors[i] for i in rows],
            tool_stats=_select_tool_stats(self.tool_stats, rows))

    @staticmethod
    def concat(parts: Sequence["StepBatch"], pad_id: int) -> "StepBatch":
        """The rows of `parts` one after the other (each part's groups offset past the previous ones), right-padded
        to the widest (input ids with `pad_id`, masks and per-token fields with 0)."""
        if len(parts) == 1:
            return parts[0]
        width = max(p.packed.input_ids.shape[1] for p in parts)

        def cat_tokens(name, value=0, shift=0):
            xs = [getattr(p.packed, name) if hasattr(p.packed, name) else getattr(p, name) for p in parts]
            if any(x is None for x in xs):
                return None
            return torch.cat([torch.nn.functional.pad(x, (0, width - shift - x.shape[1]), value=value) for x in xs])

        offsets, total = [], 0
        for p in parts:
            offsets.append(total)
            total += int(p.group.max()) + 1 if len(p) else 0
        opt = lambda name: None if any(getattr(p, name) is None for p in parts) else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return StepBatch(
            PackedBatch(cat_tokens("input_ids", pad_id), cat_tokens("attention_mask"), cat_tokens("response_mask", shift=1)),
            group=torch.cat([p.group + o for p, o in zip(parts, offsets)]), sample=torch.cat([p.sample for p in parts]),
            prompt_lengths=torch.cat([p.prompt_lengths for p in parts]),
            response_lengths=torch.cat([p.response_lengths for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]), contents=[c for p in parts for c in p.contents],
            reasoning=[r for p in parts for r in p.reasoning], sampler_logprobs=cat_tokens("sampler_logprobs", shift=1),
            scores=opt("scores"), scored=opt("scored"),
            messages=None if all(p.messages is None for p in parts) else
            [m for p in parts for m in (p.messages or [None] * len(p))],
            parse_errors=None if all(p.parse_errors is None for p in parts) else
            [e for p in parts for e in (p.parse_errors or [None] * len(p))],
            tool_stats=_concat_tool_stats([p.tool_stats for p in parts]))


# engine.environment's per-row tool counters (grpo.rollout.multiturn); "seconds" and "error_messages" are the batch's
_TOOL_ROWS = ("turns", "calls", "errors", "max_turns")


def _select_tool_stats(stats: dict | None, rows: list[int]) -> dict | None:
    if stats is None:
        return None
    return {**stats, **{k: [stats[k][i] for i in rows] for k in _TOOL_ROWS}}


def _concat_tool_stats(parts: list[dict | None]) -> dict | None:
    if any(p is None for p in parts):
        return None
    return {**{k: [v for p in parts for v in p[k]] for k in _TOOL_ROWS},
            "seconds": sum(p["seconds"] for p in parts),
            "error_messages": [m for p in parts for m in p["error_messages"]][:3]}


def pack_step(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, *, group: list[int],
              sample: list[int], truncated: list[bool], contents: list[str], reasoning: list[str | None],
              sampler_logprobs: list[list[float]] | None = None, response_masks: list[list[int]] | None = None
              ) -> StepBatch:
    """A StepBatch from per-response lists (grpo.rollout's samplers call this once per generate)."""
    packed, logp = _pack(prompt_ids, response_ids, pad_id, sampler_logprobs, response_masks)
    return StepBatch(packed, group=torch.tensor(group, dtype=torch.long), sample=torch.tensor(sample, dtype=torch.long),
                     prompt_lengths=torch.tensor([len(p) for p in prompt_ids], dtype=torch.long),
                     response_lengths=torch.tensor([len(r) for r in response_ids], dtype=torch.long),
                     truncated=torch.tensor(truncated, dtype=torch.bool), contents=list(contents),
                     reasoning=list(reasoning), sampler_logprobs=logp)
