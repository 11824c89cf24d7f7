"""peft's LoRA Linear with the adapter's scaling applied on the rank-r side: base(x) + B((A x) * s) instead of
peft's base(x) + B(A x) * s.

peft multiplies the adapter's [tokens, out] product by s, and its backward multiplies the [tokens, out] gradient
by s again; here the product is [tokens, r] (r the rank: 8-64 against 576-5120 outputs). Where s is a power of
two >= 1 (alpha = rank, 2 x rank, ...: the defaults) the two are the same numbers bit for bit, forward and
backward: multiplying by a power of two is exact (no overflow at these magnitudes), so every term of B's product,
and so its rounded sums, are exactly s times the unscaled ones. Any other s keeps peft's forward, as does
everything this does not cover (adapter variants such as DoRA, several or no active adapters, mixed-batch
`adapter_names`, an input dtype other than the adapter's). A disabled adapter (the reference policy) and a
merged one run the base layer directly, as peft does. The LoRA modules are still called as modules, so
DDP's, FSDP2's and ZeRO-3's hooks see them.
"""

from __future__ import annotations

import math
import types


def _power_of_two_at_least_one(s) -> bool:
    if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 1:
        return False
    mantissa, _ = math.frexp(float(s))
    return mantissa == 0.5


def _forward(self, x, *args, **kwargs):
    if not args and not kwargs:
        if self.disable_adapters and not self.merged:
            return self.base_layer(x)
        if self.merged and not self.disable_adapters:
            return self.base_layer(x)
        active = self.active_adapters
        if not self.disable_adapters and len(active) == 1 and active[0] in self.lora_A:
            name = active[0]
            s = self.scaling[name]
            lora_a = self.lora_A[name]
            if name not in self.lora_variant and _power_of_two_at_least_one(s) and x.dtype == lora_a.weight.dtype:
                result = self.base_layer(x)
                return result + self.lora_B[name](lora_a(self.lora_dropout[name](x)) * s)
    return type(self).forward(self, x, *args, **kwargs)


def scale_on_rank_side(model) -> int:
    """Give every peft LoRA Linear of `model` the forward above; returns how many. Idempotent."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return 0
    n = 0
    for mod in model.modules():
        if type(mod) is LoraLinear and hasattr(mod, "lora_variant"):
            if "forward" not in mod.__dict__:
                mod.forward = types.MethodType(_forward, mod)
            n += 1
    return n
