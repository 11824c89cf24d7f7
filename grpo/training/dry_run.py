"""`grpo train CONFIG --dry-run`: check a job and print its plan, with no weights loaded (seconds, on a CPU).

The model is built from its config on the `meta` device (shapes only), the LoRA adapter is applied to it by
peft exactly as training would, and the parameters are counted from that. Memory per GPU is then estimated
from the counts and the job's sizes: bf16 (or 4-bit) weights, the fp32 adapter with its gradients and Adam
states, the generation KV cache, the update's activations with or without gradient checkpointing, the
log-prob chunk (grpo.training.actor), for fp32 decoding the merged LoRA copies (grpo.models.merge) and, for MoE
expert LoRA, peft's per-layer W + BA fold. The estimates are first-order (they leave out allocator fragmentation,
CUDA context and temporaries): read them as "fits comfortably", "tight" or "does not fit", not to the gigabyte.
scripts/bench_memory.py checks them against CPU runs (docs/scale.md, "Memory model vs measured").

Configs: a local model directory's config.json; the embedded tiny model's recipe; and, so that the two
Bedrock models plan offline, their architectures copied from the hub (KNOWN_CONFIGS, sources beside them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from grpo.config import TINY_MODEL, TINY_TOOLS_MODEL, JobConfig
from grpo.errors import UserError

#: The Bedrock models' architectures, copied from their config.json on the Hugging Face hub (retrieved
#: 2026-11): huggingface.co/Qwen/Qwen3-32B/blob/main/config.json and
#: huggingface.co/openai/gpt-oss-20b/blob/main/config.json. GPT-OSS's `quantization_config` (MXFP4 experts)
#: is left out: training dequantizes the experts to bf16 (grpo.models.loading.load_base_model).
KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen3-32B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 25600,
        "max_position_embeddings": 40960, "max_window_layers": 64, "num_attention_heads": 64,
        "num_hidden_layers": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "openai/gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
        "attention_dropout": 0.0, "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64,
        "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
        "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
        "pad_token_id": 199999, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 201088,
    },
}
GPU_GIB = 79  # usable GiB of an "80 GB" H100 / A100, the GPU the verdicts are against
NF4_BYTES = 4.127 / 8  # NF4 with double quantization: 4 bits + ~0.127 bits of block constants per weight
GIB = 2**30


def model_config(name: str):
    """(transformers config, where it came from) for a model path, hub id or the embedded tiny model."""
    from transformers import AutoConfig, Qwen3Config

    if name in (TINY_MODEL, TINY_TOOLS_MODEL):
        from grpo.models.tiny import RECIPE, TOOLS_RECIPE, default_cache_dir, recipe_hash

        recipe, prefix, what = ((RECIPE, "tiny-qwen3", "RECIPE") if name == TINY_MODEL
                                else (TOOLS_RECIPE, "tiny-tools", "TOOLS_RECIPE"))
        cached = default_cache_dir() / f"{prefix}-{recipe_hash(recipe)}" / "config.json"
        if cached.is_file():
            return AutoConfig.from_pretrained(cached.parent), f"{cached.parent} (the cached tiny model)"
        cfg = Qwen3Config(**recipe["model"], vocab_size=recipe["tokenizer_vocab_size"])
        return cfg, f"grpo.models.tiny.{what} (not built yet; vocabulary size approximate)"
    from grpo.models.gguf import gguf_source

    gguf = gguf_source(name)
    if gguf is not None:
        from grpo.models.gguf import gguf_config

        return gguf_config(gguf), f"{gguf} (GGUF metadata)"
    if Path(name).is_dir():
        try:
            return AutoConfig.from_pretrained(name), f"{name}/config.json"
        except (OSError, ValueError) as e:
            raise UserError(f"model '{name}': cannot read its config ({str(e).splitlines()[0]})") from None
    if name in KNOWN_CONFIGS:
        d = dict(KNOWN_CONFIGS[name])
        return AutoConfig.for_model(d.pop("model_type"), **d), f"embedded copy of huggingface.co/{name} config.json"
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), f"{name} (Hugging Face cache)"
    except (OSError, ValueError):
        raise UserError(f"model '{name}': no local directory, no cached config, and not one of the embedded "
                        f"configs ({', '.join(KNOWN_CONFIGS)}); give a local model directory as engine.model") from None


@dataclass
class ModelInfo:
    """Shapes and parameter counts of the policy, from a meta-device build."""

    model_type: str
    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    total: int  # base parameters
    trainable: int  # LoRA parameters
    embedding: int  # input embedding (a lookup: no FLOPs)
    lm_head: int
    linear_in_layers: int  # nn.Linear weights inside the decoder layers (what 4-bit quantizes)
    experts: int  # MoE expert parameters (all experts)
    n_experts: int = 0
    top_k: int = 0
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    lora_targets: str = ""
    shares_prefix: bool = False  # grpo.models.kv_cache: a group's prompt runs once (generation and the update)
    lora_linear: int = 0  # weights of the nn.Linear layers LoRA wraps (what grpo.models.merge copies in fp32)
    lora_rank: int = 0
    expert_lora: int = 0  # LoRA parameters on MoE expert stacks (peft's target_parameters)

    @property
    def active(self) -> int:
        """Parameters a token passes through (MoE: top_k of n_experts), lm_head included, embedding not."""
        experts = self.experts * self.top_k // self.n_experts if self.n_experts else self.experts
        return self.total - self.embedding - self.experts + experts

    def flops_per_token(self, *, train: bool) -> float:
        """2N per token forward; ~4N for an update with a frozen base (forward + the backward pass for
        activation gradients; weight gradients only for the small adapter). Attention scores not counted."""
        return (4 if train else 2) * self.active


def inspect_model(config, lora) -> ModelInfo:
    """Build `config` on the meta device, apply our LoRA to it with peft, and count."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from grpo.models.kv_cache import shares_prefix
    from grpo.models.loading import lora_target_parameters, peft_lora_config, quiet_transformers

    quiet_transformers()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        base = {n: p.numel() for n, p in model.named_parameters()}
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}")
        mtype = getattr(config, "model_type", "")
        try:
            policy = get_peft_model(model, peft_lora_config(lora, mtype))
        except ValueError as e:
            raise UserError(f"engine.lora: {str(e).splitlines()[0]}") from None
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    expert_lora = sum(p.numel() for n, p in policy.named_parameters() if p.requires_grad and ".experts." in n)
    lora_linear = sum(m.base_layer.weight.numel() for m in policy.modules()
                      if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), torch.nn.Linear))
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    params = lora_target_parameters(lora, mtype)
    targets = f"modules {lora.target_modules}" + (f"; parameters {', '.join(params)}" if params else "")
    hidden = config.hidden_size
    return ModelInfo(
        model_type=mtype, architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        layers=config.num_hidden_layers, hidden=hidden, heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or hidden // config.num_attention_heads,
        intermediate=config.intermediate_size, vocab=config.vocab_size, total=sum(base.values()),
        trainable=trainable, embedding=emb, lm_head=0 if (head is None or tied) else head.weight.numel(),
        linear_in_layers=linear, experts=sum(v for n, v in base.items() if ".experts." in n),
        n_experts=getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0,
        top_k=getattr(config, "num_experts_per_tok", None) or 0,
        layer_types=list(getattr(config, "layer_types", None) or []),
        sliding_window=getattr(config, "sliding_window", None), lora_targets=targets,
        shares_prefix=shares_prefix(model), lora_linear=lora_linear, lora_rank=lora.rank, expert_lora=expert_lora)


