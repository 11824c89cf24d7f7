"""The actor: the clipped policy-gradient update, and the no-grad log-prob passes (old policy, reference) it needs.
The forward that turns a packed batch into token log-probs is grpo.models.forward.

The update follows verl's actor (`dp_actor.update_policy`): the step's sequences are split into
mini-batches (one optimizer step each), each into micro-batches (memory only). Every micro-batch
loss is normalised by the mini-batch's *global* token (or sequence) count, over all micro-batches and
all processes, so gradient accumulation and the number of processes do not change the update.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
import torch.utils.checkpoint

from grpo.algorithms import core as alg
from grpo.batch import PackedBatch
from grpo.models.forward import forward_logprobs


@dataclass
class UpdateSettings:
    """What the update reads: engine.algorithm's fields (same names), plus the numbers the job derives."""

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
    policy_loss: str = "vanilla"  # a grpo.algorithms POLICY_LOSSES name
    loss_knobs: dict = field(default_factory=dict)  # the other loss settings (tau_pos, dro_beta...); each loss reads its own

    @classmethod
    def from_config(cls, cfg, world: int) -> "UpdateSettings":
        """From a JobConfig: engine.algorithm's fields by name; the rest derived for `world` processes."""
        a, h = cfg.engine.algorithm, cfg.hyperparameters
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in a.model_dump().items() if k in names}, temperature=cfg.engine.temperature,
                   mini_batch_seqs=cfg.mini_batch_prompts() // world * h.training_sample_per_prompt,
                   micro_batch_seqs=a.micro_batch_size, loss_scale_factor=float(h.inference_max_tokens),
                   loss_knobs=a.loss_knobs())


@torch.no_grad()
def compute_logprobs(model, batch: PackedBatch, temperature: float, micro_batch_seqs: int) -> torch.Tensor:
    """Log-probs for the whole batch without gradients (old policy, or the reference with the adapter off), in
    eval mode (no dropout: the distribution the rollout sampled from); the model's mode is put back after."""
    rows = []
    width = batch.response_mask.shape[1]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(batch), micro_batch_seqs):
            idx = torch.arange(start, min(start + micro_batch_seqs, len(batch)))
            logp, _ = forward_logprobs(model, batch.select(idx), temperature)
            rows.append(torch.nn.functional.pad(logp, (0, width - logp.shape[1])))
    finally:
        model.train(was_training)
    return torch.cat(rows)


@contextlib.contextmanager
def adapter_disabled(model):
    """The reference policy: the base weights, with the LoRA adapter switched off (no second copy).

    FSDP2: peft switches the adapter off and on by setting `requires_grad` on the parameters its modules hold,
    and FSDP2 swaps a module's parameters between its sharded ones (what the optimizer steps, and whose
    `requires_grad` FSDP2 reads) and gathered copies. The lm_head unit stays gathered after its forward
    (`reshard_after_forward=False`), so a LoRA on lm_head was switched back on in the gathered copy only: its
    sharded parameters kept `requires_grad=False`, got no gradient and never trained again, and the checkpoint
    left them out. Every unit is resharded before each switch (grpo.training.distributed.reshard_all)."""
    from grpo.training.distributed import reshard_all

    reshard_all(model)
    with model.disable_adapter():
        try:
            yield
        finally:
            reshard_all(model)


@contextlib.contextmanager
def _accumulating(accelerator, model, *, last: bool):
    """A micro-batch that is not its mini-batch's last accumulates gradients without synchronising them:
    DDP's `no_sync`, and accelerate's `sync_gradients` flag, which its DeepSpeed path reads as the
    accumulation boundary (left True, DeepSpeed would step the optimizer after every micro-batch). This is
    what `Accelerator.accumulate` does, with a boundary set by our micro-batch count."""
    if last:
        yield
        return
    accelerator.sync_gradients = False
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        accelerator.sync_gradients = True


def update_policy(model, optimizer, batch: PackedBatch, advantages: torch.Tensor, s: UpdateSettings, *,
                  accelerator, old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                  is_weights: torch.Tensor | None = None) -> dict:
    """Run `ppo_epochs` passes of mini-batch updates. `advantages` is per token, [N, L-1].

    `old_logp=None` means on-policy: one epoch, one mini-batch, so the old log-probs are the current
    ones detached (ratio 1) and no separate pass is needed. `is_weights` [N, L-1]: TIS weights for responses
    drawn by another sampler (grpo.algorithms.tis), multiplying each token's policy-gradient loss.

    A mini-batch whose gradient norm is not finite takes no optimizer step (its gradients are dropped, as
    verl's actor does), so one NaN cannot poison the adapter and Adam's moments; `actor_grad_norm` shows it.
    The learning-rate schedule is the caller's: once per training step, as verl's worker steps it.
    """
    n = len(batch)
    world = accelerator.num_processes
    policy_loss = alg.get_policy_loss(s.policy_loss)  # the registered loss engine.algorithm.policy_loss names
    sums = {k: 0.0 for k in ("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower", "kl_loss", "entropy", "grad_norm")}
    n_updates = 0
    tok_total = 0.0
    model.train()
    for _ in range(s.ppo_epochs):
        for mb_start in range(0, n, s.mini_batch_seqs):
            mb_idx = torch.arange(mb_start, min(mb_start + s.mini_batch_seqs, n))
            # this process's tokens and sequences (rows with >= 1 response token: a row masked out entirely, e.g. a
            # skipped failure, is no sequence), summed over processes: agg_loss's global denominators
            counts = torch.tensor(alg.loss_denominators([batch.response_mask[mb_idx]]), device=accelerator.device)
            g_tokens, g_seqs = accelerator.reduce(counts, reduction="sum").tolist()
            micro = [mb_idx[i:i + s.micro_batch_seqs] for i in range(0, len(mb_idx), s.micro_batch_seqs)]
            for j, idx in enumerate(micro):
                with _accumulating(accelerator, model, last=j == len(micro) - 1):
                    mb = batch.select(idx)
                    w = mb.response_mask.shape[1]
                    mask = mb.response_mask.to(accelerator.device)
                    logp, entropy = forward_logprobs(model, mb, s.temperature, with_entropy=True,
                                                     entropy_grad=bool(s.entropy_coef))
                    old = logp.detach() if old_logp is None else old_logp[idx, :w].to(logp.device)
                    adv = advantages[idx, :w].to(logp.device)
                    agg = dict(loss_agg_mode=s.loss_agg_mode, global_tokens=g_tokens, global_seqs=g_seqs,
                               loss_scale_factor=s.loss_scale_factor)
                    w_is = None if is_weights is None else is_weights[idx, :w].to(logp.device)
                    knobs = {**s.loss_knobs, "clip_ratio_low": s.clip_ratio_low, "clip_ratio_high": s.clip_ratio_high,
                             "clip_ratio_c": s.clip_ratio_c}
                    out = alg.call_with_knobs(policy_loss, old, logp, adv, mask, knobs=knobs, rollout_is_weights=w_is,
                                              **agg)
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
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm))
            sums["grad_norm"] += grad_norm
            if math.isfinite(grad_norm):
                optimizer.step()
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
    metrics["actor_lr"] = optimizer.param_groups[0]["lr"]  # the rate these updates used
    return metrics
