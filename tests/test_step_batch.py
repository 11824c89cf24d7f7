"""grpo.batch.StepBatch (packed by the sampler, scored, advantaged, one way) and the metrics one function reads
from it (grpo.training.metrics), against hand-computed values and verl's definitions."""

import math
import types

import pytest
import torch

from grpo.algorithms import core as alg
from grpo.batch import pack_step
from grpo.training.metrics import Processes, actor_mfu, data_metrics, marked_timer, perf_metrics

# Two prompts (lengths 3 and 2), two samples each: responses of 2, 3, 1 and 0 tokens (the last aborted).
PROMPTS = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
RESPONSES = [[1, 2], [3, 4, 9], [4], []]


def _batch(scores):
    b = pack_step(PROMPTS, RESPONSES, 0, group=[0, 0, 1, 1], sample=[0, 1, 0, 1], truncated=[False, True, False, False],
                  contents=["a", "b", "c", ""], reasoning=[None, None, None, None])
    b.fill_scores(scores)
    b.fill_advantages(alg.get_advantage_estimator("grpo"), norm_adv_by_std=True)
    return b


@pytest.fixture(scope="module")
def procs():
    from accelerate import Accelerator

    return Processes(Accelerator(cpu=True))


def test_scores_mask_and_advantages_flow_one_way():
    b = _batch([1.0, 0.0, None, 0.5])
    assert b.scored.tolist() == [True, True, False, True] and b.scores.tolist() == [1.0, 0.0, 0.0, 0.5]
    # the loss mask is the response mask on scored rows only; the packed response mask is untouched
    assert b.packed.response_mask.sum(dim=1).tolist() == [2, 3, 1, 0]
    assert b.loss_mask.sum(dim=1).tolist() == [2, 3, 0, 0]
    assert torch.equal(b.trained.response_mask, b.loss_mask) and torch.equal(b.trained.input_ids, b.packed.input_ids)
    # group 0: scores 1 and 0 -> mean 0.5, unbiased std sqrt(0.5); group 1 has one scored row: its raw score
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert b.advantages.sum(dim=1).tolist() == pytest.approx([2 * a, -3 * a, 0.0, 0.0])
    assert ((b.advantages != 0) == b.loss_mask.bool()).all()
    with pytest.raises(ValueError, match="3 scores for 4 rows"):
        b.fill_scores([1.0, 2.0, 3.0])
    fresh = pack_step(PROMPTS, RESPONSES, 0, group=[0, 0, 1, 1], sample=[0, 1, 0, 1], truncated=[False] * 4,
                      contents=[""] * 4, reasoning=[None] * 4)
    with pytest.raises(RuntimeError, match="fill_scores"):
        fresh.fill_advantages(alg.grpo_outcome_advantage)


def test_data_metrics_by_hand(procs):
    b = _batch([1.0, 0.0, 0.5, 0.5])
    m = data_metrics(b, procs, max_prompt_length=3)
    assert (m["critic_score_mean"], m["critic_score_max"], m["critic_score_min"]) == (0.5, 1.0, 0.0)
    assert m["critic_rewards_mean"] == m["critic_score_mean"]
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # group 0; group 1's equal scores give 0 (its 0-token row has no token)
    tokens = [a, a, -a, -a, -a, 0.0]
    assert m["critic_advantages_mean"] == pytest.approx(sum(tokens) / 6)
    assert (m["critic_returns_mean"], m["critic_returns_max"], m["critic_returns_min"]) == (
        m["critic_advantages_mean"], m["critic_advantages_max"], m["critic_advantages_min"])
    assert m["critic_frac_reward_zero_std"] == 0.5  # group 1: 0.5 and 0.5
    assert (m["response_length_mean"], m["response_length_max"], m["response_length_min"]) == (1.5, 3.0, 0.0)
    assert m["response_length_clip_ratio"] == 0.25
    assert m["response_aborted_ratio"] == 0.25  # the empty response
    assert (m["response_length_non_aborted_mean"], m["response_length_non_aborted_min"]) == (2.0, 1.0)
    assert m["response_length_non_aborted_clip_ratio"] == pytest.approx(1 / 3)
    assert m["prompt_length_mean"] == 2.5 and m["prompt_length_clip_ratio"] == 0.5  # two rows' prompts are 3 long
    # one process: its rows' tokens, prompt + response: 5 + 6 + 3 + 2
    assert m["global_seqlen_min"] == m["global_seqlen_max"] == m["global_seqlen_mean"] == 16.0
    assert m["global_seqlen_minmax_diff"] == 0.0


