"""One token per row from a probability table, with one uniform draw per row (inverse CDF).

`torch.multinomial(probs, 1)` draws an exponential for every vocabulary entry of every row (3.1M draws for 64 rows
of a 49k vocabulary: most of a decode step's sampling time). Inverse-CDF sampling draws one uniform u per row and
returns the first token whose cumulative probability exceeds u x the row's total: the same distribution, P(i) =
p_i / sum(p), as vLLM's and FlashInfer's samplers do on GPU.

The cumulative sums are taken in float64 in two levels, so that a 49k-entry row costs two short scans instead of
one long one (a float64 cumsum over the whole row costs as much as the multinomial here): the row's blocks of
`BLOCK` entries are summed and scanned to pick the block, then only the chosen block is scanned (gathered from the
row: no copy of the table, also when the vocabulary is not a multiple of BLOCK, as Qwen3's and GPT-OSS's are not). A token of
probability 0 (masked by a grammar, dropped by top-p) is never returned: the search lands on an index whose
cumulative sum rises past u, and a u that rounding pushes past a block's last rise is moved back to it.
"""

from __future__ import annotations

import torch

#: Entries per block of the two-level scan (49152 = 192 x 256 for SmolLM2's vocabulary).
BLOCK = 256


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[rows, vocab] non-negative weights (each row with a positive sum; need not sum to 1) -> [rows] token ids,
    row r's id i drawn with probability probs[r, i] / probs[r].sum(), from one float64 uniform per row of
    `generator` (default: torch's global generator, as torch.multinomial uses)."""
    unit = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator, device=probs.device)
    return pick(probs, unit)


def pick(probs: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """The inverse CDF: per row, the first token whose cumulative weight exceeds unit x the row's total
    (`unit`: [rows, 1] float64 in [0, 1)), never a token of weight 0."""
    rows, vocab = probs.shape
    full = vocab // BLOCK  # whole blocks, viewed in place; a last partial block is summed on its own (no padded copy)
    sums = probs[:, :full * BLOCK].unflatten(-1, (full, BLOCK)).sum(-1, dtype=torch.float64)
    if full * BLOCK != vocab:
        sums = torch.cat([sums, probs[:, full * BLOCK:].sum(-1, keepdim=True, dtype=torch.float64)], dim=1)
    nb = sums.shape[1]
    ends = sums.cumsum_(-1)  # [rows, nb] cumulative weight at each block's end
    total = ends[:, -1:]
    u = torch.minimum(unit * total, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    k = torch.searchsorted(ends, u, right=True).clamp_(max=nb - 1)  # the first block whose end exceeds u
    before = torch.where(k > 0, ends.gather(1, (k - 1).clamp(min=0)), torch.zeros_like(u))
    index = k * BLOCK + torch.arange(BLOCK, device=probs.device)  # [rows, BLOCK]: the chosen block's token ids
    chosen = probs.gather(1, index.clamp(max=vocab - 1))
    if full * BLOCK != vocab:
        chosen = chosen.masked_fill(index >= vocab, 0.0)  # past the vocabulary: weight 0
    inner = chosen.to(torch.float64).cumsum_(-1)
    j = torch.searchsorted(inner, u - before, right=True)
    # Rounding between the block sums and the block's own scan can leave u - before at or past the block's last
    # rise: take the block's last token of positive weight then (it has one: the block's sum exceeds 0).
    last = BLOCK - 1 - (chosen > 0).flip(-1).to(torch.int8).argmax(-1, keepdim=True)
    return (k * BLOCK + torch.minimum(j, last)).squeeze(1)
