"""The forward of a shared-prefix decoder (Llama, Qwen2, Qwen3: grpo.models.kv_cache.shares_prefix) for
generation, without transformers' per-call machinery, and with q/k/v and gate/up as one product each where the
merged LoRA weights lie in one buffer (grpo.models.merge.FUSED_GROUPS).

A decode step of SmolLM2-135M at 64 rows is ~150 module calls of transformers, peft and torch wrappers around
~2,000 small operators; this runs the same operators on the same tensors in the same order, calling each
module's own `forward` (the RMSNorms, the rotary embedding, the activation, grpo.models.cpu_linear's product)
and transformers' own mask builder and SDPA attention function, so the logits are the model's bit for bit
(tests/test_decode_step.py; a product of concatenated weights computes each output column as the separate
product does). What it leaves out is only what decoding does not use: hooks, output records, gradient
checkpointing, kwargs plumbing.

`LeanDecoder.make(model)` returns None where any of that would matter: another architecture or attention
implementation, forward hooks (accelerate's offload, DeepSpeed), sharded or distributed-wrapped weights, a
model in training mode; the caller then runs the model itself.
"""

from __future__ import annotations

import torch

from grpo.models.kv_cache import shares_prefix


def _no_hooks(module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _product(mod):
    """The callable that computes a Linear (or a peft LoRA Linear) as its module would, without the wrappers."""
    if hasattr(mod, "base_layer"):
        return mod.base_layer.forward if mod.merged and not mod.disable_adapters else mod.forward
    return mod.forward


def _fused(mods):
    """One Linear over the group's weights when they are consecutive rows of one buffer (merged LoRA), with the
    members' own kernel choice (grpo.models.cpu_linear); else None."""
    if not all(hasattr(m, "base_layer") and m.merged and not m.disable_adapters for m in mods):
        return None
    bases = [m.base_layer for m in mods]
    ws = [b.weight for b in bases]
    if any(b.bias is not None for b in bases) or len({(w.dtype, w.shape[1]) for w in ws}) != 1:
        return None
    first = ws[0]
    buf = first.untyped_storage()
    offset = first.storage_offset()
    for w in ws:
        if w.untyped_storage().data_ptr() != buf.data_ptr() or w.storage_offset() != offset or not w.is_contiguous():
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in ws)
    whole = first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())
    lin = torch.nn.Linear(first.shape[1], rows, bias=False, device="meta")
    lin.weight = torch.nn.Parameter(whole, requires_grad=False)
    if "forward" in bases[0].__dict__:  # grpo.models.cpu_linear's forward: the same for the group
        from grpo.models.cpu_linear import use_onednn_linears

        use_onednn_linears(lin, "onednn")
        for b in bases:  # their packed copies (of the weights before the merge) are not read while this one is
            b.__dict__.pop("_onednn_packed", None)
    sizes = [w.shape[0] for w in ws]
    return lin.forward, sizes


