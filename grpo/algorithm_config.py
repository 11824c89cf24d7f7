"""`engine.algorithm`: the GRPO update's settings, each name checked against grpo.algorithms' registries, and
the flat `engine.<name>` spellings that remain aliases of its fields (so no existing job file breaks)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _registered(registry: str, what: str, v: str) -> str:
    """`v` if grpo.algorithms.core's `registry` has it, else a ValueError listing the names (and the closest)."""
    from grpo.algorithms import core  # imports torch: only when the field is given

    known = list(getattr(core, registry))
    if v not in known:
        close = difflib.get_close_matches(v, known, n=1)
        raise ValueError(f"unknown {what} {v!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; known: {', '.join(known)}")
    return v


class AlgorithmConfig(BaseModel):
    """`engine.algorithm`: the update's math, each name looked up in grpo.algorithms' registries (verl's
    `algorithm` + `actor` settings). Every field but the two registry names was a flat `engine.*` key and
    still is one (an alias: `engine.kl_coef` is `engine.algorithm.kl_coef`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    adv_estimator: str = Field("grpo", description="advantage estimator (grpo.algorithms ADVANTAGE_ESTIMATORS)")
    norm_adv_by_std: bool = Field(True, description="GRPO's std normalisation; false is Dr. GRPO")
    policy_loss: str = Field("vanilla", description="policy loss (grpo.algorithms POLICY_LOSSES): PPO clip + dual clip")
    clip_ratio_low: float = Field(0.2, ge=0, description="verl default")
    clip_ratio_high: float = Field(0.2, ge=0, description="verl default (DAPO uses 0.28)")
    clip_ratio_c: float = Field(3.0, gt=1, description="dual clip, verl default")
    kl_coef: float = Field(0.001, ge=0, description="verl's GRPO recipes; 0 skips the reference pass")
    kl_penalty: str = Field("low_var_kl", description="KL estimator (grpo.algorithms KL_PENALTIES); k3, verl's GRPO recipes")
    entropy_coef: float = Field(0.0, description="verl default")
    loss_agg_mode: str = Field("token-mean", description="grpo.algorithms LOSS_AGG_MODES; verl's default")
    ppo_epochs: int = Field(1, ge=1, description="one pass: each step's data is used once, on-policy")
    mini_batch_size: int | None = Field(None, ge=1, description="prompts per optimizer step; default batch_size (one update per step)")
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward/backward (memory only; the math does not change)")
    max_grad_norm: float = Field(1.0, gt=0, description="verl default")

    _check_adv = field_validator("adv_estimator")(staticmethod(lambda v: _registered("ADVANTAGE_ESTIMATORS", "advantage estimator", v)))
    _check_loss = field_validator("policy_loss")(staticmethod(lambda v: _registered("POLICY_LOSSES", "policy loss", v)))
    _check_kl = field_validator("kl_penalty")(staticmethod(lambda v: _registered("KL_PENALTIES", "KL penalty", v)))
    _check_agg = field_validator("loss_agg_mode")(staticmethod(lambda v: _registered("LOSS_AGG_MODES", "loss_agg_mode", v)))


#: The flat `engine.<name>` spellings that mean `engine.algorithm.<name>` (documented aliases).
ALGORITHM_ALIASES = tuple(n for n in AlgorithmConfig.model_fields if n not in ("adv_estimator", "policy_loss"))


def lift_algorithm_aliases(engine: Any) -> Any:
    """An `engine` mapping with its flat algorithm keys moved into `engine.algorithm`; a key given both ways
    with different values is an error naming both."""
    if not isinstance(engine, dict) or not any(k in engine for k in ALGORITHM_ALIASES):
        return engine
    engine = dict(engine)
    algo = engine.get("algorithm", {})
    if not isinstance(algo, dict):
        return engine  # pydantic reports the section's own type error
    algo = dict(algo)
    for k in ALGORITHM_ALIASES:
        if k in engine:
            v = engine.pop(k)
            if k in algo and algo[k] != v:
                raise ValueError(f"engine.{k} ({v!r}) and engine.algorithm.{k} ({algo[k]!r}) disagree: "
                                 f"engine.{k} is an alias of engine.algorithm.{k}; keep one")
            algo[k] = v
    engine["algorithm"] = algo
    return engine


def flat_aliases(raw: Any) -> set[str]:
    """The algorithm keys `raw` (a job body) spells as flat `engine.<name>` aliases."""
    engine = raw.get("engine") if isinstance(raw, dict) else None
    return {k for k in ALGORITHM_ALIASES if k in engine} if isinstance(engine, dict) else set()
