"""The sampler_drift alarm (grpo.training.health): a rollout backend whose sync never delivers the new weights
samples an ever older policy, and rollout_kl_k3 climbs with the updates (verl issue 7495). A real run of the
continuous backend on a tiny model whose sampler holds its own copy of the weights, once with a sync that
copies them and once with a sync made to do nothing; and synthetic streams for the false-alarm rate."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from grpo.health_thresholds import HealthThresholds
from grpo.training.health import scan


def _rows(k3: list[float], clip: list[float] | None = None) -> list[dict]:
    clip = clip or [0.0] * len(k3)
    return [{"step": i + 1, "total_steps": len(k3), "rollout_kl_k3": a, "rollout_tis_clipfrac": c,
             "rollout_tis_weight_mean": 1.0} for i, (a, c) in enumerate(zip(k3, clip))]


def test_drift_rule_by_hand():
    # start = median of the first 3 steps (2e-4); judged after 5 steps; fires when the median of the last 3
    # > max(1e-3, 10 x 2e-4): step 9's median(1.5e-3, 2e-3, 3e-3) = 2e-3 is not above, step 10's 3e-3 is
    k3 = [1e-4, 2e-4, 3e-4, 5e-4, 8e-4, 9e-4, 1.5e-3, 2e-3, 3e-3, 4e-3]
    alarms = scan(_rows(k3))
    assert [(a.name, a.step) for a in alarms] == [("sampler_drift", 10)]
    assert alarms[0].data["metric"] == "rollout_kl_k3" and alarms[0].data["value"] == pytest.approx(3e-3)
    assert alarms[0].data["start"] == pytest.approx(2e-4)
    assert "verl issue 7495" in alarms[0].message
    # a constant numeric mismatch (a bf16 sampler in sync) is not drift, however large
    assert scan(_rows([0.02] * 30)) == []
    # nor is one noisy step; the transformers backend (no rollout metrics) is never judged
    assert scan(_rows([1e-4] * 10 + [5e-2] + [1e-4] * 10)) == []
    no_sampler = scan([{"step": i, "critic_rewards_mean": 0.5} for i in range(1, 30)])
    assert "sampler_drift" not in [a.name for a in no_sampler]
    # TIS: the share of clipped importance ratios growing, with k3 absent
    rows = _rows([0.0] * 12, [0, 0, 0, 0, 0, 0.01, 0.03, 0.05, 0.08, 0.1, 0.1, 0.1])
    for r in rows:
        del r["rollout_kl_k3"]
    # step 8: median(0.01, 0.03, 0.05) = 0.03 > max(0.02, 10 x 0)
    assert [(a.name, a.step, a.data["metric"]) for a in scan(rows)] == [("sampler_drift", 8, "rollout_tis_clipfrac")]
    assert scan(_rows(k3), thresholds=HealthThresholds(disable=["sampler_drift"])) == []


def test_false_alarm_rate_on_noisy_synced_samplers():
    """A sampler in sync with bf16-like numerics: k3 lognormal around 1e-3 (sd 0.5 in log), 200 steps, 200 seeds."""
    fired = 0
    for seed in range(200):
        rnd = random.Random(seed)
        k3 = [1e-3 * rnd.lognormvariate(0, 0.5) for _ in range(200)]
        fired += any(a.name == "sampler_drift" for a in scan(_rows(k3)))
    assert fired == 0


# ------------------------------------------------------------------------------ a real run
class CopySampler:
    """transformers' continuous batching on its own copy of the policy, as vLLM holds its own weights: `sync`
    copies the trained weights into the copy, or does nothing (the failure under test)."""

    def __init__(self, policy, tokenizer, *, sync_works: bool):
        from grpo.rollout.samplers import ContinuousSampler

        self.inner = ContinuousSampler(copy.deepcopy(policy), tokenizer)
        self.name, self.sync_works, self.synced = "continuous", sync_works, 0

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)

    def sleep(self):
        self.inner.sleep()

    def sync(self, policy):
        if self.sync_works:
            self.inner.policy.load_state_dict(policy.state_dict())
            self.synced += 1


@pytest.mark.parametrize("sync_works", [True, False])
def test_a_sampler_whose_sync_does_nothing_raises_the_alarm(tmp_path, sync_works):
    from helpers_engine import build_model_dir, read_jsonl, write_data, write_job, write_varied_handler

    from grpo.config import load_config
    from grpo.training.trainer import Trainer

    torch.set_num_threads(1)
    model = build_model_dir(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=16, n_val=2)
    job = write_job(tmp_path / "job.yaml", model, train, None, handler=write_varied_handler(tmp_path / "varied.py"),
                    hyper={"inference_max_tokens": 6}, engine={"rollout": {"backend": "continuous"},
                                                               "base_learning_rate": 2e-2, "checkpoint_interval": 100})
    trainer = Trainer(load_config(job), tmp_path / "run", progress=False)
    trainer.sampler = CopySampler(trainer.policy, trainer.tok, sync_works=sync_works)
    summary = trainer.train()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    k3 = [r["rollout_kl_k3"] for r in rows]
    alarms = [a for a in summary["health"]["alarms"] if a["name"] == "sampler_drift"]
    assert len(rows) == 8 and all(r["actor_grad_norm"] > 0 for r in rows)  # the policy did move
    if sync_works:
        assert trainer.sampler.synced == 8 and max(k3) < 1e-6 and alarms == []
    else:
        assert k3[0] < 1e-6 < k3[-1]  # step 1 samples the initial policy, which it still is; then it drifts
        assert len(alarms) == 1 and alarms[0]["step"] <= 8, k3
        events = read_jsonl(tmp_path / "run" / "events.jsonl")
        assert any(e.get("data", {}).get("alarm") == "sampler_drift" for e in events)