def test_unscored_rows_are_no_samples_in_the_metrics(procs):
    m = data_metrics(_batch([1.0, 0.0, None, 0.5]), procs, max_prompt_length=3)
    assert m["critic_score_mean"] == 0.5 and m["response_length_mean"] == pytest.approx(5 / 3)
    assert m["critic_frac_reward_zero_std"] == 0.5  # group 1 has one scored row: all its rewards are equal


def test_perf_metrics_per_token_timings_and_marked_timer(procs):
    timing = {}
    with marked_timer("gen", timing):
        pass
    with marked_timer("gen", timing):  # accumulates, as verl's
        pass
    assert timing["gen"] >= 0
    timing = {"gen": 0.6, "ref": 1.6, "update_actor": 3.2, "reward": 0.1, "step": 8.0}
    m = perf_metrics(_batch([1.0, 0.0, 0.5, 0.5]), procs, timing)
    assert m["timing_per_token_ms_gen"] == pytest.approx(600 / 6)  # response tokens
    assert m["timing_per_token_ms_ref"] == pytest.approx(1600 / 16)  # prompt + response tokens
    assert m["timing_per_token_ms_update_actor"] == pytest.approx(3200 / 16)
    assert "timing_per_token_ms_reward" not in m and m["timing_s_reward"] == 0.1
    assert m["perf_total_num_tokens"] == 16 and m["perf_throughput"] == 2.0 and m["perf_time_per_step"] == 8.0
    assert m["perf_cpu_memory_used_gb"] > 0


def test_actor_mfu_counts_flops_as_verl():
    cfg = types.SimpleNamespace(model_type="qwen3", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=4, intermediate_size=16, vocab_size=10)
    dense = (3 * 8 * 16 + 8 * (8 + 4 + 4 + 8)) * 2 + 2 * 10 * 8
    flops = 6 * dense * 5 + 6 * (9 + 4) * 4 * 2 * 2
    peak = 989e12 if torch.cuda.is_available() and "H" in torch.cuda.get_device_name() else 448e9
    if torch.cuda.is_available() and peak == 448e9:
        pytest.skip("a GPU outside the table")
    assert actor_mfu(cfg, [3, 2], 2.0, 1) == pytest.approx(flops / 2.0 / peak)
    assert actor_mfu(types.SimpleNamespace(model_type="gpt_oss"), [3], 1.0, 1) is None


def test_update_settings_are_the_algorithm_section_by_name():
    from grpo.config import parse_config
    from grpo.training.actor import UpdateSettings

    body = {"model": "m", "training_file": "t.jsonl", "method": {"type": "reinforcement", "reinforcement": {
        "grader": {"lambda": {"function": "h.py"}},
        "hyperparameters": {"batch_size": 8, "training_sample_per_prompt": 4, "inference_max_tokens": 32}}},
        "engine": {"temperature": 0.9, "kl_coef": 0.0, "algorithm": {
            "policy_loss": "vanilla", "clip_ratio_high": 0.28, "loss_agg_mode": "seq-mean-token-sum-norm",
            "mini_batch_size": 4, "micro_batch_size": 3, "ppo_epochs": 2, "max_grad_norm": 0.5}}}
    s = UpdateSettings.from_config(parse_config(body), world=2)
    assert (s.clip_ratio_high, s.loss_agg_mode, s.kl_coef, s.ppo_epochs, s.max_grad_norm, s.policy_loss) == (
        0.28, "seq-mean-token-sum-norm", 0.0, 2, 0.5, "vanilla")
    assert (s.temperature, s.mini_batch_seqs, s.micro_batch_seqs, s.loss_scale_factor) == (0.9, 4 // 2 * 4, 3, 32.0)
