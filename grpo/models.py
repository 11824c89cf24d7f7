"""The policy: a causal LM with a LoRA adapter (peft), and its tokenizer and chat template.

The reference policy for the KL term is the same model with the adapter disabled
(`policy.disable_adapter()`), so there is never a second copy of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from grpo.config import TINY_MODEL, LoraConfig
from grpo.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str, *, progress: bool = True) -> str:
    """A local path or hub id; `grpo:tiny-arith` builds (once, cached) the embedded tiny model."""
    if name == TINY_MODEL:
        from grpo.tiny import ensure_tiny_model

        return str(ensure_tiny_model(progress=progress))
    return name


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
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


def load_base_model(path: str, dtype: torch.dtype, *, gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{path}': cannot load it ({str(e).splitlines()[0]})") from None
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def add_lora(model, lora: LoraConfig, *, adapter_path: str | None = None):
    """Wrap `model` in a peft LoRA adapter (new, or loaded trainable from `adapter_path`)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter_path:
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    cfg = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def load_policy(path: str, lora: LoraConfig, *, dtype: torch.dtype, gradient_checkpointing: bool = False,
                adapter_path: str | None = None):
    model = load_base_model(path, dtype, gradient_checkpointing=gradient_checkpointing)
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


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