class LeanDecoder:
    """`decoder(input_ids, attention_mask, position_ids, cache)` -> logits of the last position, [rows, 1, vocab],
    and the cache updated in place, as `model(..., use_cache=True, logits_to_keep=1)` gives them. With cache None
    a DynamicCache is made (the prefill) and returned as the second value."""

    def __init__(self, model, base, inner):
        from transformers.cache_utils import DynamicCache
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import create_causal_mask
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._cache_class, self._attention, self._mask, self._rotary = (
            DynamicCache, sdpa_attention_forward, create_causal_mask, apply_rotary_pos_emb)
        self.base, self.inner, self.config = base, inner, inner.config
        self._step_mask = None  # (key length, mask, rows, cache) of the last decode step, see _decode_mask
        self.head = _product(base.lm_head)
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv = _fused([att.q_proj, att.k_proj, att.v_proj])
            gate_up = _fused([mlp.gate_proj, mlp.up_proj])
            self.layers.append(dict(
                attn=att, in_norm=layer.input_layernorm.forward, post_norm=layer.post_attention_layernorm.forward,
                q_norm=att.q_norm.forward if hasattr(att, "q_norm") else None,
                k_norm=att.k_norm.forward if hasattr(att, "k_norm") else None,
                qkv=qkv, q=_product(att.q_proj), k=_product(att.k_proj), v=_product(att.v_proj), o=_product(att.o_proj),
                gate_up=gate_up, gate=_product(mlp.gate_proj), up=_product(mlp.up_proj), down=_product(mlp.down_proj),
                act=mlp.act_fn))

    @classmethod
    def make(cls, model) -> "LeanDecoder | None":
        from accelerate.utils import extract_model_from_parallel

        if extract_model_from_parallel(model) is not model or model.training or not shares_prefix(model):
            return None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner = getattr(base, "model", None)
        cfg = getattr(base, "config", None)
        if inner is None or cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
            return None
        if type(inner).__name__ not in ("LlamaModel", "Qwen2Model", "Qwen3Model") or not _no_hooks(model):
            return None
        if any(type(p.data) is not torch.Tensor or hasattr(p, "ds_id") for p in model.parameters()):
            return None  # FSDP2's DTensors, ZeRO-3's partitions
        if getattr(cfg, "pretraining_tp", 1) not in (None, 1) or len(inner.layers) != cfg.num_hidden_layers:
            return None
        return cls(model, base, inner)

    @staticmethod
    def _group(L, fused: str, members: tuple[str, ...], x):
        """The group's outputs: one product split by rows where its weights are fused, else one per member."""
        if L[fused] is not None:
            fn, sizes = L[fused]
            return fn(x).split(sizes, dim=-1)
        return tuple(L[m](x) for m in members)

    def _decode_mask(self, h, attention_mask, cache, position_ids):
        """The 4D mask transformers' `create_causal_mask` builds, without building it at every step (its general
        construction was ~0.5 ms of a 13.8 ms decode step of bench_vs_trl's model here). A one-token decode step
        whose 2D mask is the previous step's with one more column of ones gets the previous 4D mask with one more
        True column: the query is the newest position, so causality allows every key and the mask is the padding
        mask. Anything else (a prefill, another cache or batch, a padded new column, a float or unexpected mask)
        asks transformers."""
        prev, self._step_mask = self._step_mask, None
        step = attention_mask is not None and attention_mask.dim() == 2 and h.shape[1] == 1
        n = attention_mask.shape[-1] if step else None
        if (step and prev is not None and prev[3] is cache and n == prev[0] + 1
                and attention_mask.shape[0] == prev[2] and bool(attention_mask[:, -1].all())):
            mask = prev[1]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((*mask.shape[:-1], 1))], dim=-1)
        else:
            mask = self._mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=cache,
                              position_ids=position_ids)
        if step and (mask is None or (
                mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[-1] == n and mask.shape[-2] == 1)):
            self._step_mask = (n, mask, attention_mask.shape[0], cache)
        return mask

    def __call__(self, input_ids, attention_mask, position_ids, cache=None):
        made = cache is None
        if made:
            cache = self._cache_class(config=self.config)
        h = self.inner.embed_tokens.forward(input_ids)
        mask = self._decode_mask(h, attention_mask, cache, position_ids)
        cos, sin = self.inner.rotary_emb.forward(h, position_ids=position_ids)
        shape = h.shape[:-1]
        for i, L in enumerate(self.layers):
            att = L["attn"]
            x = L["in_norm"](h)
            q, k, v = self._group(L, "qkv", ("q", "k", "v"), x)
            q, k, v = (t.view(*shape, -1, att.head_dim) for t in (q, k, v))
            if L["q_norm"] is not None:
                q, k = L["q_norm"](q), L["k_norm"](k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = self._rotary(q, k, cos, sin)
            k, v = cache.update(k, v, i, kwargs={})
            out, _ = self._attention(att, q, k, v, mask, dropout=0.0, scaling=att.scaling)
            h = h + L["o"](out.reshape(*shape, -1).contiguous())
            x = L["post_norm"](h)
            gate, up = self._group(L, "gate_up", ("gate", "up"), x)
            h = h + L["down"](L["act"](gate) * up)
        h = self.inner.norm.forward(h)
        logits = self.head(h[:, -1:, :])
        return (logits, cache) if made else logits
