"""Token log-probs and entropy from a causal LM: from hidden states through lm_head in chunks of positions (a
201k vocabulary never materialises full logits), with the group's shared prompt run once where the decoder
allows it."""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint

from grpo.algorithms.logits import entropy_from_logits, log_probs_from_logits
from grpo.batch import PackedBatch, left_pad
from grpo.models.kv_cache import cache_kwarg, cache_of, shares_prefix

#: Positions per lm_head chunk. GPT-OSS's 201k-token vocabulary makes one position's fp32 logits 0.8 MB, so a
#: chunk of 512 holds ~0.4 GB per temporary instead of the whole micro-batch's [N, L, V] at once.
LOGPROB_CHUNK = 512


def _head_parts(model):
    """(decoder, lm_head) of a causal LM under its wrappers (DDP, DeepSpeed, compile, peft), or None where the
    chunked path does not apply (no separate decoder/head, or logits that are not just lm_head(hidden))."""
    import inspect

    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft -> the transformers model
    get_dec, get_head = getattr(base, "get_decoder", None), getattr(base, "get_output_embeddings", None)
    if get_dec is None or get_head is None:
        return None
    decoder, head = get_dec(), get_head()
    if _zero3_partitioned(head) and (type(head) is not torch.nn.Linear or any(p.requires_grad for p in head.parameters())):
        return None  # ZeRO-3 and a head that trains or is more than a Linear: DeepSpeed's hooks must see it whole
    cfg = getattr(base, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if decoder is None or head is None or decoder is base:
        return None
    if any(getattr(text_cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
        return None  # Gemma/Cohere-style logits: the model's own forward is the reference
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None
    return decoder, head


def _zero3_partitioned(module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _gathered_head(head):
    """ZeRO-3: lm_head(h) with the head's weights gathered once, for all chunks of a forward_logprobs call.
    Called as a module, the partitioned head would all-gather (a collective) at every chunk, and ranks with
    different numbers of response tokens make different numbers of chunks, so their gathers would pair up
    wrongly; and a checkpointed chunk's recompute ran after DeepSpeed had released the partition (torch's
    CheckpointError: the saved weight [V, H], recomputed [0]). So a frozen nn.Linear head is gathered once into
    a plain copy, kept (by the chunks' checkpoints) until the backward: one head's memory, not the micro-batch's
    [N, L, V] logits. Already gathered (inside an outer `GatheredParameters`, where DeepSpeed refuses a nested
    one over the same weights): copied as it is."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = list(head.parameters())
    whole = all(p.ds_status == ZeroParamStatus.AVAILABLE for p in params)
    with contextlib.nullcontext() if whole else deepspeed.zero.GatheredParameters(params):
        weight = head.weight.detach().clone()
        bias = head.bias.detach().clone() if head.bias is not None else None
    return lambda hidden: torch.nn.functional.linear(hidden, weight, bias)


def _run_decoder(model, decoder, **inputs):
    """Run `model` (its own forward: adapters, DDP hooks) and return the decoder's last hidden state."""
    captured = {}

    def keep_hidden(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder.register_forward_hook(keep_hidden)
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["h"]


def _prefix_sharing_applies(model) -> bool:
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    if inner is not model and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return False  # FSDP / DeepSpeed wrappers: keep the one plain forward they are built around
    from torch.distributed.fsdp import FSDPModule

    if isinstance(inner, FSDPModule):  # FSDP2 shards in place (no wrapper); a second forward before backward crashes it
        return False
    if not shares_prefix(inner):  # grpo.rollout: full-attention Qwen3 / Qwen2 / Llama
        return False
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    # gradient checkpointing turns the cache off in training
    return not (torch.is_grad_enabled() and getattr(base, "is_activation_checkpointing", getattr(base, "is_gradient_checkpointing", False)))


def _shared_prefix_hidden(model, decoder, batch: PackedBatch, device):
    """(sel, hidden at the selected positions, their labels) with each distinct prompt run once, or None when
    no two rows share a prompt or the model is not one this applies to.

    A row's prefix is its tokens up to its first response position t0 (the prompt); its suffix the rest. The
    distinct prefixes run left-padded with use_cache=True; the cache is then indexed out to the rows, and
    each row's suffix runs on it with explicit position ids (prompt length + j). Position t of the plain
    path maps to suffix position t - t0 - 1 (t0 itself takes the prompt's last hidden state)."""
    if not _prefix_sharing_applies(model):
        return None
    resp = batch.response_mask > 0
    rows = resp.any(dim=1).nonzero().squeeze(1).tolist()
    if len(rows) < 2:
        return None
    first = resp.float().argmax(dim=1)
    lengths = batch.attention_mask.sum(dim=1)
    index, prefixes, row_u = {}, [], []
    for i in rows:
        p = int(first[i]) + 1
        if not bool(batch.attention_mask[i, :int(lengths[i])].all()):
            return None  # holes in the attention mask: not a plain prompt + response row
        key = tuple(batch.input_ids[i, :p].tolist())
        if key not in index:
            index[key] = len(prefixes)
            prefixes.append(key)
        row_u.append(index[key])
    if len(prefixes) == len(rows):
        return None
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    n, width = len(rows), batch.response_mask.shape[1]
    plen = torch.tensor([len(prefixes[u]) for u in row_u])
    pids, pmask = left_pad([list(x) for x in prefixes], 0)
    ppos = (pmask.cumsum(dim=1) - 1).clamp(min=0)
    out = {}

    def keep(_m, _a, output):
        out["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state
        out["cache"] = None if isinstance(output, tuple) else cache_of(output)

    handle = decoder.register_forward_hook(keep)
    try:
        res = inner(input_ids=pids.to(device), attention_mask=pmask.to(device), position_ids=ppos.to(device),
                    use_cache=True, logits_to_keep=1)
    finally:
        handle.remove()
    cache = cache_of(res) or out["cache"]
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    u_idx = torch.tensor(row_u, device=device)
    last = out["h"][:, -1][u_idx]  # [n, H]: predicts each row's first response token
    cache.batch_select_indices(u_idx)
    slen = lengths[rows] - plen
    r = int(slen.max())
    sids = torch.zeros((n, r), dtype=torch.long)
    smask = torch.zeros((n, r), dtype=torch.long)
    for k, i in enumerate(rows):
        sids[k, :int(slen[k])] = batch.input_ids[i, int(plen[k]):int(lengths[i])]
        smask[k, :int(slen[k])] = 1
    spos = plen[:, None] + torch.arange(r)[None]
    attn = torch.cat([pmask[row_u], smask], dim=1)
    h = _run_decoder(model, decoder, input_ids=sids.to(device), attention_mask=attn.to(device),
                     position_ids=spos.to(device), use_cache=True, **{cache_kwarg(inner): cache})
    local = torch.cat([last[:, None], h[:, :-1]], dim=1)  # [n, r, H]: position plen-1+j predicts sids[:, j]
    t = (plen - 1)[:, None] + torch.arange(r)[None]
    ok = t < width
    lmask = batch.response_mask[rows][torch.arange(n)[:, None], t.clamp(max=width - 1)].bool() & ok & smask.bool()
    sel = torch.zeros(resp.shape, dtype=torch.bool)
    sel[rows] = resp[rows]
    if int(lmask.sum()) != int(sel.sum()):
        return None  # a layout this mapping does not cover (the plain path is always right)
    lmask = lmask.to(device)
    return sel.to(device), local[lmask], sids.to(device)[lmask]


def _tempered_logits(head, hidden, temperature: float):
    logits = head(hidden).float()
    return logits / temperature if temperature != 1.0 else logits


def _head_chunk(head, hidden, labels, temperature: float, with_entropy: bool):
    logits = _tempered_logits(head, hidden, temperature)
    logp = log_probs_from_logits(logits, labels)
    return (logp, entropy_from_logits(logits)) if with_entropy else (logp,)


class _HeadLogprob(torch.autograd.Function):
    """log pi(label | hidden) through a frozen head, whose backward recomputes the logits and forms their gradient
    in place: exp(z - lse) * (-g), plus g at the label. The same numbers, gradient included, as autograd through
    `_head_chunk` under a checkpoint (the path it replaces), which recomputes the log-softmax and the entropy in
    the backward, then builds the gradient from a gather's zero-filled scatter, logsumexp's backward and their sum;
    here only the head's product (and the temperature's division) are recomputed and their own backward runs as
    before. Saved between the passes: the hidden states and the log-normaliser (one float per position), as the
    checkpoint saved the hidden states. The entropy (a metric here) is computed once, without gradient."""

    @staticmethod
    def forward(ctx, hidden, labels, head, temperature, entropy_out):
        _, logits = _head_logits(head, hidden, temperature)
        logits = logits.detach()
        with torch.no_grad():
            lse = torch.logsumexp(logits, dim=-1)
            logp = logits.gather(-1, labels.reshape(-1, 1).long()).squeeze(-1) - lse
            if entropy_out is not None:
                entropy_out.append(entropy_from_logits(logits))
        ctx.save_for_backward(hidden, labels, lse)
        ctx.head, ctx.temperature = head, temperature
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, labels, lse = ctx.saved_tensors
        h, logits = _head_logits(ctx.head, hidden, ctx.temperature)
        # logsumexp's backward, grad * exp(z - lse), with the subtraction's negated gradient; then the gather's
        gz = (-grad).unsqueeze(-1) * (logits.detach() - lse.unsqueeze(-1)).exp()
        gz.scatter_add_(-1, labels.reshape(-1, 1).long(), grad.unsqueeze(-1))
        (gh,) = torch.autograd.grad(logits, h, gz)
        return gh, None, None, None, None


def _head_logits(head, hidden, temperature: float):
    """(input, logits / temperature) as the checkpointed path computes them: under autograd, from an input that
    requires grad, so the head takes the same kernel (grpo.models.cpu_linear picks by that) in both passes."""
    with torch.enable_grad():
        h = hidden.detach().requires_grad_(True)
        return h, _tempered_logits(head, h, temperature)


def _fused_head_applies(head) -> bool:
    """A plain frozen Linear head of plain tensors (not FSDP2's DTensors, not ZeRO-3's partitions): the head
    `_HeadLogprob` may call again in the backward on its own, outside any wrapper's hooks."""
    return isinstance(head, torch.nn.Linear) and not any(
        p.requires_grad or hasattr(p, "ds_id") or type(p.data) is not torch.Tensor for p in head.parameters())


def _full_logits(model, batch: PackedBatch, temperature: float, with_entropy: bool):
    """The reference path: the model's own [N, L, V] logits (models whose logits are more than lm_head(h))."""
    device = next(model.parameters()).device
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = log_probs_from_logits(logits, batch.input_ids[:, 1:].to(device))
    return logp, (entropy_from_logits(logits) if with_entropy else None)


def forward_logprobs(model, batch: PackedBatch, temperature: float, *, with_entropy: bool = False,
                     chunk_size: int | None = None, share_prefix: bool = True, entropy_grad: bool = True):
    """log pi(token_{t+1} | <= t) at every response position t ([N, L-1]; 0 elsewhere), from logits divided by
    the sampling temperature (as verl does, so the log-probs are those of the distribution the rollout sampled
    from), and the token entropy at the same positions if asked.

    Memory: the full [N, L, V] logits are never made. The model runs through its own forward (so DDP's
    gradient hooks, ZeRO-3's parameter gathering and peft's adapters all work as usual) with
    `logits_to_keep=1`; a forward hook on the decoder keeps its last hidden state; lm_head is then applied to
    the response positions `chunk_size` at a time. Under autograd each chunk is checkpointed, so only its
    hidden states are kept and its logits are recomputed in the backward pass (one extra lm_head pass); with
    a frozen plain Linear head and `entropy_grad=False` (the entropy a metric, not a loss term) the chunk is
    `_HeadLogprob` instead: the same values and gradients, without recomputing the log-softmax and the
    entropy in the backward.
    Models whose logits are not plain lm_head(hidden) take the full-logits path instead. `chunk_size`: default
    LOGPROB_CHUNK (read at call time). ZeRO-3: the head is gathered once per call (`_gathered_head`).

    Shared prompts: rows that share a prompt (a GRPO group) run it once (`_shared_prefix_hidden`): the prompt's
    forward gives a KV cache that every row of the group attends to, and only the responses are run per row.
    The same function of the same weights (only float rounding differs); the gradient flows through the
    shared prompt's forward. `share_prefix=False` forces the plain path.
    """
    parts = _head_parts(model)
    if parts is None:
        logp, entropy = _full_logits(model, batch, temperature, with_entropy)
        mask = batch.response_mask.to(logp.device)
        return logp * mask, (entropy * mask if entropy is not None else None)
    decoder, head = parts
    chunk_size = chunk_size or LOGPROB_CHUNK
    device = next(model.parameters()).device
    shared = _shared_prefix_hidden(model, decoder, batch, device) if share_prefix else None
    if shared is not None:
        sel, h_sel, lab_sel = shared
    else:
        hidden = _run_decoder(model, decoder, input_ids=batch.input_ids.to(device),
                              attention_mask=batch.attention_mask.to(device), use_cache=False)[:, :-1]
        sel = batch.response_mask.to(hidden.device) > 0
        h_sel, lab_sel = hidden[sel], batch.input_ids[:, 1:].to(hidden.device)[sel]
    grad = torch.is_grad_enabled() and h_sel.requires_grad
    if _zero3_partitioned(head):  # after the model's forward: every rank gathers it here exactly once
        head = _gathered_head(head)
    logps, ents = [], []
    fused = grad and not (with_entropy and entropy_grad) and _fused_head_applies(head)
    for i in range(0, max(len(h_sel), 1), chunk_size):  # at least one (maybe empty) chunk keeps the graph whole
        if fused:
            logps.append(_HeadLogprob.apply(h_sel[i:i + chunk_size], lab_sel[i:i + chunk_size], head, temperature,
                                            ents if with_entropy else None))
            continue
        args = (head, h_sel[i:i + chunk_size], lab_sel[i:i + chunk_size], temperature, with_entropy)
        out = torch.utils.checkpoint.checkpoint(_head_chunk, *args, use_reentrant=False) if grad else _head_chunk(*args)
        logps.append(out[0])
        if with_entropy:
            ents.append(out[1])
    zeros = torch.zeros(sel.shape, dtype=torch.float32, device=h_sel.device)
    logp = zeros.masked_scatter(sel, torch.cat(logps))
    entropy = zeros.masked_scatter(sel, torch.cat(ents)) if with_entropy else None
    return logp, entropy
