"""The policy: a causal LM with a LoRA adapter (peft), and its tokenizer and chat template.

The reference policy for the KL term is the same model with the adapter disabled
(`policy.disable_adapter()`), so there is never a second copy of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from grpo.config import TINY_MODEL, TINY_TOOLS_MODEL, LoraConfig
from grpo.errors import UserError
from grpo.models.cpu_linear import configured_choice, use_onednn_linears

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str, *, progress: bool = True) -> str:
    """A local path or hub id; `grpo:tiny-arith` builds (once, cached) the embedded tiny model, `grpo:tiny-tools`
    the tool-calling one (grpo.models.tiny_tools); a GGUF model
    (a `.gguf` file, a directory with one, or `grpo:smollm2-135m-instruct`) is converted once into a cached
    transformers directory (grpo.models.gguf)."""
    if name == TINY_MODEL:
        from grpo.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(progress=progress))
    if name == TINY_TOOLS_MODEL:
        from grpo.models.tiny import TOOLS_RECIPE, ensure_tiny_model

        return str(ensure_tiny_model(progress=progress, base_recipe=TOOLS_RECIPE))
    from grpo.models.gguf import ensure_gguf_model, gguf_source

    gguf = gguf_source(name)
    if gguf is not None:
        return str(ensure_gguf_model(gguf, progress=progress))
    return name


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, fp32 elsewhere. On a CPU with AVX512-BF16/AMX, bf16 products run 3-6x
    faster, but a whole step only 0.8-1.25x (slower on the tiny models) and the numbers would depend on the
    processor; CPU runs stay fp32 unless `bfloat16` is asked for (measured: docs/scale.md, "bf16 against fp32")."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quiet_transformers() -> None:
    """transformers' own progress bars (loading, saving shards) would interleave with ours."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # LoRA on a tied lm_head adapts the output projection only (the input embedding stays the base's): intended.
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*ensure_weight_tying.*", category=UserWarning)
    # ... and peft then saves the (tied) embedding with the adapter, so the checkpoint loads on its own: intended.
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*", category=UserWarning)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{path}': cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise UserError(f"model '{path}': its tokenizer has no chat template; RFT data is chat messages")
    return tok


def model_options(engine) -> dict[str, Any]:
    """The engine's model-loading options as `load_policy` keywords (fields read with defaults, so a config
    without them loads as before): `load_in_4bit` (QLoRA base) and `attn_implementation`."""
    return {"load_in_4bit": bool(getattr(engine, "load_in_4bit", False)),
            "attn_implementation": getattr(engine, "attn_implementation", None),
            "cpu_linear": getattr(engine, "cpu_linear", None)}


