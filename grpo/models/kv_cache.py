"""transformers/peft KV-cache plumbing: which forward keyword takes a cache, where the output keeps it, and
which decoder families may share one prompt's cache across a group of responses."""

from __future__ import annotations

import functools


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



def preallocate(cache, extra: int) -> bool:
    """Give every layer of a transformers DynamicCache room for `extra` more positions, so that each decode step
    writes its keys/values in place instead of `torch.cat`-ing the whole cache (a copy of every layer's keys
    and values per token, quadratic in the length: a quarter of a decode step of SmolLM2-135M at 32 rows on
    the CPU). Attention then reads views of the filled part: the same values in the same order. Returns
    False (and changes nothing) for caches with layers of any other kind (sliding windows, static caches)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return False
    cls = _preallocated_layer_class()
    for i, layer in enumerate(layers):
        layers[i] = cls(layer, extra)
    return True


@functools.cache
def _preallocated_layer_class():
    import torch
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer whose keys/values live in buffers with room for `extra` more positions."""

        def __init__(self, layer, extra: int):
            super().__init__()
            self.device, self.is_initialized = layer.device, True
            b, h, n, d = layer.keys.shape
            self._len = n
            self._k = layer.keys.new_empty((b, h, n + extra, d))
            self._v = layer.values.new_empty((b, h, n + extra, layer.values.shape[-1]))
            self._k[:, :, :n] = layer.keys
            self._v[:, :, :n] = layer.values
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            n, k = self._len, key_states.shape[-2]
            if n + k > self._k.shape[2]:  # out of room: grow by concatenation, as DynamicLayer does
                self._k = torch.cat([self._k[:, :, :n], key_states], dim=-2)
                self._v = torch.cat([self._v[:, :, :n], value_states], dim=-2)
            else:
                self._k[:, :, n:n + k] = key_states
                self._v[:, :, n:n + k] = value_states
            self._len = n + k
            self.keys, self.values = self._k[:, :, :self._len], self._v[:, :, :self._len]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._len

    return PreallocatedLayer
