"""Regenerate tests/fixtures/verl_algos.json: verl 0.9.1's advantage estimators and policy losses on small random
batches (inputs, outputs, and the gradients of each loss w.r.t. log_prob), for tests/test_algorithm_library.py.

Run it in a throwaway environment that has verl's source but not its dependencies, outside the repository:

    python3 -m venv /tmp/verlenv && /tmp/verlenv/bin/pip install torch==2.13.0 numpy
    /tmp/verlenv/bin/pip install --no-deps verl==0.9.1
    /tmp/verlenv/bin/python scripts/make_verl_reference.py [--out tests/fixtures/verl_algos.json]

Only the imports of verl/trainer/ppo/core_algos.py are stood in for (its config classes, a deprecation decorator,
and verl.utils' package, whose import pulls in ray); the math runs from verl's own files: core_algos.py as it is,
and masked_sum / masked_mean / masked_var / masked_whiten taken verbatim from verl/utils/torch_functional.py.
Nothing here imports grpo.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

D = torch.float64
LOSS_KNOBS = {  # verl's ActorConfig / PolicyLossConfig fields each loss reads, with the values used here
    "vanilla": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0},
    "gspo": {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "cispo": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28},
    "gpg": {},
    "clip_cov": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_cov_ratio": 0.2, "clip_cov_lb": 0.05,
                 "clip_cov_ub": 5.0},
    "kl_cov": {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.1},
    "geo_mean": {"clip_ratio_low": 0.4, "clip_ratio_high": 0.4},
    "dro": {"dro_beta": 0.5},
    "dppo_tv": {"clip_ratio_low": 0.1, "clip_ratio_high": 0.15, "clip_ratio_c": 3.0},
    "dppo_kl": {"clip_ratio_low": 0.02, "clip_ratio_high": 0.03, "clip_ratio_c": 3.0},
}
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
SEED = 1234


def _verl_dir() -> Path:
    spec = importlib.util.find_spec("verl")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: verl is not installed here (pip install --no-deps verl==0.9.1)")
    return Path(list(spec.submodule_search_locations)[0])


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _functions_from(path: Path, names: set[str]) -> dict:
    """The named top-level functions of a file, compiled from its own source text (verbatim)."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = names - {n.name for n in body}
    if missing:
        sys.exit(f"error: {path} has no {sorted(missing)}")
    ns: dict = {"torch": torch, "Optional": __import__("typing").Optional}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)
    return {k: ns[k] for k in names}