@dataclass
class Setup:
    """How the job runs: processes, sharding, precision."""

    world: int = 1
    sharded: bool = False  # FSDP2 / ZeRO-3: weights and optimizer states split over the processes
    dtype_bytes: int = 2
    load_in_4bit: bool = False
    gradient_checkpointing: bool = True
    attn: str = "sdpa"
    logprob_chunk: int = 512
    vllm_share: float | None = None  # engine.rollout.gpu_memory_utilization when the vllm backend samples


def estimate_memory(info: ModelInfo, job: JobConfig, s: Setup) -> dict[str, float]:
    """Bytes per GPU, by part (see the module docstring for what is and is not counted)."""
    h, e = job.hyperparameters, job.engine
    seq = h.max_prompt_length + h.inference_max_tokens
    G = h.training_sample_per_prompt
    shard = s.world if s.sharded else 1
    if s.load_in_4bit:
        weights = info.linear_in_layers * NF4_BYTES + (info.total - info.linear_in_layers) * 2
    else:
        weights = info.total * s.dtype_bytes
    out = {"weights": weights / shard, "adapter": info.trainable * 16 / shard}  # fp32 weights, grads, Adam m and v
    if s.sharded:  # a layer is gathered whole for its forward/backward (and the next one prefetched)
        out["weights"] += 2 * (weights - info.embedding * s.dtype_bytes - info.lm_head * s.dtype_bytes) / info.layers
    from grpo.rollout.generate import GEN_BATCH

    types = info.layer_types or ["full_attention"] * info.layers
    if job.engine.rollout.backend == "continuous":
        # grpo.rollout.samplers sizes the paged cache for every sequence of the step at full length, twice over
        gen_seqs, cached = 2 * h.batch_size // s.world * G, info.layers * seq
    else:
        gen_seqs = min(h.batch_size // s.world * G, max(1, GEN_BATCH // G) * G)
        cached = sum(min(seq, info.sliding_window or seq) if t == "sliding_attention" else seq for t in types)
    out["kv_cache"] = gen_seqs * cached * 2 * info.kv_heads * info.head_dim * s.dtype_bytes
    from grpo.models.merge import MERGE_LIMIT_BYTES

    if (e.rollout.backend == "transformers" and info.shares_prefix and s.dtype_bytes == 4 and not s.load_in_4bit
            and not s.sharded and info.lora_linear * 4 <= MERGE_LIMIT_BYTES):
        out["merged_lora"] = info.lora_linear * 4  # grpo.models.merge: fp32 decoding on merged copies of W + BA
    micro = min(e.micro_batch_size, job.mini_batch_prompts() // s.world * G)
    # grpo.models.forward runs each group's prompt once for prefix-sharing decoders, except under FSDP2/ZeRO-3 and
    # with gradient checkpointing (its training forward keeps no KV cache, so every row runs its prompt)
    shared = info.shares_prefix and not s.sharded and not s.gradient_checkpointing
    if shared:
        tokens = -(-micro // G) * h.max_prompt_length + micro * h.inference_max_tokens
    else:
        tokens = micro * seq
    q, kv = info.heads * info.head_dim, info.kv_heads * info.head_dim
    inter = info.intermediate * (info.top_k or 1)
    b = s.dtype_bytes  # the activations are in the weights' dtype (fp32 runs: 4 bytes, not bf16's 2)
    per_layer = tokens * b * (6 * info.hidden + 2 * q + 3 * kv + 4 * inter)  # tensors saved for backward
    if s.attn == "eager":  # the [micro, heads, T, T] scores: fp32 softmax and the probabilities
        per_layer += micro * info.heads * seq * seq * (4 + b)
    if shared:  # each row attends over its group's prompt: attention saves that prompt's K and V per row, repeated
        # to every query head when there are fewer KV heads (transformers' repeat_kv: a mask is always given here)
        per_layer += micro * h.max_prompt_length * b * 2 * (q if info.kv_heads < info.heads else kv)
    checkpoints = info.layers * tokens * info.hidden * b  # each layer's input, kept by gradient checkpointing
    out["activations"] = checkpoints + per_layer if s.gradient_checkpointing else info.layers * per_layer
    # The log-prob chunk's backward (grpo.models.forward._head_chunk, recomputed under checkpoint, entropy included):
    # the fp32 logits z and softmax p saved, then the gradients through p * z (two) and through the softmax (one):
    # five fp32 [positions, vocab] tensors at once, whatever the weights' dtype (measured, docs/scale.md)
    positions = min(s.logprob_chunk, micro * h.inference_max_tokens)  # a chunk holds only response positions
    out["logprob_chunk"] = positions * info.vocab * 4 * 5
    if s.gradient_checkpointing:  # the head's backward ends before the last layer is recomputed: one or the other
        out["update"] = checkpoints + max(per_layer, out["logprob_chunk"])
    else:  # every layer's saved tensors are held while the head's backward runs
        out["update"] = out["activations"] + out["logprob_chunk"]
    if info.experts and "parameters" in info.lora_targets:  # peft folds W + BA per MoE layer, and its gradient
        out["expert_fold"] = 2 * info.experts / info.layers * s.dtype_bytes
        out["update"] += out["expert_fold"]
    update = out["update"]
    generation = out["kv_cache"] + out.get("merged_lora", 0.0)
    if s.sharded:  # grpo.training.distributed gathers every layer once per generate call and keeps them till it ends
        out["gathered_for_generation"] = weights - out["weights"]
        generation += out["gathered_for_generation"]
    if s.vllm_share is not None:  # vLLM's own full bf16 copy (one engine per process) + its KV cache, in its share
        out["vllm_weights"] = info.total * 2
        out["vllm_reserved"] = max(s.vllm_share * GPU_GIB * GIB, out["vllm_weights"] + out["kv_cache"])
        generation = out["vllm_reserved"]  # asleep during the update: weights on the host, KV cache freed
    out["peak"] = out["weights"] + out["adapter"] + max(generation, update)
    return out


def setup_for(job: JobConfig, info: ModelInfo, world: int = 1, sharded: bool = False) -> Setup:
    from grpo.models.forward import LOGPROB_CHUNK
    from grpo.models.loading import model_options

    e, opts = job.engine, model_options(job.engine)
    attn = opts["attn_implementation"] or ("eager" if info.model_type == "gpt_oss" else "sdpa")
    return Setup(world=world, sharded=sharded, dtype_bytes=4 if e.dtype == "float32" else 2,
                 load_in_4bit=opts["load_in_4bit"], gradient_checkpointing=e.gradient_checkpointing, attn=attn,
                 logprob_chunk=LOGPROB_CHUNK,
                 vllm_share=e.rollout.gpu_memory_utilization if e.rollout.backend == "vllm" else None)


def _records(job: JobConfig) -> tuple[int | None, str]:
    from grpo.data import load_records

    path = Path(job.training_file)
    if not path.is_file():
        return None, f"unknown: training_file {path} not found (total_steps = ceil(records / batch_size) x n_epochs)"
    n = len(load_records(path, allow_small=True))  # a bad file is a UserError naming FILE:LINE: field
    h = job.hyperparameters
    return n, (f"{job.total_steps(n)} ({n} records / batch_size {h.batch_size} x {h.n_epochs} epoch(s); "
               "before max_prompt_length filtering, which needs the tokenizer)")


def _gpu_counts(job: JobConfig) -> list[int]:
    """1, and a multi-GPU count: the launched world size, else the largest <= 8 that divides the batches."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:
        return [1, launched]
    n = max((k for k in range(2, 9) if job.hyperparameters.batch_size % k == 0 and job.mini_batch_prompts() % k == 0),
            default=None)
    return [1, n] if n else [1]


def _n(x: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f}"


def algorithm_lines(job: JobConfig) -> list[str]:
    """engine.algorithm as it will run: the preset expanded, the loss's own knobs, DAPO's sampling and shaping,
    and the keys the job set over its preset."""
    from grpo.algorithm_config import preset_overrides
    from grpo.algorithms.core import get_policy_loss
    import inspect

    a = job.engine.algorithm
    declared = inspect.signature(get_policy_loss(a.policy_loss)).parameters
    knobs = ", ".join(f"{k} {v}" for k, v in a.loss_knobs().items() if k in declared)
    head = f"preset {a.preset}: " if a.preset else ""
    lines = [f"algorithm     {head}adv_estimator {a.adv_estimator}"
             + (f" (norm_adv_by_std {str(a.norm_adv_by_std).lower()})" if a.adv_estimator in ("grpo", "grpo_passk") else "")
             + (f" (gamma {a.gamma})" if a.adv_estimator == "reinforce_plus_plus" else "")
             + f", policy_loss {a.policy_loss}" + (f" ({knobs})" if knobs else "")
             + f", loss_agg_mode {a.loss_agg_mode}, kl_coef {a.kl_coef}" + (f" ({a.kl_penalty})" if a.kl_coef else "")
             + (f", entropy_coef {a.entropy_coef}" if a.entropy_coef else "")]
    fg, ob = a.filter_groups, a.overlong_buffer
    extra = []
    if fg.enable:
        extra.append(f"dynamic sampling on ({fg.metric} must not tie; at most {fg.max_num_gen_batches} generation rounds)")
    if ob.enable:
        extra.append(f"overlong buffer {job.overlong_buffer_len()} tokens before {job.hyperparameters.inference_max_tokens}, "
                     f"penalty up to {ob.penalty_factor}")
    if a.adv_estimator == "remax":
        extra.append("remax: one greedy response per prompt sampled and scored as the baseline")
    if extra:
        lines.append("              " + "; ".join(extra))
    over = preset_overrides(a)
    if over:
        lines.append("              set over the preset: " + ", ".join(f"{k} {v[1]} (preset: {v[0]})" for k, v in over.items()))
    return lines


def make_plan(job: JobConfig, *, lengths: Path | None = None, gpus: list[str] | None = None,
              probe: bool | None = None) -> str:
    """The dry-run report for `job` (a validated JobConfig): the model, memory per GPU and the time plan
    (grpo.training.time_plan: `lengths` a `grpo eval` result, `gpus` the GPUs to price, default all;
    `probe` measure this CPU, default when there is no CUDA device)."""
    h, e = job.hyperparameters, job.engine
    config, source = model_config(job.local_model)
    info = inspect_model(config, e.lora)
    base_setup = setup_for(job, info)
    n_records, steps = _records(job)
    G = h.training_sample_per_prompt
    seq = h.max_prompt_length + h.inference_max_tokens
    arch = (f"{info.layers} layers, hidden {info.hidden}, {info.heads} heads / {info.kv_heads} KV heads x "
            f"{info.head_dim}, MLP {info.intermediate}, vocabulary {info.vocab:,}")
    if info.n_experts:
        arch += f", {info.n_experts} experts (top {info.top_k})"
    prec = ("4-bit NF4 base (QLoRA)" if base_setup.load_in_4bit else
            "fp32" if base_setup.dtype_bytes == 4 else "bf16") + f" weights, attention {base_setup.attn}, " \
        f"gradient checkpointing {'on' if e.gradient_checkpointing else 'off'}"
    lines = [
        f"model         {job.local_model} ({info.architecture}; config: {source})",
        f"architecture  {arch}",
        f"parameters    {_n(info.total)} (active per token: {_n(info.active)}; "
        f"{info.flops_per_token(train=True) / 1e9:.1f} GFLOP per token in the update)",
        f"LoRA          rank {e.lora.rank}, alpha {e.lora.alpha}; {info.lora_targets}",
        f"trainable     {_n(info.trainable)} ({100 * info.trainable / info.total:.2f}% of the base)",
        f"precision     {prec}",
        f"steps         {steps}",
        f"per step      {h.batch_size} prompts x {G} samples = {h.batch_size * G} sequences of <= {seq:,} tokens; "
        f"{h.batch_size // job.mini_batch_prompts() * e.ppo_epochs} optimizer step(s); micro-batch {e.micro_batch_size}",
        *algorithm_lines(job),
        f"rollout       engine.rollout.backend {e.rollout.backend}" + (
            "" if e.rollout.backend == "transformers" else f"; old log-probs recomputed, TIS {e.rollout.tis} (cap {e.rollout.tis_cap})"),
        "",
    ]
    columns = []
    for n in _gpu_counts(job):
        columns.append((f"{n} GPU" if n == 1 else f"{n} GPUs DDP", estimate_memory(info, job, setup_for(job, info, n))))
        if n > 1:
            columns.append((f"{n} GPUs FSDP2/ZeRO-3", estimate_memory(info, job, setup_for(job, info, n, True))))
    rows = [("weights", "weights"), ("adapter fp32 + grads + Adam", "adapter"),
            ("generation KV cache", "kv_cache"),
            ("merged LoRA copies for decoding (fp32)", "merged_lora"),
            ("layers gathered for generation (sharded)", "gathered_for_generation"),
            (f"update activations ({'GC' if e.gradient_checkpointing else 'no GC'})", "activations"),
            (f"log-prob chunk (<= {base_setup.logprob_chunk} positions)", "logprob_chunk"),
            ("expert LoRA fold (one layer)", "expert_fold"),
            ("update micro-batch peak" + (" (checkpoints + max(layer, chunk))" if e.gradient_checkpointing else ""),
             "update"),
            ("vLLM weights copy (bf16)", "vllm_weights"),
            ("vLLM reserved while sampling", "vllm_reserved"),
            ("peak = weights + adapter + max(generation, update)", "peak")]
    width = max(len(r[0]) for r in rows) + 2
    lines.append("memory per GPU, GiB (estimate)".ljust(width) + "".join(f"{c:>22}" for c, _ in columns))
    for label, key in rows:
        if all(key not in m for _, m in columns):
            continue
        lines.append(f"  {label}".ljust(width) + "".join(f"{m.get(key, 0.0) / GIB:>22.1f}" for _, m in columns))
    verdicts = [("fits" if m["peak"] / GIB <= 0.9 * GPU_GIB else "tight" if m["peak"] / GIB <= GPU_GIB
                 else "does not fit") for _, m in columns]
    lines.append("  on an 80 GB GPU".ljust(width) + "".join(f"{v:>22}" for v in verdicts))
    vllm = columns[0][1].get("vllm_weights")
    if vllm is not None and vllm > e.rollout.gpu_memory_utilization * GPU_GIB * GIB:
        lines.append(f"note: vLLM's own weights ({vllm / GIB:.1f} GiB) exceed engine.rollout.gpu_memory_utilization="
                     f"{e.rollout.gpu_memory_utilization} of an 80 GB GPU; vLLM will refuse to start: raise it (if the "
                     "peak allows) or sample with the transformers / continuous backend")
    if verdicts[0] != "fits" and not base_setup.load_in_4bit and info.experts == 0:
        lines.append("hint: engine.load_in_4bit (QLoRA, needs bitsandbytes) or sharding over several GPUs "
                     "(configs/accelerate/) brings it under one GPU's memory")
    from grpo.training.time_plan import make_time_plan, report_lines

    plan = make_time_plan(config, info, job, base_setup, steps=job.total_steps(n_records) if n_records else None,
                          lengths_file=lengths, gpus=gpus, probe=probe)
    lines += [""] + report_lines(plan, job, info)
    return "\n".join(lines)


def dry_run(job: JobConfig, source: str, *, lengths: Path | None = None, gpus: list[str] | None = None) -> str:
    return (f"dry run of {source}: the config is valid; nothing was loaded or trained\n"
            + make_plan(job, lengths=lengths, gpus=gpus))
