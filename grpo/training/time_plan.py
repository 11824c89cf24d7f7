"""The dry-run's time plan: tokens, FLOPs and predicted seconds per step and for the whole job.

Work per step (`step_work`), from the job's sizes and the model's shapes (grpo.training.dry_run.ModelInfo):

- tokens: prompt lengths from the training data (tokenized with the model's chat template when its tokenizer is
  on this machine, else ~4 characters per token), capped at max_prompt_length; response lengths from a
  `grpo eval --out` / `--json` result (`--lengths FILE`) or, without one, every response at inference_max_tokens
  (an upper bound). Padding is counted where the engine computes on it: a decode call runs until its longest
  response ends and a micro-batch is padded to its longest row, so those use the expected maximum of the
  rows' lengths (drawn from the length distribution), not the mean.
- FLOPs, counted as the engine runs (grpo.rollout.generate, grpo.models.forward, grpo.training.actor): 2 per
  weight per token for every matrix product a token passes through (MoE: the top-k experts), attention's
  QK^T and AV (4 x heads x head_dim per query per attended position, sliding windows honoured), the LoRA
  products, lm_head at the positions that need it (generation: the last position per call; log-probs: the
  response positions), and peft's expert fold (W + B A for every expert, once per forward call: for GPT-OSS
  the largest item of a decode step). The update: forward, the backward's input gradients (the base is
  frozen: no weight gradients), the LoRA weight gradients, gradient checkpointing's recompute, the log-prob
  chunks' recompute. Generation with prefix sharing prefills each prompt once per group; the log-prob passes
  and the update share it where grpo.models.forward does (not in a checkpointed update, not when sharded).

Seconds (`predict_cpu`, `predict_gpu`):

- this CPU: `cpu_probe` measures the machine as it is now (other processes included) in 1-3 s for models up to
  SmolLM2's size: a one- and a two-layer copy of the model at width 64 (its own classes, LoRA by peft as
  configured) for the fixed cost of a forward call and of each decoder layer in it (Python, dispatch, the
  small operations); the same copies at the model's own width (layers up to REAL_LAYER_MAX_PARAMETERS) at the
  phase's shapes (a decode step of the generation's rows over a prompt-long KV cache, a log-prob micro-batch,
  its forward + backward), whose two-minus-one-layer time less the width-64 layer's is a decoder layer's
  compute: the rate of each phase kind, attention, norms and the LoRA products included (larger layers: the
  engine's Linear product at the MLP's shape instead, which overstates a layer's rate); lm_head with
  log-softmax at a chunk; the sampling at the vocabulary. Predicted seconds = FLOPs / the measured rate of the
  phase's kind (a generation's prefills at the forward rate) + calls x the measured fixed costs. Checked against
  measured runs in docs/scale.md ("Time plan").
- a GPU (`--gpu`): peak dense bf16 FLOP/s and HBM bandwidth from the vendors' datasheets (GPUS), and these
  assumptions, not measured here (no GPU has run this project): the forward passes at MFU_FORWARD of the
  peak, the update at MFU_UPDATE; a decode step takes the longer of its FLOPs at MFU_FORWARD and its bytes
  (active weights, the experts the step's rows route to, the KV cache, the expert fold's reads and writes)
  at BW_EFFICIENCY of the bandwidth, plus LAUNCH_S_PER_LAYER per decoder layer per forward call for eager
  PyTorch. GPU-hours = predicted seconds x GPUs / 3600.

Not predicted: the reward handler (your code: timing_s_reward), checkpoint saving, the model's loading and the
first step's warm-up; with several processes the plan is the one-process plan (DDP divides the step's work).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from grpo.errors import UserError

#: name -> (what, peak dense bf16 tensor FLOP/s, HBM bytes/s), from NVIDIA's datasheets (SXM parts; the L40S is
#: PCIe only). The FLOP/s are those of grpo.training.metrics.DEVICE_FLOPS (verl's table).
GPUS = {"h100": ("H100 SXM 80 GB", 989e12, 3.35e12), "h200": ("H200 SXM 141 GB", 989e12, 4.8e12),
        "a100": ("A100 SXM 80 GB", 312e12, 2.039e12), "l40s": ("L40S 48 GB", 362.05e12, 0.864e12)}
#: Assumptions for the GPU figures (typical of transformers + peft training in bf16; not measured here).
MFU_FORWARD = 0.40
MFU_UPDATE = 0.30
BW_EFFICIENCY = 0.60
LAUNCH_S_PER_LAYER = 3e-4
CHARS_PER_TOKEN = 4.0
PROBE_MAX_PARAMETERS = 2e9  # the dry-run probes this CPU for models up to this size


@dataclass
class Lengths:
    """Token lengths per sequence: prompts (one per training record) and responses (None: all at the cap)."""

    prompts: list[int]
    responses: list[int] | None
    prompt_source: str
    response_source: str


def expected_max(values: list[int], k: int) -> float:
    """E[max of k draws with replacement from `values`] (exact, from the empirical distribution)."""
    if not values:
        return 0.0
    if k <= 1:
        return sum(values) / len(values)
    xs = sorted(values)
    n, total, below = len(xs), 0.0, 0
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        total += xs[i] * ((j / n) ** k - (below / n) ** k)
        below = j
        i = j
    return total


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def read_lengths_file(path: Path, max_tokens: int) -> tuple[list[int], str]:
    """Response lengths from `grpo eval --out FILE` (one sample per line, `response_tokens` each) or from
    `grpo eval --json` output (one object: response_length_mean and response_length_clip_ratio, read as that
    share of responses at `max_tokens` and the rest at the mean that leaves)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--lengths {path}: cannot read it ({e.strerror or e})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except ValueError:
            raise UserError(f"--lengths {path}:{n}: not JSON (give the file `grpo eval --out` writes, or "
                            "`grpo eval --json` output)") from None
    if len(rows) == 1 and isinstance(rows[0][1], dict) and "response_length_mean" in rows[0][1]:
        d, line = rows[0][1], rows[0][0]
        mean, clip, count = d.get("response_length_mean"), d.get("response_length_clip_ratio", 0.0), d.get("samples")
        if not isinstance(mean, (int, float)) or not isinstance(clip, (int, float)) or not 0 <= clip <= 1 or mean < 0:
            raise UserError(f"--lengths {path}:{line}: response_length_mean / response_length_clip_ratio: expected "
                            "numbers (a mean >= 0, a ratio in [0, 1])")
        n = 1000
        at_cap = round(clip * n)
        rest = max(1, round((mean * n - at_cap * max_tokens) / max(n - at_cap, 1))) if at_cap < n else max_tokens
        return ([max_tokens] * at_cap + [min(rest, max_tokens)] * (n - at_cap),
                f"{path} (grpo eval --json: mean {mean:.1f}, {clip:.0%} at the cap; {count} samples)")
    lengths = []
    for line, d in rows:
        v = d.get("response_tokens") if isinstance(d, dict) else None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"--lengths {path}:{line}: response_tokens: expected an integer >= 0 (the samples file "
                            "`grpo eval --out` writes)")
        lengths.append(min(v, max_tokens))
    if not lengths:
        raise UserError(f"--lengths {path}: no samples")
    return lengths, f"{path} (grpo eval --out: {len(lengths)} samples, mean {_mean(lengths):.1f})"