def _require(module: str, what: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the '{module}' package, which is not installed: pip install {extra}")


def _quant_method(path: str) -> str | None:
    """The checkpoint's own quantization (e.g. GPT-OSS ships MXFP4 experts), read from its config."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None  # load_base_model reports the real problem
    q = getattr(cfg, "quantization_config", None)
    return (q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)) or None


def load_base_model(path: str, dtype: torch.dtype, *, gradient_checkpointing: bool = False,
                    load_in_4bit: bool = False, attn_implementation: str | None = None, cpu_linear: str | None = None):
    """The base causal LM in `dtype`. MXFP4 checkpoints (GPT-OSS) are dequantized to `dtype`: LoRA trains the
    experts through peft `target_parameters`, which needs real weight tensors. `load_in_4bit` quantizes the
    linear layers to NF4 with bitsandbytes (QLoRA; Qwen3-32B on one 80 GB GPU). Frozen float32 Linear layers
    compute through oneDNN while they are on the CPU (grpo.models.cpu_linear; `cpu_linear="aten"`: not)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if _quant_method(path) == "mxfp4":
        if load_in_4bit:
            raise UserError(f"model '{path}': engine.load_in_4bit is for bf16 checkpoints such as Qwen3-32B; this "
                            "one ships MXFP4 weights, which are dequantized to bf16 (GPT-OSS-20B fits one 80 GB GPU)")
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    elif load_in_4bit:
        kwargs.update(_bnb_4bit_kwargs(dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"model '{path}': cannot load it ({str(e).splitlines()[0]})") from None
    if load_in_4bit and not torch.cuda.is_available():
        _unpack_on_cpu(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    use_onednn_linears(model, configured_choice(cpu_linear))
    return model


def _bnb_4bit_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained keywords for an NF4 base (double quantization). On a GPU the 4-bit matmuls compute in
    bf16 (`dtype` if half precision), placed on this process's GPU (a 4-bit model cannot be moved after
    loading). On the CPU they compute in `dtype` (float32 there), so that rollout and training log-probs
    are the dequantized model's to float32 rounding. Storage in the compute dtype lets FSDP shard it."""
    _require("bitsandbytes", "engine.load_in_4bit (a 4-bit QLoRA base)", "'grpo[qlora]'")
    import os

    from transformers import BitsAndBytesConfig

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    else:
        compute = dtype
    out: dict[str, Any] = {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)}
    if on_gpu:
        out["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return out


def _unpack_on_cpu(model) -> None:
    """Keep bitsandbytes' Linear4bit on its autograd path on the CPU. On AVX512-BF16 CPUs its first eval-mode,
    no-grad forward (a rollout) repacks the weight in place into a bf16 inference layout whose matmul has no
    backward: later training steps then get silently wrong gradients through the base (bitsandbytes 0.50;
    warned by torch as "an autograd kernel was not registered"). Off, every forward dequantizes NF4 to
    `compute_dtype` and multiplies (slower on the CPU, which serves tests; correct gradients)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant, so LoRA and hooks work), no KV cache.
    transformers 5 renamed the method (activation_checkpointing_enable); older releases have the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


#: LoRA on weights that are parameters, not nn.Linear modules (peft `target_parameters`), per model type:
#: GPT-OSS keeps each layer's experts as two stacked [experts, in, out] tensors.
EXPERT_PARAMETERS = {"gpt_oss": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}


def lora_target_parameters(lora: LoraConfig, model_type: str | None) -> list[str]:
    """engine.lora.target_parameters if given (`[]`: none), else the MoE experts of known MoE models."""
    given = getattr(lora, "target_parameters", None)
    return list(given) if given is not None else list(EXPERT_PARAMETERS.get(model_type or "", []))


def peft_lora_config(lora: LoraConfig, model_type: str | None):
    """The peft LoraConfig for our `engine.lora` on a model of `model_type`."""
    from peft import LoraConfig as PeftLoraConfig

    params = lora_target_parameters(lora, model_type)
    if params and lora.dropout:
        raise UserError(f"engine.lora.dropout={lora.dropout}: LoRA on expert parameters "
                        f"({', '.join(params)}) needs dropout 0 (peft cannot apply dropout there)")
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, target_parameters=params or None, task_type="CAUSAL_LM")


def add_lora(model, lora: LoraConfig, *, adapter_path: str | None = None):
    """Wrap `model` in a peft LoRA adapter (new, or loaded trainable from `adapter_path`)."""
    from peft import PeftModel, get_peft_model

    from grpo.models.lora_forward import scale_on_rank_side

    quiet_transformers()
    if adapter_path:
        policy = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    else:
        cfg = peft_lora_config(lora, getattr(model.config, "model_type", None))
        try:
            policy = get_peft_model(model, cfg)
        except ValueError as e:  # e.g. a target that matches nothing: the user's engine.lora is wrong
            raise UserError(f"engine.lora: {str(e).splitlines()[0]}") from None
    scale_on_rank_side(policy)  # the adapter's scaling on its rank-r side where that is exact (same numbers)
    return policy


def load_policy(path: str, lora: LoraConfig, *, dtype: torch.dtype, gradient_checkpointing: bool = False,
                adapter_path: str | None = None, load_in_4bit: bool = False, attn_implementation: str | None = None,
                cpu_linear: str | None = None):
    model = load_base_model(path, dtype, gradient_checkpointing=gradient_checkpointing, load_in_4bit=load_in_4bit,
                            attn_implementation=attn_implementation, cpu_linear=cpu_linear)
    policy = add_lora(model, lora, adapter_path=adapter_path)
    if gradient_checkpointing:
        policy.enable_input_require_grads()
    return policy


def load_for_inference(path: str, adapter: str | None = None, *, dtype: torch.dtype = torch.float32):
    """Base model plus, optionally, a trained adapter (peft format), in eval mode."""
    model = load_base_model(path, dtype)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: not a peft adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def chat_template_kwargs(reasoning_effort: str) -> dict[str, Any]:
    """`reasoning_effort` as each chat template understands it.

    Qwen3: thinking off for `low`, on otherwise (`enable_thinking`). GPT-OSS (harmony): the system
    prompt's `Reasoning: low|medium|high` (`reasoning_effort`). Templates ignore variables they do not use.
    """
    return {"enable_thinking": reasoning_effort != "low", "reasoning_effort": reasoning_effort}


# -- chat templates --------------------------------------------------------------------------------------------
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
#: The special tokens each stored template writes (besides the ChatML ones the tiny tokenizer already has).
TEMPLATE_TOKENS = {
    "qwen3": {"special": [], "added": ["<think>", "</think>"], "eos": "<|im_end|>"},
    "gpt_oss": {"special": ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
                            "<|constrain|>"], "added": [], "eos": "<|return|>"},
}


def chat_template(name: str) -> str:
    """The stored real chat template `name` (`qwen3`, `gpt_oss`): grpo/templates/<name>.jinja."""
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.is_file():
        raise UserError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATE_TOKENS))}")
    return path.read_text(encoding="utf-8")


def chat_tokenizer(name: str, *, vocab_size: int = 384):
    """The tiny BPE tokenizer (grpo.models.tiny_data) with a real model's chat template and the special tokens it
    writes, so that prompts render token for token the way Qwen3's or GPT-OSS's own tokenizer renders them
    (tests, and scripts/gpu_smoke.py, where no hub is reachable)."""
    from tokenizers import AddedToken

    from grpo.models.tiny_data import build_tokenizer

    spec = TEMPLATE_TOKENS.get(name)
    if spec is None:
        raise UserError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATE_TOKENS))}")
    tok = build_tokenizer(vocab_size)
    if spec["special"]:
        tok.add_special_tokens({"additional_special_tokens": spec["special"]})
    if spec["added"]:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
    tok.eos_token = spec["eos"]
    tok.chat_template = chat_template(name)
    return tok


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
