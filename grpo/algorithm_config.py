"""`engine.algorithm`: the GRPO update's settings, each name checked against grpo.algorithms' registries, and
the flat `engine.<name>` spellings that remain aliases of its fields (so no existing job file breaks)."""

from __future__ import annotations

import difflib
from typing import Any

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _registered(registry: str, what: str, v: str) -> str:
    """`v` if grpo.algorithms.core's `registry` has it, else a ValueError listing the names (and the closest)."""
    from grpo.algorithms import core  # imports torch: only when the field is given

    known = list(getattr(core, registry))
    if v not in known:
        close = difflib.get_close_matches(v, known, n=1)
        raise ValueError(f"unknown {what} {v!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; known: {', '.join(known)}")
    return v


def _registered_preset(v: str) -> str:
    if v not in PRESETS:
        close = difflib.get_close_matches(v, list(PRESETS), n=1)
        raise ValueError(f"unknown preset {v!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; known: {', '.join(PRESETS)}")
    return v


class FilterGroupsConfig(BaseModel):
    """DAPO's dynamic sampling (verl `algorithm.filter_groups`): groups whose rewards all tie are dropped and more
    prompts are sampled until the step has batch_size groups with signal, or max_num_gen_batches rounds ran."""

    model_config = ConfigDict(extra="forbid")

    enable: bool = Field(False, description="verl default: off (the dapo preset turns it on)")
    metric: Literal["score", "seq_final_reward"] = Field(
        "score", description="what must not tie: the handler's score, or seq_final_reward (after overlong shaping)")
    max_num_gen_batches: int = Field(10, ge=1, le=100, description="cap on generation rounds per step (the DAPO "
                                     "recipe's 10; verl's 0 = no cap is not offered: a cap always exists)")


class OverlongBufferConfig(BaseModel):
    """DAPO's soft overlong punishment (verl `reward_model.overlong_buffer`): a response longer than
    inference_max_tokens - len loses up to penalty_factor, linearly over the last `len` tokens."""

    model_config = ConfigDict(extra="forbid")

    enable: bool = Field(False, description="verl default: off (the dapo preset turns it on)")
    len: int | None = Field(None, ge=1, description="buffer tokens; default a fifth of inference_max_tokens (DAPO's "
                            "4096 of 20480)")
    penalty_factor: float = Field(1.0, ge=0, description="the full penalty at inference_max_tokens (DAPO's 1.0)")
    log: bool = Field(True, description="log reward_overlong_reward_mean and reward_overlong_mean (the share punished)")


#: engine.algorithm.preset: one word for a published recipe; each key set explicitly in the job wins over it.
#: docs/algorithms.md has the table (paper, what changes, TRL's and verl's spelling).
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"adv_estimator": "grpo", "policy_loss": "vanilla", "norm_adv_by_std": True, "clip_ratio_low": 0.2,
             "clip_ratio_high": 0.2, "loss_agg_mode": "token-mean", "kl_coef": 0.001, "kl_penalty": "low_var_kl"},
    "dapo": {"adv_estimator": "grpo", "policy_loss": "vanilla", "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
             "clip_ratio_c": 10.0, "loss_agg_mode": "token-mean", "kl_coef": 0.0,
             "filter_groups": {"enable": True, "metric": "score", "max_num_gen_batches": 10},
             "overlong_buffer": {"enable": True, "penalty_factor": 1.0}},
    "dr_grpo": {"adv_estimator": "grpo", "policy_loss": "vanilla", "norm_adv_by_std": False,
                "loss_agg_mode": "seq-mean-token-sum-norm", "kl_coef": 0.0},
    "gspo": {"adv_estimator": "grpo", "policy_loss": "gspo", "clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4,
             "loss_agg_mode": "seq-mean-token-mean", "kl_coef": 0.0},
    "cispo": {"adv_estimator": "grpo", "policy_loss": "cispo", "clip_ratio_low": 1.0, "clip_ratio_high": 0.28,
              "loss_agg_mode": "token-mean", "kl_coef": 0.0},
    "rloo": {"adv_estimator": "rloo", "policy_loss": "vanilla"},
    "reinforce_pp": {"adv_estimator": "reinforce_plus_plus", "policy_loss": "vanilla", "kl_penalty": "mse"},
    "gpg": {"adv_estimator": "gpg", "policy_loss": "gpg", "kl_coef": 0.0},
}


def expand_preset(data: Any) -> Any:
    """An `engine.algorithm` mapping with its preset's settings filled in where the job does not set them
    (a nested section is merged key by key)."""
    if not isinstance(data, dict) or data.get("preset") is None:
        return data
    name = data["preset"]
    if not isinstance(name, str) or name not in PRESETS:
        return data  # the preset field's own validator names the known ones
    out = dict(data)
    for k, v in PRESETS[name].items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**v, **out[k]}
        elif k not in out:
            out[k] = v
    return out