class _Config:
    """verl's BaseConfig surface that core_algos reads: attributes and .get(key, default)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def get(self, key, default=None):
        return getattr(self, key, default)


def load_core_algos():
    root = _verl_dir()
    version = (root.parent / "verl-0.9.1.dist-info").is_dir()
    if not version:
        print("warning: this is not verl 0.9.1's dist-info; the fixture names 0.9.1", file=sys.stderr)
    pkg = _module("verl")
    pkg.__path__ = [str(root)]
    utils = _module("verl.utils", as_torch_index=None, group_mean_std=None)
    utils.__path__ = []
    tf = _functions_from(root / "utils" / "torch_functional.py", {"masked_sum", "masked_mean", "masked_var", "masked_whiten"})
    utils.torch_functional = _module("verl.utils.torch_functional", **tf)
    _module("verl.utils.import_utils", deprecated=lambda *a, **k: (lambda f: f))

    class AlgoConfig(_Config):
        pass

    class ActorConfig(_Config):
        pass

    trainer = _module("verl.trainer")
    trainer.__path__ = []
    _module("verl.trainer.config", AlgoConfig=AlgoConfig)
    workers = _module("verl.workers")
    workers.__path__ = []
    _module("verl.workers.config", ActorConfig=ActorConfig)
    spec = importlib.util.spec_from_file_location("verl.trainer.ppo.core_algos", root / "trainer" / "ppo" / "core_algos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, AlgoConfig, ActorConfig


def actor_config(ActorConfig, loss: str, agg: str):
    k = dict(LOSS_KNOBS[loss])
    policy = _Config(loss_mode=loss, clip_cov_ratio=k.pop("clip_cov_ratio", 0.0002), clip_cov_lb=k.pop("clip_cov_lb", 1.0),
                     clip_cov_ub=k.pop("clip_cov_ub", 5.0), kl_cov_ratio=k.pop("kl_cov_ratio", 0.0002),
                     ppo_kl_coef=k.pop("ppo_kl_coef", 0.1), dro_beta=k.pop("dro_beta", None))
    base = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0, "tau_pos": 1.0,
            "tau_neg": 1.05, "loss_agg_mode": agg}
    base.update(k)
    return ActorConfig(**base, policy_loss=policy, global_batch_info={})


def _list(x: torch.Tensor):
    return x.detach().to(D).tolist()


def loss_inputs(g: torch.Generator, scale: float) -> dict:
    """Six responses of up to 7 tokens (one of a single token), log-ratios ~ N(0, scale), some huge."""
    B, T = 6, 7
    lengths = [7, 5, 1, 6, 3, 7]
    mask = torch.zeros(B, T, dtype=D)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    old = -torch.rand(B, T, generator=g, dtype=D) * 3 - 0.05
    logp = (old + torch.randn(B, T, generator=g, dtype=D) * scale).clamp(max=-1e-3)
    if scale > 1:  # large ratios: beyond the exp clamp of 20 in both directions
        logp[0, 1], old[0, 1] = -0.01, -25.0
        logp[3, 2], old[3, 2] = -30.0, -0.02
    adv = torch.randn(B, 1, generator=g, dtype=D).expand(B, T) * 1.5 * mask
    adv = adv.clone()
    adv[1, :] = 0.0  # a zero-advantage response
    weights = torch.rand(B, T, generator=g, dtype=D) * 1.5 + 0.25
    return {"old_log_prob": old, "log_prob": logp, "advantages": adv, "response_mask": mask, "rollout_is_weights": weights}


def run_losses(core, ActorConfig, inputs: dict) -> list[dict]:
    out = []
    for loss in LOSS_KNOBS:
        for agg in AGG_MODES:
            for weighted in (False, True):
                if weighted and agg != "token-mean":
                    continue
                fn = core.get_policy_loss_fn(loss)
                logp = inputs["log_prob"].clone().requires_grad_(True)
                torch.manual_seed(SEED)  # clip_cov draws with torch.randperm
                pg_loss, metrics = fn(inputs["old_log_prob"], logp, inputs["advantages"], inputs["response_mask"],
                                      loss_agg_mode=agg, config=actor_config(ActorConfig, loss, agg),
                                      rollout_is_weights=inputs["rollout_is_weights"] if weighted else None)
                (grad,) = torch.autograd.grad(pg_loss, logp)
                out.append({"loss": loss, "loss_agg_mode": agg, "weighted": weighted, "knobs": LOSS_KNOBS[loss],
                            "pg_loss": float(pg_loss.detach()), "grad": _list(grad),
                            "metrics": {k.split("/")[-1]: float(v) for k, v in metrics.items()}})
    return out


def estimator_inputs(g: torch.Generator) -> dict:
    """Five groups: four of 4 (one all tied, one with several ties), one of 1; binary and fractional scores."""
    index = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4]
    B, T = len(index), 6
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    mask = torch.zeros(B, T, dtype=D)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    scores = torch.tensor([1, 0, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.2, 0.9, 0.0, 0.9, 0.7, 0, 1, 0, 0], dtype=D)
    scores[13:] = torch.rand(4, generator=g, dtype=D)
    rewards = torch.zeros(B, T, dtype=D)
    rewards[torch.arange(B), torch.tensor(lengths) - 1] = scores  # the outcome reward on the last response token
    baselines = torch.rand(B, generator=g, dtype=D)
    return {"token_level_rewards": rewards, "response_mask": mask, "index": index, "reward_baselines": baselines}


def run_estimators(core, AlgoConfig, inputs: dict) -> list[dict]:
    index = np.array(inputs["index"])
    out = []
    cases = [("grpo", {"norm_adv_by_std_in_grpo": True}), ("grpo", {"norm_adv_by_std_in_grpo": False}),
             ("rloo", {}), ("opo", {}), ("reinforce_plus_plus", {"gamma": 1.0}), ("reinforce_plus_plus", {"gamma": 0.9}),
             ("reinforce_plus_plus_baseline", {}), ("remax", {}), ("gpg", {}),
             ("grpo_passk", {"norm_adv_by_std_in_grpo": True}), ("grpo_passk", {"norm_adv_by_std_in_grpo": False})]
    for name, knobs in cases:
        fn = core.get_adv_estimator_fn(name)
        cfg = AlgoConfig(gamma=knobs.get("gamma", 1.0), lam=1.0, norm_adv_by_std_in_grpo=knobs.get("norm_adv_by_std_in_grpo", True))
        kw = {"token_level_rewards": inputs["token_level_rewards"].clone(), "response_mask": inputs["response_mask"],
              "index": index, "config": cfg}
        if name == "remax":
            kw["reward_baselines"] = inputs["reward_baselines"]
        if name == "grpo":
            kw["norm_adv_by_std_in_grpo"] = knobs["norm_adv_by_std_in_grpo"]
        if name == "grpo_passk":
            # the singleton group (3) is left out: verl raises on it (tests check ours gives 0 there)
            keep = [i for i, g in enumerate(inputs["index"]) if g != 3]
            kw.update(token_level_rewards=kw["token_level_rewards"][keep], response_mask=kw["response_mask"][keep],
                      index=index[keep])
        adv, ret = fn(**kw)
        out.append({"estimator": name, "knobs": knobs, "rows": None if name != "grpo_passk" else keep,
                    "advantages": _list(adv), "returns": _list(ret)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "verl_algos.json")
    a = p.parse_args()
    core, AlgoConfig, ActorConfig = load_core_algos()
    g = torch.Generator().manual_seed(SEED)
    data = {"verl": "0.9.1", "seed": SEED, "torch": torch.__version__, "loss_sets": [], "estimators": None}
    for name, scale in (("moderate", 0.3), ("large", 4.0)):
        inputs = loss_inputs(g, scale)
        data["loss_sets"].append({"name": name, "inputs": {k: _list(v) for k, v in inputs.items()},
                                  "cases": run_losses(core, ActorConfig, inputs)})
    est = estimator_inputs(g)
    data["estimators"] = {"inputs": {k: (_list(v) if isinstance(v, torch.Tensor) else v) for k, v in est.items()},
                          "cases": run_estimators(core, AlgoConfig, est)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    n = sum(len(s["cases"]) for s in data["loss_sets"]) + len(data["estimators"]["cases"])
    print(f"wrote {a.out} ({a.out.stat().st_size / 1024:.0f} KiB, {n} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
