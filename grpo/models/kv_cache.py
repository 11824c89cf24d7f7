"""transformers/peft KV-cache plumbing: which forward keyword takes a cache, where the output keeps it, and
which decoder families may share one prompt's cache across a group of responses."""

from __future__ import annotations


def cache_kwarg(model) -> str:
    """The forward keyword that takes a KV cache: `cache` in transformers 5.2x, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward returned (either name), or None."""
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


#: Decoder families whose cached forward (a KV cache plus explicit position ids) equals the plain forward of the
#: whole sequence; the group's prompt is then run once (here, and in grpo.training.actor's log-probs).
PREFIX_SHARING_TYPES = {"qwen3", "qwen2", "llama"}


def shares_prefix(model) -> bool:
    """Whether `model` (peft-wrapped or not) is a full-attention decoder of PREFIX_SHARING_TYPES."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None:
        return False
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "model_type", None) not in PREFIX_SHARING_TYPES:
        return False
    return all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or []))