def preset_overrides(algo: "AlgorithmConfig") -> dict[str, tuple[Any, Any]]:
    """The preset's settings the job set otherwise: name -> (the preset's value, the value in force)."""
    if algo.preset is None:
        return {}
    out = {}
    for k, v in PRESETS[algo.preset].items():
        have = getattr(algo, k)
        if isinstance(v, dict):
            for kk, vv in v.items():
                if getattr(have, kk) != vv:
                    out[f"{k}.{kk}"] = (vv, getattr(have, kk))
        elif have != v:
            out[k] = (v, have)
    return out


class AlgorithmConfig(BaseModel):
    """`engine.algorithm`: the update's math, each name looked up in grpo.algorithms' registries (verl's
    `algorithm` + `actor` settings). Every field but the two registry names was a flat `engine.*` key and
    still is one (an alias: `engine.kl_coef` is `engine.algorithm.kl_coef`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    preset: str | None = Field(None, description="one word for a recipe (PRESETS: grpo, dapo, dr_grpo, gspo, cispo, "
                               "rloo, reinforce_pp, gpg); a key set explicitly wins over it")
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
    # the estimators' and losses' own knobs: verl's names and defaults (AlgoConfig, ActorConfig, PolicyLossConfig)
    gamma: float = Field(1.0, ge=0, le=1, description="reinforce_plus_plus: discount of the token returns")
    tau_pos: float = Field(1.0, gt=0, description="sapo: gate temperature where A > 0")
    tau_neg: float = Field(1.05, gt=0, description="sapo: gate temperature where A <= 0")
    clip_cov_ratio: float = Field(0.0002, gt=0, le=1, description="clip_cov: share of tokens whose gradient is cut")
    clip_cov_lb: float = Field(1.0, description="clip_cov: covariance lower bound of the candidates")
    clip_cov_ub: float = Field(5.0, description="clip_cov: covariance upper bound of the candidates")
    kl_cov_ratio: float = Field(0.0002, gt=0, le=1, description="kl_cov: share of tokens given the KL term")
    ppo_kl_coef: float = Field(0.1, ge=0, description="kl_cov: coefficient of |log-ratio| on those tokens")
    dro_beta: float | None = Field(None, gt=0, description="dro: the quadratic log-ratio penalty (required for dro)")
    filter_groups: FilterGroupsConfig = Field(default_factory=FilterGroupsConfig,
                                              description="DAPO's dynamic sampling (verl algorithm.filter_groups)")
    overlong_buffer: OverlongBufferConfig = Field(default_factory=OverlongBufferConfig,
                                                  description="DAPO's soft overlong punishment (verl overlong_buffer)")

    _expand = model_validator(mode="before")(classmethod(lambda cls, data: expand_preset(data)))
    _check_preset = field_validator("preset")(staticmethod(lambda v: v if v is None else _registered_preset(v)))

    @model_validator(mode="after")
    def _knobs_fit(self) -> "AlgorithmConfig":
        if self.policy_loss == "dro" and self.dro_beta is None:
            raise ValueError("policy_loss dro needs dro_beta > 0 (verl's default is unset: it must be chosen)")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb ({self.clip_cov_lb}) must be below clip_cov_ub ({self.clip_cov_ub})")
        return self

    def loss_knobs(self) -> dict[str, Any]:
        """The policy losses' keyword settings (grpo.algorithms.core.call_with_knobs picks each loss's own)."""
        return {k: getattr(self, k) for k in LOSS_KNOBS}

    _check_adv = field_validator("adv_estimator")(staticmethod(lambda v: _registered("ADVANTAGE_ESTIMATORS", "advantage estimator", v)))
    _check_loss = field_validator("policy_loss")(staticmethod(lambda v: _registered("POLICY_LOSSES", "policy loss", v)))
    _check_kl = field_validator("kl_penalty")(staticmethod(lambda v: _registered("KL_PENALTIES", "KL penalty", v)))
    _check_agg = field_validator("loss_agg_mode")(staticmethod(lambda v: _registered("LOSS_AGG_MODES", "loss_agg_mode", v)))


#: The flat `engine.<name>` spellings that mean `engine.algorithm.<name>` (documented aliases): the settings that
#: were flat before engine.algorithm existed; the newer ones are spelled only under engine.algorithm.
ALGORITHM_ALIASES = ("norm_adv_by_std", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "kl_coef", "kl_penalty",
                     "entropy_coef", "loss_agg_mode", "ppo_epochs", "mini_batch_size", "micro_batch_size",
                     "max_grad_norm")
#: The knobs a policy loss may read (each is given only those its function declares).
LOSS_KNOBS = ("clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "tau_pos", "tau_neg", "clip_cov_ratio", "clip_cov_lb",
              "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "dro_beta")


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