def _tokenizer(name: str):
    """The model's tokenizer if it is on this machine without building or converting anything, else None."""
    from grpo.config import TINY_MODEL
    from grpo.models.loading import load_tokenizer

    path = None
    if name == TINY_MODEL:
        from grpo.models.tiny import RECIPE, default_cache_dir, recipe_hash

        cached = default_cache_dir() / f"tiny-qwen3-{recipe_hash(RECIPE)}"
        path = cached if (cached / "config.json").is_file() else None
    elif Path(name).is_dir():
        path = Path(name)
    else:
        from grpo.models.gguf import gguf_source

        gguf = gguf_source(name)
        if gguf is not None:
            from grpo.models.tiny import default_cache_dir

            done = sorted(default_cache_dir().glob(f"gguf-{gguf.stem.lower()}*/tokenizer_config.json"))
            path = done[0].parent if done else None
    if path is None:
        return None
    try:
        return load_tokenizer(str(path))
    except UserError:
        return None


def _records(path: Path) -> list:
    """The records of a data file the dry run has already validated (its warnings printed once, there)."""
    from grpo.data import load_records, validate_file

    rep = validate_file(path, allow_small=True)
    return load_records(path, allow_small=True) if rep.problems else rep.records


def data_lengths(job, lengths_file: Path | None) -> Lengths:
    """Prompt lengths of the training records, and response lengths (from `lengths_file` when given)."""
    h = job.hyperparameters
    path = Path(job.training_file)
    prompts: list[int] = []
    source = f"no training data ({path} not found): every prompt at max_prompt_length {h.max_prompt_length}"
    if path.is_file():
        records = _records(path)
        tok = _tokenizer(job.local_model)
        if tok is not None:
            from grpo.rollout.prompts import encode_prompt

            raw = [len(encode_prompt(tok, r.messages, reasoning_effort=h.reasoning_effort, tools=r.tools))
                   for r in records]
            how = "tokenized with the model's chat template"
        else:
            raw = [math.ceil(len(json.dumps(r.messages)) / CHARS_PER_TOKEN) for r in records]
            how = f"estimated at {CHARS_PER_TOKEN:.0f} characters per token (no tokenizer on this machine)"
        kept = [n for n in raw if n <= h.max_prompt_length]  # longer ones are filtered out, as the trainer does
        prompts = kept or [h.max_prompt_length]
        source = (f"{path}: {len(raw)} prompts, mean {_mean(kept):.1f} tokens ({how})"
                  + (f"; {len(raw) - len(kept)} over max_prompt_length left out" if len(kept) < len(raw) else ""))
    if not prompts:
        prompts = [h.max_prompt_length]
    if lengths_file is not None:
        responses, rsource = read_lengths_file(lengths_file, h.inference_max_tokens)
    else:
        responses = None
        rsource = (f"every response at inference_max_tokens {h.inference_max_tokens} (an upper bound; --lengths FILE "
                   "for measured ones)")
    return Lengths(prompts, responses, source, rsource)


