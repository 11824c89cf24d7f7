"""engine.algorithm's presets and DAPO's pieces in the trainer: dynamic sampling (tied groups dropped, more rounds, a cap
with a metric and an event), overlong shaping, remax's greedy baseline; real `grpo train` runs on a tiny random model."""

import pytest
import torch

from grpo.algorithm_config import PRESETS, AlgorithmConfig, preset_overrides
from grpo.batch import pack_step
from grpo.training.trainer import _merge_results, _signal_groups
from helpers_engine import build_model_dir, read_jsonl, run_grpo, write_data, write_job, write_varied_handler

TIED_HANDLER = '''\
def lambda_handler(event, context):
    if isinstance(event, dict):
        event = event["trajectories"]
    return [{"id": t["id"], "aggregate_reward_score": 0.5} for t in event]
'''


def test_a_preset_expands_and_an_explicit_key_wins():
    a = AlgorithmConfig(preset="dapo", kl_coef=0.001, filter_groups={"max_num_gen_batches": 3})
    assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (0.2, 0.28, "token-mean")
    assert a.kl_coef == 0.001 and a.filter_groups.enable and a.filter_groups.max_num_gen_batches == 3
    assert a.overlong_buffer.enable
    assert preset_overrides(a) == {"kl_coef": (0.0, 0.001), "filter_groups.max_num_gen_batches": (10, 3)}
    for name, settings in PRESETS.items():  # every preset validates, and sets what it says
        b = AlgorithmConfig(preset=name)
        assert all(getattr(b, k) == v for k, v in settings.items() if not isinstance(v, dict)), name
    assert AlgorithmConfig(preset="grpo").model_dump(exclude={"preset"}) == AlgorithmConfig().model_dump(exclude={"preset"})
    with pytest.raises(ValueError, match="did you mean 'dr_grpo'"):
        AlgorithmConfig(preset="drgrpo")
    with pytest.raises(ValueError, match="dro_beta"):
        AlgorithmConfig(policy_loss="dro")


def test_signal_groups_and_merged_results():
    # group 0 ties, 1 has spread, 2 has one graded member (the other failed): kept as verl keeps a single sample
    assert _signal_groups([0, 0, 1, 1, 2, 2], [1.0, 1.0, 0.0, 1.0, None, 0.3]) == [1, 2]
    from grpo.reward.runner import RewardResult

    m = _merge_results([RewardResult([1.0, None], {"x": [1.0]}, n_calls=1, seconds=0.5),
                        RewardResult([0.0], {"x": [3.0]}, n_calls=2, seconds=0.25)])
    assert (m.scores, m.metrics, m.n_calls, m.seconds) == ([1.0, None, 0.0], {"x": [1.0, 3.0]}, 3, 0.75)


def test_step_batches_concatenate_and_select_groups():
    a = pack_step([[5, 6], [5, 6]], [[1], [2, 3, 4]], 0, group=[0, 0], sample=[0, 1], truncated=[False, True],
                  contents=["a", "b"], reasoning=[None, None])
    b = pack_step([[7], [7]], [[8, 9], [1]], 0, group=[0, 0], sample=[0, 1], truncated=[False, False],
                  contents=["c", "d"], reasoning=[None, None])
    a.fill_scores([1.0, 0.0])
    b.fill_scores([0.5, None])
    both = type(a).concat([a, b], pad_id=0)
    assert both.group.tolist() == [0, 0, 1, 1] and both.packed.input_ids.shape == (4, 5)
    assert both.scores.tolist() == [1.0, 0.0, 0.5, 0.0] and both.scored.tolist() == [True, True, True, False]
    picked = both.select_groups([1])
    assert picked.group.tolist() == [0, 0] and picked.contents == ["c", "d"]
    assert torch.equal(picked.packed.input_ids, b.packed.input_ids)
    assert torch.equal(picked.packed.response_mask, b.packed.response_mask)


