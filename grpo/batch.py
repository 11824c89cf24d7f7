"""A step's samples as tensors: `pack` lays prompts and responses out right-padded, with the masks the log-prob
and update passes read. Pure data, no model: the rollout fills it, grpo.models.forward and the actor read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    n = len(prompt_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    resp = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :len(p) + len(r)] = 1
        resp[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
    return PackedBatch(ids, attn, resp)
