"""The rollout backends (grpo.rollout.samplers) on tiny real models: transformers' continuous batching returns the
trained policy's own log-probs, the trainer runs with it end to end (old log-probs recomputed, TIS weights
and sampler-mismatch metrics), and the backends that cannot run say so in one line."""

import pytest
import torch
from helpers_engine import build_model_dir, read_jsonl, run_grpo, write_data, write_job, write_varied_handler

from grpo.batch import pack, pack_step
from grpo.config import LoraConfig
from grpo.models.loading import add_lora, chat_tokenizer
from grpo.rollout.prompts import encode_prompt
from grpo.rollout.samplers import ContinuousSampler, TransformersSampler
from grpo.training.actor import compute_logprobs

torch.set_num_threads(1)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _policy(kind):
    from grpo.models.tiny import build_random_gpt_oss, build_random_qwen3

    tok = chat_tokenizer(kind)
    torch.manual_seed(0)
    model = (build_random_qwen3 if kind == "qwen3" else build_random_gpt_oss)(tok)
    policy = add_lora(model, LoraConfig(rank=4, alpha=8, **({"target_parameters": EXPERTS} if kind == "gpt_oss" else {})))
    for name, p in policy.named_parameters():  # LoRA B starts at 0: make the adapter count
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"What is {i} + {i + 3}?"}]) for i in range(3)]
    return policy, tok, prompts


@pytest.mark.parametrize("kind", ["qwen3", "gpt_oss"])
def test_continuous_batching_samples_the_trained_policy_and_reports_its_log_probs(kind):
    policy, tok, prompts = _policy(kind)
    b = ContinuousSampler(policy, tok).generate(prompts, n=3, max_new_tokens=12, temperature=0.8)
    assert b.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and b.sample.tolist() == [0, 1, 2] * 3
    assert b.prompt_lengths.tolist() == [len(p) for p in prompts for _ in range(3)]
    assert all(1 <= n <= 12 for n in b.response_lengths.tolist())
    for i, p in enumerate(p for p in prompts for _ in range(3)):  # packed: each row is its prompt, then the response
        assert b.packed.input_ids[i, :len(p)].tolist() == p
    sel = b.packed.response_mask.bool()
    assert int(sel.sum()) == int(b.response_lengths.sum())
    assert ((b.sampler_logprobs != 0) == sel).all()  # one log-prob per response token, nothing elsewhere
    # the sampler's log-prob of each token it drew is the trained policy's (adapter on, temperature applied)
    trainer = compute_logprobs(policy, b.packed, 0.8, 16)
    torch.testing.assert_close(b.sampler_logprobs[sel], trainer[sel], atol=1e-4, rtol=0)
    policy.train()  # the sampler runs in eval mode and puts the training mode back
    ContinuousSampler(policy, tok).generate(prompts[:1], n=2, max_new_tokens=4, temperature=1.0)
    assert policy.training
    assert policy.get_base_model().config._attn_implementation in ("sdpa", "eager")  # paged attention undone


def test_the_sampler_log_probs_sit_where_pack_predicts_each_token():
    prompts, responses = [[5, 6, 7], [8]], [[1, 2], [3, 4, 9]]
    batch = pack_step(prompts, responses, 0, group=[0, 1], sample=[0, 0], truncated=[False, True], contents=["a", "b"],
                      reasoning=[None, None], sampler_logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5]])
    lt = batch.sampler_logprobs
    torch.testing.assert_close(lt, torch.tensor([[0, 0, -0.1, -0.2], [-0.3, -0.4, -0.5, 0]]))
    assert ((lt != 0).float() == batch.packed.response_mask).all()
    assert torch.equal(batch.packed.input_ids, pack(prompts, responses, 0).input_ids)
    with pytest.raises(ValueError, match="row 1: 3 response tokens but 2 values"):
        pack_step(prompts, responses, 0, group=[0, 1], sample=[0, 0], truncated=[False, True], contents=["a", "b"],
                  reasoning=[None, None], sampler_logprobs=[[-0.1, -0.2], [-0.3, -0.4]])


def test_the_transformers_backend_is_the_policy_itself():
    policy, tok, prompts = _policy("qwen3")
    batch = TransformersSampler(policy, tok).generate(prompts, n=2, max_new_tokens=6, temperature=1.0)
    assert batch.sampler_logprobs is None and len(batch) == 6


def _job(tmp_path, **engine):
    model = build_model_dir(tmp_path / "model")
    train, val = write_data(tmp_path / "data", n_train=4, n_val=2)
    handler = write_varied_handler(tmp_path / "varied.py")
    return write_job(tmp_path / "job.yaml", model, train, val, handler=handler,
                     hyper={"inference_max_tokens": 6}, engine={"eval_max_records": 2, **engine})


def test_training_with_continuous_batching_recomputes_old_log_probs_and_applies_tis(tmp_path):
    job = _job(tmp_path, rollout={"backend": "continuous"})
    run = tmp_path / "run"
    proc = run_grpo("train", job, "--output-dir", run, "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 2
    for r in rows:
        assert r["timing_s_old_log_prob"] > 0  # the trainer's own log-probs are the old policy
        # same weights, same float32 numerics: the sampler and the trainer agree, TIS weights are 1
        assert abs(r["rollout_kl_k1"]) < 1e-5 and 0 <= r["rollout_kl_k3"] < 1e-8
        assert r["rollout_tis_weight_mean"] == pytest.approx(1.0, abs=1e-4) and r["rollout_tis_clipfrac"] == 0
        assert r["actor_ppo_kl"] == pytest.approx(0.0, abs=1e-6)  # on-policy: the ratio starts at 1
        assert r["actor_grad_norm"] > 0 and r["critic_rewards_max"] > r["critic_rewards_min"]
    assert rows[-1]["val_score_rewards_mean"] >= 0


def test_backends_that_cannot_run_say_why_in_one_line(tmp_path):
    job = _job(tmp_path, rollout={"backend": "continuous"}, ignore_eos=True)
    proc = run_grpo("train", job, "--output-dir", tmp_path / "r1", "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "engine.ignore_eos is not supported by engine.rollout.backend=continuous" in proc.stderr
    proc = run_grpo("train", job, "--output-dir", tmp_path / "r2", "--set", "engine.rollout.backend=vlm")
    assert proc.returncode == 2 and "engine.rollout.backend" in proc.stderr and "'vllm'" in proc.stderr
    proc = run_grpo("train", job, "--dry-run", "--set", "engine.rollout.backend=vllm", "--set", "engine.load_in_4bit=true",
                    "--set", "engine.ignore_eos=false")
    assert proc.returncode == 2 and "cannot take its weights from a 4-bit" in proc.stderr
    try:
        import vllm  # noqa: F401
    except ImportError:
        proc = run_grpo("train", job, "--output-dir", tmp_path / "r3", "--no-progress",
                        "--set", "engine.rollout.backend=vllm", "--set", "engine.ignore_eos=false")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "pip install 'grpo[vllm]'" in proc.stderr
