"""The actor: token log-probs and entropy from the policy, and the clipped policy-gradient update.

The update follows verl's actor (`dp_actor.update_policy`): the step's sequences are split into
mini-batches (one optimizer step each), each into micro-batches (memory only). Every micro-batch
loss is normalised by the mini-batch's *global* token (or sequence) count, over all micro-batches and
all processes, so gradient accumulation and the number of processes do not change the update.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from grpo import algorithms as alg
from grpo.rollout import PackedBatch


@dataclass
class UpdateSettings:
    temperature: float
    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: float
    loss_agg_mode: str
    kl_coef: float
    kl_penalty: str
    entropy_coef: float
    max_grad_norm: float
    ppo_epochs: int
    mini_batch_seqs: int  # sequences per optimizer step on this process
    loss_scale_factor: float  # seq-mean-token-sum-norm's constant horizon: inference_max_tokens
    micro_batch_seqs: int


def forward_logprobs(model, batch: PackedBatch, temperature: float, *, with_entropy: bool = False):
    """log pi(token_{t+1} | <= t) for every position t, from logits divided by the sampling temperature
    (as verl does, so the log-probs are those of the distribution the rollout sampled from)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = alg.log_probs_from_logits(logits, batch.input_ids[:, 1:])
    entropy = alg.entropy_from_logits(logits) if with_entropy else None
    return logp, entropy


@torch.no_grad()
def compute_logprobs(model, batch: PackedBatch, temperature: float, micro_batch_seqs: int) -> torch.Tensor:
    """Log-probs for the whole batch without gradients (old policy, or the reference with the adapter off)."""
    rows = []
    width = batch.response_mask.shape[1]
    for start in range(0, len(batch), micro_batch_seqs):
        idx = torch.arange(start, min(start + micro_batch_seqs, len(batch)))
        mb = batch.select(idx)
        logp, _ = forward_logprobs(model, mb, temperature)
        rows.append(torch.nn.functional.pad(logp, (0, width - logp.shape[1])))
    return torch.cat(rows)


@contextlib.contextmanager
def adapter_disabled(model):
    """The reference policy: the base weights, with the LoRA adapter switched off (no second copy)."""
    with model.disable_adapter():
        yield


def update_policy(model, optimizer, scheduler, batch: PackedBatch, advantages: torch.Tensor, s: UpdateSettings, *,
                  accelerator, old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None) -> dict:
    """Run `ppo_epochs` passes of mini-batch updates. `advantages` is per token, [N, L-1].

    `old_logp=None` means on-policy: one epoch, one mini-batch, so the old log-probs are the current
    ones detached (ratio 1) and no separate pass is needed.
    """
    n = len(batch)
    world = accelerator.num_processes
    sums = {k: 0.0 for k in ("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower", "kl_loss", "entropy", "grad_norm")}
    n_updates = 0
    tok_total = 0.0
    model.train()
    for _ in range(s.ppo_epochs):
        for mb_start in range(0, n, s.mini_batch_seqs):
            mb_idx = torch.arange(mb_start, min(mb_start + s.mini_batch_seqs, n))
            row_tokens = batch.response_mask[mb_idx].sum(dim=-1)
            # seqs = rows with >= 1 response token (a row masked out entirely, e.g. a skipped failure, is no sequence)
            counts = torch.stack([row_tokens.sum(), (row_tokens > 0).sum().float()]).to(accelerator.device)
            g_tokens, g_seqs = accelerator.reduce(counts, reduction="sum").tolist()
            micro = [mb_idx[i:i + s.micro_batch_seqs] for i in range(0, len(mb_idx), s.micro_batch_seqs)]
            for j, idx in enumerate(micro):
                sync = contextlib.nullcontext() if j == len(micro) - 1 else accelerator.no_sync(model)
                with sync:
                    mb = batch.select(idx)
                    w = mb.response_mask.shape[1]
                    mask = mb.response_mask.to(accelerator.device)
                    logp, entropy = forward_logprobs(model, mb, s.temperature, with_entropy=True)
                    old = logp.detach() if old_logp is None else old_logp[idx, :w].to(logp.device)
                    adv = advantages[idx, :w].to(logp.device)
                    agg = dict(loss_agg_mode=s.loss_agg_mode, global_tokens=g_tokens, global_seqs=g_seqs,
                               loss_scale_factor=s.loss_scale_factor)
                    out = alg.policy_loss_clipped(old, logp, adv, mask, clip_ratio_low=s.clip_ratio_low,
                                                  clip_ratio_high=s.clip_ratio_high, clip_ratio_c=s.clip_ratio_c, **agg)
                    loss = out.pg_loss
                    ent_loss = alg.agg_loss(entropy, mask, **agg)
                    if s.entropy_coef:
                        loss = loss - s.entropy_coef * ent_loss
                    if ref_logp is not None:
                        kl = alg.kl_penalty(logp, ref_logp[idx, :w].to(logp.device), s.kl_penalty)
                        kl_loss = alg.agg_loss(kl, mask, **agg)
                        loss = loss + s.kl_coef * kl_loss
                        sums["kl_loss"] += float(kl_loss.detach()) * world
                    # DDP averages gradients over processes; the loss is a share of a global sum, so undo it.
                    accelerator.backward(loss * world)
                tokens = float(mask.sum())
                tok_total += tokens
                sums["pg_loss"] += float(out.pg_loss.detach()) * world
                sums["entropy"] += float(ent_loss.detach()) * world
                if tokens:  # a micro-batch without response tokens has NaN statistics and weight 0
                    for k in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
                        sums[k] += float(getattr(out, k)) * tokens
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            sums["grad_norm"] += float(grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            n_updates += 1
    metrics = {f"actor_{k}": v / max(n_updates, 1) for k, v in sums.items()
               if k in ("pg_loss", "kl_loss", "entropy", "grad_norm")}
    # Token shares over every process's tokens (not a mean of per-process shares, which would weigh a
    # process's tokens by how few it had): the same value on every process, whatever the world size.
    token_stats = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")
    totals = torch.tensor([sums[k] for k in token_stats] + [tok_total], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum").tolist()
    for k, v in zip(token_stats, totals):
        metrics[f"actor_{k}"] = v / totals[-1] if totals[-1] else float("nan")
    metrics["actor_lr"] = scheduler.get_last_lr()[0]
    return metrics