# -- work ---------------------------------------------------------------------------------------------------

def _window_sum(start: int, count: int, window: int | None) -> float:
    """sum over c = start+1 .. start+count of min(c, window)."""
    if count <= 0:
        return 0.0
    end = start + count
    if window is None or end <= window:
        return count * (start + 1 + end) / 2
    if start >= window:
        return float(count * window)
    return (window - start) * (start + 1 + window) / 2 + (end - window) * window


def attention_flops(info, queries: int, past: int) -> float:
    """QK^T and AV FLOPs, all layers, for `queries` consecutive positions after `past` cached ones."""
    types = info.layer_types or ["full_attention"] * info.layers
    per = 4 * info.heads * info.head_dim
    return per * sum(_window_sum(past, queries, info.sliding_window if t == "sliding_attention" else None)
                     for t in types)


@dataclass
class Phase:
    """One part of a step: matrix-product FLOPs by shape kind, forward calls, and GPU bytes (decode)."""

    flops: float = 0.0
    calls: int = 0  # forward calls of the whole model (each runs every decoder layer once)
    kind: str = "forward"  # which probe rate applies: decode | forward | update
    backward_calls: int = 0
    decode_steps: int = 0  # generation: sampling calls over [rows, vocab]
    decode_rows: int = 0
    head_positions: float = 0.0  # log-probs: lm_head + log-softmax positions
    bytes: float = 0.0  # GPU: HBM bytes read/written by the decode steps
    decode_flops: float = 0.0  # GPU: the part of `flops` in decode steps (bandwidth-bound)
    prefill_flops: float = 0.0  # CPU: the part of a generation phase's `flops` in prefills (at the forward rate)
    tokens: float = 0.0

    def add(self, other: "Phase") -> "Phase":
        for k in ("flops", "calls", "backward_calls", "decode_steps", "decode_rows", "head_positions", "bytes",
                  "decode_flops", "prefill_flops", "tokens"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self


@dataclass
class StepWork:
    sequences: int
    sampled_tokens: float
    trained_tokens: float  # prompt + response tokens a log-prob pass runs (prompts once per group when shared)
    phases: dict[str, Phase] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _sizes(info, merged: bool):
    body = info.active - info.lm_head  # per-token weights of the decoder layers (lm_head counted apart)
    lora = 0 if merged else _lora_linear(info)
    head = info.vocab * info.hidden
    fold = 2 * info.lora_rank * info.experts if (info.experts and "parameters" in info.lora_targets) else 0
    return body, lora, head, fold


def _lora_linear(info) -> int:
    """LoRA parameters on Linear layers (they run per token; expert LoRA runs through the fold instead)."""
    return info.trainable - info.expert_lora


def generation_work(info, lengths: Lengths, job, prompts: int, samples: int, *, shared: bool, merged: bool,
                    dtype_bytes: int, backend: str) -> Phase:
    from grpo.rollout.generate import GEN_BATCH

    h = job.hyperparameters
    body, lora, head, fold = _sizes(info, merged)
    responses = lengths.responses or [h.inference_max_tokens]
    per_call = max(1, GEN_BATCH // samples) if backend == "transformers" else prompts
    out = Phase(kind="decode")
    left = prompts
    gpu_bytes = 2  # the bytes are for the GPU figures, which are bf16
    kv_per_token = 2 * info.kv_heads * info.head_dim * gpu_bytes * info.layers
    while left > 0:
        n_p = min(per_call, left)
        left -= n_p
        rows = n_p * samples
        p_pad = expected_max(lengths.prompts, n_p)
        pre_rows = n_p if (shared and backend == "transformers") else rows
        pre = Phase(kind="decode", calls=1)
        pre.flops = (2 * (body + lora) * pre_rows * p_pad + pre_rows * attention_flops(info, round(p_pad), 0)
                     + 2 * head * pre_rows + fold)
        pre.prefill_flops = pre.flops
        pre.tokens = pre_rows * p_pad
        out.add(pre)
        steps = expected_max(responses, rows)  # the call runs until its longest response ends
        calls = max(0.0, steps - 1)  # the first token comes from the prefill's logits
        dec = Phase(kind="decode", calls=round(calls), decode_steps=round(steps), decode_rows=rows)
        dec.flops = (calls * (rows * 2 * (body + lora + head) + fold)
                     + rows * attention_flops(info, round(calls), round(p_pad)))
        dec.decode_flops = dec.flops
        active = _decode_weight_bytes(info, rows, gpu_bytes)
        kv = rows * kv_per_token * (p_pad + steps / 2)
        fold_bytes = 4 * info.experts * gpu_bytes if fold else 0  # read W and B A, write and read W + B A
        dec.bytes = calls * (active + kv + fold_bytes)
        dec.tokens = rows * _mean(responses)
        out.add(dec)
    return out


def _decode_weight_bytes(info, rows: int, dtype_bytes: int) -> float:
    """Weights one decode step reads: all but the embedding (a tied head once, as the head) and, of the experts,
    those its rows route to (expected share of n experts after rows x top-k draws)."""
    head = info.vocab * info.hidden if info.lm_head == 0 else 0  # tied: the embedding is the head
    experts = info.experts
    if info.n_experts:
        experts *= 1 - (1 - info.top_k / info.n_experts) ** rows
    return (info.total - info.embedding - info.experts + experts + head) * dtype_bytes


def logprob_work(info, lengths: Lengths, job, sequences: int, samples: int, *, shared: bool, grad: bool,
                 gc: bool, merged: bool = False) -> Phase:
    """One pass over the step's sequences in micro-batches: a reference / old log-prob pass, or (grad) one
    epoch of the update."""
    h = job.hyperparameters
    body, lora, head, fold = _sizes(info, merged)
    responses = lengths.responses or [h.inference_max_tokens]
    micro = max(1, min(job.engine.micro_batch_size, sequences))
    out = Phase(kind="update" if grad else "forward")
    left = sequences
    while left > 0:
        m = min(micro, left)
        left -= m
        groups = max(1, math.ceil(m / samples))
        p_pad = expected_max(lengths.prompts, groups)
        r_pad = expected_max(responses, m)
        resp = m * _mean(responses)
        if shared:
            tokens = groups * p_pad + m * r_pad
            attn = (groups * attention_flops(info, round(p_pad), 0)
                    + m * attention_flops(info, round(r_pad), round(p_pad)))
            calls = 2
        else:
            # rows are right-padded to the micro-batch's longest prompt + response
            width = expected_max([p + r for p in lengths.prompts[:200] for r in responses[:50]], m)
            tokens = m * width
            attn = m * attention_flops(info, round(width), 0)
            calls = 1
        fwd = 2 * (body + lora) * tokens + attn
        if grad:  # forward + input gradients (frozen base) + LoRA weight gradients (+ the checkpointed recompute)
            flops = fwd * (3 if gc else 2) + 2 * lora * tokens + 2 * attn + 3 * 2 * head * resp
            flops += fold * (4 + (1 if gc else 0)) * calls
        else:
            flops = fwd + 2 * head * resp + fold * calls
        out.add(Phase(kind=out.kind, flops=flops, calls=calls, backward_calls=1 if grad else 0,
                      head_positions=resp * (3 if grad else 1), tokens=tokens))
    return out


def step_work(info, job, lengths: Lengths, setup) -> StepWork:
    """The work of one training step (one process), by phase: gen, ref, old_log_prob, update_actor."""
    h, e = job.hyperparameters, job.engine
    G, B = h.training_sample_per_prompt, h.batch_size
    n = B * G
    backend = e.rollout.backend
    merged = (backend == "transformers" and info.shares_prefix and setup.dtype_bytes == 4 and not setup.load_in_4bit)
    prefix = info.shares_prefix and not setup.sharded
    responses = lengths.responses or [h.inference_max_tokens]
    w = StepWork(sequences=n, sampled_tokens=n * _mean(responses), trained_tokens=0.0)
    w.phases["gen"] = generation_work(info, lengths, job, B, G, shared=prefix, merged=merged,
                                      dtype_bytes=setup.dtype_bytes, backend=backend)
    ref = logprob_work(info, lengths, job, n, G, shared=prefix, grad=False, gc=False)
    w.trained_tokens = ref.tokens
    if e.algorithm.kl_coef > 0:
        w.phases["ref"] = ref
    on_policy = h.batch_size // job.mini_batch_prompts() * e.ppo_epochs == 1
    if not on_policy or backend != "transformers":
        w.phases["old_log_prob"] = logprob_work(info, lengths, job, n, G, shared=prefix, grad=False, gc=False)
    upd = Phase(kind="update")
    for _ in range(e.ppo_epochs):
        upd.add(logprob_work(info, lengths, job, n, G, shared=prefix and not setup.gradient_checkpointing,
                             grad=True, gc=setup.gradient_checkpointing))
    w.phases["update_actor"] = upd
    return w


def validation_work(info, job, lengths: Lengths, setup, records: int) -> Phase:
    """One evaluation: one sample per validation prompt (engine.eval_max_records caps them)."""
    e = job.engine
    merged = (e.rollout.backend == "transformers" and info.shares_prefix and setup.dtype_bytes == 4
              and not setup.load_in_4bit)
    return generation_work(info, lengths, job, records, 1, shared=info.shares_prefix and not setup.sharded,
                           merged=merged, dtype_bytes=setup.dtype_bytes, backend=e.rollout.backend)


# -- seconds on this CPU --------------------------------------------------------------------------------------

@dataclass
class Probe:
    """Rates (FLOP/s) of the engine's products at each phase's shape, and fixed costs (s), measured now."""

    rate: dict[str, float]
    call_s: dict[str, float]  # per forward call (embedding, head at one position, masks, the model's Python)
    layer_s: dict[str, float]  # per decoder layer per forward call (its small operations; no matrix FLOPs)
    sample_s: float  # one sampling step over [rows, vocab]
    head_s: float  # lm_head + log-softmax + entropy per position
    seconds: float  # wall
    cpu_seconds: float  # this process's CPU time (all threads): the probe's own work, whatever else runs
    load: tuple[float, float, float]
    threads: int


def _timed(fn, repeat: int = 3) -> float:
    """The median of `repeat` runs after one warm-up: the machine as it is now, other processes included (under
    contention a run's operations wait for the CPU as the probe's do; the fastest run would hide that)."""
    import statistics

    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _tiny_copy(config, layers: int):
    """`config` at width 64 with `layers` decoder layers and a 256-token vocabulary: the same classes and
    operations, nearly no matrix FLOPs."""
    import copy

    c = copy.deepcopy(config)
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    ratio = max(1, heads // kv)
    c.hidden_size, c.intermediate_size, c.vocab_size = 64, 64, 256
    c.num_key_value_heads = 2
    c.num_attention_heads = 2 * min(ratio, 4)
    if hasattr(c, "head_dim"):
        c.head_dim = 16
    c.num_hidden_layers = layers
    if getattr(c, "layer_types", None):
        c.layer_types = (list(c.layer_types) * layers)[:layers]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(c, name, None), int) and getattr(c, name) >= 256:
            setattr(c, name, None)
    if hasattr(c, "tie_word_embeddings"):
        c.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    return c


#: Decoder layers up to this many parameters are probed at the model's own width (tiny, SmolLM2, Qwen3 up to
#: ~1.7B): the rates then include everything a layer runs (attention, norms, activations, the LoRA products),
#: not only its largest matrix product. Larger layers fall back to one Linear product at the MLP's shape.
REAL_LAYER_MAX_PARAMETERS = 60e6


def _layer_copy(config, layers: int):
    """`config` with `layers` decoder layers at its own width and a 256-token vocabulary."""
    import copy

    c = copy.deepcopy(config)
    c.num_hidden_layers, c.vocab_size = layers, 256
    if getattr(c, "layer_types", None):
        c.layer_types = (list(c.layer_types) * layers)[:layers]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(c, name, None), int) and getattr(c, name) >= 256:
            setattr(c, name, None)
    return c


def _probe_policy(config, dtype, setup, lora_cfg, cpu_linear: str):
    """The model of `config` with LoRA as the job configures it (and its gradient checkpointing and CPU kernels),
    for the probe's timings."""
    from transformers import AutoModelForCausalLM

    from grpo.models.cpu_linear import configured_choice, use_onednn_linears
    from grpo.models.loading import add_lora, enable_gradient_checkpointing

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if setup.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    policy = add_lora(model, lora_cfg)
    if setup.gradient_checkpointing:
        policy.enable_input_require_grads()
    if configured_choice(cpu_linear) == "onednn":
        use_onednn_linears(policy, "onednn")
    return policy


def _layer_times(config, info, job, setup, dtype, *, rows: int, prompt: int, tokens: int, merged: bool) -> dict:
    """Seconds of one decoder layer at the model's width, per kind: `decode` (rows x 1 token after `prompt` cached
    positions), `forward` and `update` (4 rows of tokens / 4 positions; update = forward + backward), measured as
    a two-layer copy minus a one-layer copy (the embedding, the 256-token head and the call's Python cancel),
    each with LoRA as configured (decode without it when the engine merges it for decoding)."""
    import torch

    from grpo.models.kv_cache import cache_kwarg, cache_of, preallocate

    e = job.engine
    seq = max(4, tokens // 4)
    times: dict[tuple[str, int], float] = {}
    for layers in (1, 2):
        torch.manual_seed(0)
        policy = _probe_policy(_layer_copy(config, layers), dtype, setup, e.lora, e.cpu_linear)
        policy.eval()
        with torch.no_grad(), (policy.disable_adapter() if merged else contextlib.nullcontext()):
            # one row's prompt prefilled and its cache repeated to `rows`, as the engine does for a group
            cache = cache_of(policy(input_ids=torch.randint(0, 256, (1, prompt)), use_cache=True, logits_to_keep=1))
            cache.batch_repeat_interleave(rows)
            preallocate(cache, 8)  # in-place KV writes per token, as the decode loop does
            kw = cache_kwarg(policy)
            one = torch.randint(0, 256, (rows, 1))
            times[("decode", layers)] = _timed(lambda: policy(input_ids=one, use_cache=True, logits_to_keep=1,
                                                              **{kw: cache}), 5)
        ids = torch.randint(0, 256, (4, seq))
        with torch.no_grad():
            times[("forward", layers)] = _timed(lambda: policy(input_ids=ids, use_cache=False, logits_to_keep=1), 3)
        policy.train()
        times[("update", layers)] = _timed(
            lambda: policy(input_ids=ids, use_cache=False, logits_to_keep=1).logits.sum().backward(), 3)
        del policy
    return {k: max(0.0, times[(k, 2)] - times[(k, 1)]) for k in ("decode", "forward", "update")}


def _layer_flops(info, kind: str, *, rows: int, prompt: int, tokens: int, merged: bool) -> float:
    """The FLOPs `_layer_times` times for one decoder layer (the counting of generation_work / logprob_work)."""
    body, lora, _, _ = _sizes(info, merged and kind == "decode")
    w = (body + lora) / info.layers
    per_pos = 4 * info.heads * info.head_dim  # QK^T and AV, per query per attended position, one layer
    if kind == "decode":
        return rows * (2 * w + per_pos * (prompt + 1))
    seq = max(4, tokens // 4)
    fwd = 4 * (2 * w * seq + per_pos * seq * (seq + 1) / 2)
    if kind == "forward":
        return fwd
    return 2 * fwd + 2 * (lora / info.layers) * 4 * seq + 4 * per_pos * seq * (seq + 1) / 2


def cpu_probe(config, info, job, setup, lengths: Lengths) -> Probe:
    """Measure this machine now (see the module docstring); 1-3 s for models up to SmolLM2's size."""
    import torch
    import torch.nn.functional as F

    from grpo.models.cpu_linear import configured_choice, use_onednn_linears
    from grpo.models.kv_cache import cache_kwarg, cache_of
    from grpo.models.loading import quiet_transformers
    from grpo.rollout.generate import GEN_BATCH
    from grpo.rollout.sampling import sample_rows

    quiet_transformers()
    t0, c0 = time.perf_counter(), time.process_time()
    dtype = torch.float32 if setup.dtype_bytes == 4 else torch.bfloat16
    h, e = job.hyperparameters, job.engine
    G = h.training_sample_per_prompt
    rows = min(h.batch_size * G, max(1, GEN_BATCH // G) * G)
    H = min(info.hidden, 2048)  # capped so that a large model's probe stays small: rates flatten out by then
    inter = min(info.intermediate * (info.top_k or 1), 8192)
    micro = min(e.micro_batch_size, h.batch_size * G)
    per_row = _mean(lengths.prompts) / G + _mean(lengths.responses or [h.inference_max_tokens])
    tokens = min(512, max(16, round(micro * per_row)))
    onednn = configured_choice(e.cpu_linear) == "onednn" and dtype == torch.float32
    torch.manual_seed(0)
    lin = torch.nn.Linear(H, inter, bias=False).to(dtype).requires_grad_(False)
    if onednn:
        use_onednn_linears(lin, "onednn")
    rate = {}
    with torch.no_grad():
        x = torch.randn(rows, H, dtype=dtype)
        rate["decode"] = 2 * rows * H * inter / _timed(lambda: lin(x))
        x = torch.randn(tokens, H, dtype=dtype)
        rate["forward"] = 2 * tokens * H * inter / _timed(lambda: lin(x))
    xg = torch.randn(tokens, H, dtype=dtype, requires_grad=True)

    def fwd_bwd():
        lin(xg).sum().backward()

    rate["update"] = 4 * tokens * H * inter / _timed(fwd_bwd)
    # lm_head + log-softmax + entropy at a chunk of positions, and one sampling step over [rows, vocab]
    V = min(info.vocab, 32768)  # scaled up to the vocabulary below: per position, the work is linear in it
    pos = min(128, tokens)
    head_w = torch.nn.Linear(H, V, bias=False).to(dtype).requires_grad_(False)
    if onednn:
        use_onednn_linears(head_w, "onednn")
    hid = torch.randn(pos, H, dtype=dtype)

    def head_chunk():
        logits = head_w(hid).float()
        logp = logits.log_softmax(-1)
        return (logp.exp() * logp).sum(-1)

    with torch.no_grad():
        head_s = _timed(head_chunk) / pos * (info.vocab / V) * (info.hidden / H)
        last = torch.randn(rows, V)
        sample_s = _timed(lambda: sample_rows(last.softmax(-1))) * info.vocab / V  # the decode loop's sampler
    del head_w, lin
    # fixed costs: the model's own classes at width 64, one and two layers, LoRA as configured
    times = {}
    for layers in (1, 2):
        policy = _probe_policy(_tiny_copy(config, layers), dtype, setup, e.lora, e.cpu_linear)
        ids = torch.randint(0, 256, (4, 16))
        one = torch.randint(0, 256, (4, 1))
        policy.eval()
        with torch.no_grad():
            cache = cache_of(policy(input_ids=ids, use_cache=True))
            kw = cache_kwarg(policy)

            def decode():  # the cache grows by a token per call (9 calls: 16 -> 25 positions)
                return policy(input_ids=one, use_cache=True, logits_to_keep=1, **{kw: cache})

            times[("decode", layers)] = _timed(decode, 5)
            times[("forward", layers)] = _timed(lambda: policy(input_ids=ids, use_cache=False, logits_to_keep=1), 5)
        policy.train()

        def update():
            policy(input_ids=ids, use_cache=False, logits_to_keep=1).logits.sum().backward()

        times[("update", layers)] = _timed(update, 3)
        del policy
    layer_s = {k: max(0.0, times[(k, 2)] - times[(k, 1)]) for k in ("decode", "forward", "update")}
    call_s = {k: max(0.0, times[(k, 1)] - layer_s[k]) for k in ("decode", "forward", "update")}
    per_layer = (info.active - info.lm_head) / max(1, info.layers)
    if per_layer <= REAL_LAYER_MAX_PARAMETERS and not info.experts:
        # a whole decoder layer at the model's width: its compute (the layer's time at width 64, the
        # operations' fixed costs, taken out: predict_cpu adds those per call) at the phase's shape
        merged = (e.rollout.backend == "transformers" and info.shares_prefix and setup.dtype_bytes == 4
                  and not setup.load_in_4bit)
        prompt = max(1, round(_mean(lengths.prompts)))
        shape = {"rows": rows, "prompt": prompt, "tokens": tokens, "merged": merged}
        real = _layer_times(config, info, job, setup, dtype, **shape)
        for k, t in real.items():
            compute = t - layer_s[k]
            if compute > 0:
                rate[k] = _layer_flops(info, k, **shape) / compute
    return Probe(rate=rate, call_s=call_s, layer_s=layer_s, sample_s=sample_s, head_s=head_s,
                 seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, load=os.getloadavg(),
                 threads=torch.get_num_threads())


def predict_cpu(phase: Phase, info, probe: Probe) -> float:
    """Seconds for one phase on this CPU: matrix FLOPs at the phase's measured rate (a generation's prefills at the
    forward rate: many positions per call, like a log-prob pass), plus its calls' fixed costs,
    plus sampling (generation) and the log-prob head's per-position cost beyond its matrix product."""
    k = phase.kind
    rate = probe.rate[k]
    head_flops_per_pos = 2 * info.vocab * info.hidden
    head_extra = max(0.0, probe.head_s - head_flops_per_pos / probe.rate["forward"]) * phase.head_positions
    matmul_s = (phase.flops - phase.prefill_flops) / rate + phase.prefill_flops / probe.rate["forward"]
    return (matmul_s + phase.calls * (probe.call_s[k] + info.layers * probe.layer_s[k])
            + phase.decode_steps * probe.sample_s + head_extra)


def predict_gpu(phase: Phase, info, gpu: str) -> float:
    """Seconds for one phase on `gpu` under the module's stated assumptions."""
    _, peak, bw = GPUS[gpu]
    launch = phase.calls * info.layers * LAUNCH_S_PER_LAYER
    if phase.kind == "decode":
        rest = phase.flops - phase.decode_flops
        decode = max(phase.decode_flops / (peak * MFU_FORWARD), phase.bytes / (bw * BW_EFFICIENCY))
        return rest / (peak * MFU_FORWARD) + decode + launch
    mfu = MFU_UPDATE if phase.kind == "update" else MFU_FORWARD
    return phase.flops / (peak * mfu) + launch


# -- the report ---------------------------------------------------------------------------------------------

def _f(x: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} "


def _s(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 120:
        return f"{x / 60:.1f} min"
    return f"{x:.2f} s"


PHASE_NAMES = {"gen": "generation", "ref": "reference log-probs", "old_log_prob": "old log-probs",
               "update_actor": "update"}


@dataclass
class TimePlan:
    work: StepWork
    steps: int | None
    evaluations: int
    validation: Phase | None
    lengths: Lengths
    cpu: dict[str, float] | None = None  # phase -> seconds (this CPU)
    cpu_validation: float | None = None
    probe: Probe | None = None
    gpu: dict[str, dict[str, float]] = field(default_factory=dict)  # gpu -> phase -> seconds
    gpu_validation: dict[str, float] = field(default_factory=dict)

    def step_seconds(self, where: dict[str, float]) -> float:
        return sum(where.values())

    def job_seconds(self, where: dict[str, float], validation: float | None) -> float | None:
        if self.steps is None:
            return None
        return self.steps * self.step_seconds(where) + self.evaluations * (validation or 0.0)


def make_time_plan(config, info, job, setup, *, steps: int | None, lengths_file: Path | None = None,
                   gpus: list[str] | None = None, probe: bool | None = None) -> TimePlan:
    """The time plan; `probe`: measure this CPU (default: when no CUDA device is visible)."""
    import torch

    lengths = data_lengths(job, lengths_file)
    work = step_work(info, job, lengths, setup)
    val_records = 0
    evaluations = 0
    if job.validation_file and Path(job.validation_file).is_file() and steps is not None:
        val_records = len(_records(Path(job.validation_file)))
        if job.engine.eval_max_records:
            val_records = min(val_records, job.engine.eval_max_records)
        n_train = len(_records(Path(job.training_file)))
        interval = job.eval_interval(n_train)
        evaluations = 1 + len({s for s in range(1, steps + 1) if s % interval == 0 or s == steps})
    validation = validation_work(info, job, lengths, setup, val_records) if val_records else None
    plan = TimePlan(work=work, steps=steps, evaluations=evaluations, validation=validation, lengths=lengths)
    if probe is None:  # a model of billions of parameters is not trained on a CPU: its CPU seconds would be noise
        probe = not torch.cuda.is_available() and info.total <= PROBE_MAX_PARAMETERS
    if probe:
        plan.probe = cpu_probe(config, info, job, setup, lengths)
        plan.cpu = {k: predict_cpu(p, info, plan.probe) for k, p in work.phases.items()}
        plan.cpu_validation = predict_cpu(validation, info, plan.probe) if validation else None
    for g in gpus if gpus is not None else list(GPUS):
        plan.gpu[g] = {k: predict_gpu(p, info, g) for k, p in work.phases.items()}
        plan.gpu_validation[g] = predict_gpu(validation, info, g) if validation else 0.0
    return plan


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def report_lines(plan: TimePlan, job, info) -> list[str]:
    h = job.hyperparameters
    w, L = plan.work, plan.lengths
    lines = ["time plan (one process; the reward handler, checkpoints and loading not included)",
             f"  prompts       {L.prompt_source}",
             f"  responses     {L.response_source}",
             f"  tokens        sampled {w.sampled_tokens:,.0f} per step ({w.sequences} responses); "
             f"log-prob passes run {w.trained_tokens:,.0f} (prompts once per group where shared, padding included)"]
    flops = ", ".join(f"{PHASE_NAMES[k]} {_f(p.flops)}FLOP" for k, p in w.phases.items())
    lines.append(f"  FLOPs/step    {flops}")
    steps = plan.steps
    if plan.probe is not None:
        p = plan.probe
        cpu = plan.cpu or {}
        lines.append(f"  this CPU      probe {p.seconds:.2f} s ({p.cpu_seconds:.2f} s CPU) at load {p.load[0]:.1f} "
                     f"({p.threads} torch thread(s); measured now, so other processes count): products "
                     f"{p.rate['decode'] / 1e9:.0f} / {p.rate['forward'] / 1e9:.0f} / {p.rate['update'] / 1e9:.0f} "
                     f"GFLOP/s (decode / log-prob / update); per layer call {p.layer_s['decode'] * 1e3:.2f} / "
                     f"{p.layer_s['forward'] * 1e3:.2f} / "
                     f"{p.layer_s['update'] * 1e3:.2f} ms")
        parts = " + ".join(f"{PHASE_NAMES[k]} {cpu[k]:.2f}" for k in w.phases)
        lines.append(f"                predicted per step: {parts} = {plan.step_seconds(cpu):.2f} s")
        job_s = plan.job_seconds(cpu, plan.cpu_validation)
        if job_s is not None:
            val = (f" + {plan.evaluations} validations x {plan.cpu_validation:.2f} s" if plan.validation else "")
            lines.append(f"                whole job: {steps} steps{val} = {_s(job_s)}")
    if plan.probe is None and plan.cpu is None:
        why = ("a CUDA device is present" if _cuda() else
               f"the model has more than {PROBE_MAX_PARAMETERS / 1e9:.0f} B parameters")
        lines.append(f"  this CPU      not probed ({why})")
    for g, secs in plan.gpu.items():
        name = GPUS[g][0]
        job_s = plan.job_seconds(secs, plan.gpu_validation.get(g))
        parts = " + ".join(f"{secs[k]:.2f}" for k in w.phases)
        total = (f"; whole job {_s(job_s)} = {job_s / 3600:.2g} GPU-hours" if job_s is not None else
                 "; whole job: unknown steps")
        lines.append(f"  {g:<13} ({name}, assumed) {parts} = {plan.step_seconds(secs):.2f} s per step{total}")
    if plan.gpu:
        lines.append(f"  GPU figures are assumptions, not measurements: bf16 peak from the datasheets at MFU "
                     f"{MFU_FORWARD:.0%} (forward) / {MFU_UPDATE:.0%} (update), decode at {BW_EFFICIENCY:.0%} of "
                     f"the HBM bandwidth, {LAUNCH_S_PER_LAYER * 1e3:.1f} ms per layer per forward call "
                     f"(grpo.training.time_plan)")
    if info.experts and "parameters" in info.lora_targets:
        fold = 2 * info.lora_rank * info.experts
        lines.append(f"  note          peft folds W + B A into every expert on each forward call ({_f(fold)}FLOP and "
                     f"{4 * info.experts * 2 / 2**30:.0f} GiB of traffic per call): it bounds a decode step")
    return lines