def _train(tmp_path, handler_source, algorithm, n_train=2):
    model = build_model_dir(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=n_train, n_val=2)
    handler = tmp_path / "h.py"
    if handler_source is None:
        write_varied_handler(handler)
    else:
        handler.write_text(handler_source)
    job = write_job(tmp_path / "job.yaml", model, train, None, handler=handler, engine={"algorithm": algorithm})
    res = run_grpo("train", job, "--output-dir", tmp_path / "run", "--no-progress")
    assert res.returncode == 0, res.stderr
    return read_jsonl(tmp_path / "run" / "metrics.jsonl"), read_jsonl(tmp_path / "run" / "events.jsonl")


def test_dynamic_sampling_hits_its_cap_on_an_all_tied_task_and_says_so(tmp_path):
    rows, events = _train(tmp_path, TIED_HANDLER, {"preset": "dapo", "overlong_buffer": {"enable": False},
                                                  "filter_groups": {"max_num_gen_batches": 2}})
    for r in rows:
        assert r["train_num_gen_batches"] == 2 and r["dynamic_sampling_cap_hit"] == 1.0
        assert r["dynamic_sampling_frac_tied_before"] == 1.0 and r["dynamic_sampling_groups_kept"] == 0
        assert r["dynamic_sampling_extra_responses"] == 2 * 4  # one extra round of 2 prompts x 4 samples
        assert r["reward_calls"] >= 2 and r["timing_s_gen_extra"] > 0 and r["timing_s_gen"] >= r["timing_s_gen_extra"]
        assert r["critic_frac_reward_zero_std"] == 1.0  # trained on the first round, as plain GRPO would
    capped = [e for e in events if "hit its cap of 2 generation rounds" in e["message"]]
    assert len(capped) == len(rows) and capped[0]["level"] == "warning"


def test_dapo_with_remax_keeps_only_groups_with_signal_shapes_length_and_scores_a_greedy_baseline(tmp_path):
    rows, _ = _train(tmp_path, None, {"preset": "dapo", "adv_estimator": "remax",
                                      "overlong_buffer": {"len": 4, "penalty_factor": 0.5}})
    for r in rows:
        assert r["critic_frac_reward_zero_std"] == 0.0 and r["dynamic_sampling_groups_kept"] == 2
        assert 1 <= r["train_num_gen_batches"] <= 10 and r["dynamic_sampling_cap_hit"] == 0.0
        # overlong: responses over 8 - 4 = 4 tokens lose up to 0.5; the varied handler scores in [0, 1]
        assert -0.5 <= r["reward_overlong_reward_mean"] <= 0 and 0 <= r["reward_overlong_mean"] <= 1
        assert "remax_baseline_reward_mean" in r and r["remax_baseline_reward_calls"] >= 1
        assert r["timing_s_gen_greedy"] > 0 and r["timing_s_reward_greedy"] > 0


def test_the_variance_collapse_alarm_reads_the_tied_share_before_dynamic_sampling():
    from test_health import fired, healthy, with_curve

    # dynamic sampling trains only groups with signal (zero_std 0) while 95% of the sampled groups tie
    rows = with_curve(healthy(1), "critic_frac_reward_zero_std", lambda t, v: 0.0)
    rows = with_curve(rows, "dynamic_sampling_frac_tied_before", lambda t, v: 0.95 if t >= 40 else 0.2)
    rows = with_curve(rows, "critic_rewards_mean", lambda t, v: 0.5 if t >= 40 else v)
    assert fired(rows)[0] == {"reward_variance_collapse": 42}


def test_temperature_zero_samples_the_argmax_for_remax_baselines():
    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer
    from grpo.rollout.generate import generate
    from grpo.rollout.prompts import encode_prompt

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_random_qwen3(tok)
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"What is {a} + 1?"}]) for a in (3, 12)]
    torch.manual_seed(1)
    a = generate(model, tok, prompts, n=1, max_new_tokens=4, temperature=0.0, ignore_eos=True)
    torch.manual_seed(2)
    b = generate(model, tok, prompts, n=1, max_new_tokens=4, temperature=0.0, ignore_eos=True)
    assert a.response_ids == b.response_ids  # no sampling: the seed does not matter
    with torch.no_grad():  # the first greedy token is the argmax of the prompt's next-token logits
        first = model(torch.tensor([prompts[0]])).logits[0, -1].argmax().item()
    assert a.response_ids[0][0] == first
