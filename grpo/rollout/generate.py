"""Group sampling with transformers: each prompt's `training_sample_per_prompt` responses from the policy being
trained (the default rollout backend). One decode loop, top-p filtering, the group's prompt run once where the
decoder allows it (grpo.models.kv_cache) and the LoRA adapter merged for decoding (grpo.models.merge).
`response_length` counts every generated token, thinking included."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from grpo.batch import left_pad
from grpo.models.kv_cache import cache_kwarg, cache_of, preallocate, shares_prefix
from grpo.models.decode_step import LeanDecoder
from grpo.models.merge import merged_lora
from grpo.rollout.batch import RolloutBatch
from grpo.rollout.constrain import GrammarLogitsProcessor, call_end_ids, mask_logits_, row_constraints
from grpo.rollout.prompts import end_token_ids, special_tokens
from grpo.rollout.sampling import sample_rows


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper: drop the least likely tokens whose total probability is <= 1 - top_p."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    drop[..., -1:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _sample_shared_prefix(model, chunk: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                          top_p: float, ends: list[int], pad: int, ignore_eos: bool, device,
                          constraints=None, logprobs: list | None = None, decoder=None) -> list[list[int]]:
    """`n` samples of each prompt in `chunk` (rows grouped by prompt), token lists of max_new_tokens (pad after
    an end token). One prefill per prompt; its KV cache is repeated n times; then one token per step for
    every row, drawn from softmax(logits / temperature) in float32 (top-p filtered if top_p < 1), as
    transformers' sampling does, with one uniform per row (grpo.rollout.sampling); temperature 0 takes the argmax
    (greedy). Finished rows get `pad` until every row is finished. `constraints`: a
    grpo.rollout.constrain.RowConstraint (or None) per row, masking its logits before temperature and top-p; a row
    whose grammar has finished is done. `logprobs`: a list that gets each step's
    [rows] log-probs of the drawn tokens under the distribution they were drawn from (the sampler's own numerics:
    KV cache, decode batch; for measuring its mismatch with the trainer's forward). `decoder`: a
    grpo.models.decode_step.LeanDecoder of `model` (the same logits without transformers' per-call machinery), or
    None to call the model."""
    kw = cache_kwarg(model)
    ids, mask = left_pad(chunk, pad)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    if decoder is not None:
        logits, cache = decoder(ids, mask, pos)
    else:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = cache_of(out), out.logits
    cache.batch_repeat_interleave(n)
    preallocate(cache, max_new_tokens)  # in-place KV writes per token instead of a full-cache concatenation
    logits = logits[:, -1].repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    next_pos = mask.sum(dim=1, keepdim=True)
    rows = mask.shape[0]
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    end_ids = torch.tensor(ends, device=device)
    one = torch.ones((rows, 1), dtype=mask.dtype, device=device)
    for step in range(max_new_tokens):
        if constraints is not None:
            logits = logits.float()
            mask_logits_(logits, [c if not d else None for c, d in zip(constraints, done.tolist())])
        if temperature == 0:  # greedy (remax's baseline response)
            scores = logits.float().log_softmax(dim=-1)
            nxt = scores.argmax(dim=-1)
        else:
            scores = logits.float()
            if temperature != 1.0:  # x / 1 is x: no pass over [rows, vocab] for nothing (as forward.py's head)
                scores = scores / temperature
            scores = _top_p_filter(scores, top_p)
            probs = scores.softmax(dim=-1)
            nxt = sample_rows(probs)
        if logprobs is not None:
            logprobs.append(scores.log_softmax(dim=-1).gather(1, nxt[:, None]).squeeze(1).cpu())
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens[:, step] = nxt
        if constraints is not None:
            for c, t, d in zip(constraints, nxt.tolist(), done.tolist()):
                if c is not None and not d:
                    c.advance(t)
            done |= torch.tensor([c is not None and c.finished for c in constraints], device=device)
            if bool(done.all()):
                break
        if not ignore_eos:
            done |= torch.isin(nxt, end_ids)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, one], dim=1)
        if decoder is not None:
            logits = decoder(nxt[:, None], mask, next_pos, cache)[:, -1]
        else:
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                           logits_to_keep=1, **{kw: cache}).logits[:, -1]
        next_pos = next_pos + 1
    return tokens.tolist()


#: Whether `generate` decodes shared-prefix models through grpo.models.decode_step.LeanDecoder (bit for bit the
#: model's own forward; scripts/bench_decode.py flips it for its A/B row).
LEAN_DECODE = True

#: Sequences (prompts x samples) per decode call of `generate`; grpo.training.dry_run sizes the KV cache from it.
GEN_BATCH = 64


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
             top_p: float = 1.0, batch_size: int = GEN_BATCH, ignore_eos: bool = False,
             stop_ids: list[int] | None = None, grammars: list[str | None] | None = None,
             progress: Callable[[int], None] | None = None, sampler_logprobs: list | None = None) -> RolloutBatch:
    """Sample `n` responses for each prompt (ids). Sampling is from the full tempered distribution
    (top_k off), so that the trainer's log-probs describe exactly the distribution sampled from.

    Decoders for which `shares_prefix` holds (Qwen3, Qwen2, Llama: full attention, a plain KV cache) run
    each prompt's prefill once for its whole group and decode with their own loop
    (`_sample_shared_prefix`); others go through transformers' `generate` with `num_return_sequences`,
    which prefills every copy of the prompt. `ignore_eos`: every response is `max_new_tokens` long (end
    tokens may be sampled and do not stop it), for benchmarks at equal work. `grammars`: one per prompt (None:
    unconstrained), from grpo.rollout.constrain.rollout_grammars (`engine.rollout.tool_choice`): that prompt's
    responses are sampled from the policy masked to the grammar's tool calls. `progress(k)`, when given, is
    called with the number of prompts each chunk finished (a progress bar's update). `sampler_logprobs`
    (shared-prefix decoders only): a list that gets, per response in order, the log-prob of each of its tokens
    under the distribution the decode loop drew it from."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    ends = sorted(set(end_token_ids(tokenizer, model)) | set(stop_ids or ()))
    if grammars:
        from grpo.rollout.tools import template_family

        ends = sorted(set(ends) | call_end_ids(tokenizer, template_family(tokenizer)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    gen_cfg = GenerationConfig(
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else 0,
        eos_token_id=None if ignore_eos else ends, pad_token_id=pad, num_return_sequences=n,
    )
    specials = special_tokens(tokenizer)
    out = RolloutBatch()
    was_training = model.training
    model.eval()
    per_call = max(1, batch_size // n)
    shared = shares_prefix(model)
    try:
        # The LoRA merge (shared-prefix decoders) once for the whole call: the weights do not change within it.
        with merged_lora(model) if shared else contextlib.nullcontext():
            decoder = LeanDecoder.make(model) if shared and LEAN_DECODE else None
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start:start + per_call]
                rows = row_constraints(tokenizer, model, grammars[start:start + per_call] if grammars else None, n,
                                       ends)
                steps = [] if sampler_logprobs is not None else None
                if shared:
                    new = _sample_shared_prefix(model, chunk, n=n, max_new_tokens=max_new_tokens,
                                                temperature=temperature, top_p=top_p, ends=ends, pad=pad,
                                                ignore_eos=ignore_eos, device=device, constraints=rows, logprobs=steps,
                                                decoder=decoder)
                elif steps is not None:
                    raise ValueError(f"sampler_logprobs: {type(model).__name__} decodes through transformers' generate")
                else:
                    ids, mask = left_pad(chunk, pad)
                    procs = LogitsProcessorList([GrammarLogitsProcessor(rows, ids.shape[1])]) if rows else None
                    seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                          generation_config=gen_cfg, logits_processor=procs)
                    new = seqs[:, ids.shape[1]:].tolist()
                for row, toks in enumerate(new):
                    resp, hit_end = [], False
                    for t in toks:
                        resp.append(t)
                        if not ignore_eos and t in ends:
                            hit_end = True
                            break
                    if not resp:
                        resp = [ends[0]]
                        hit_end = True
                    out.add(tokenizer, chunk[row // n], resp, truncated=not hit_end, group=start + row // n,
                            sample=row % n, specials=specials)
                    if steps is not None:
                        sampler_logprobs.append([float(steps[j][row]) for j in range(len(resp))])
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return out
