"""Real scale without a GPU: the dry-run plan of the two Bedrock configs (counts checked by hand), the memory
model, the accelerate configs, training steps on tiny GPT-OSS and Qwen3 with the real chat templates, and the
GPU check's rehearsal on the CPU (scripts/gpu_check.sh --rehearse)."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers_engine import REPO, cli_env, read_jsonl, run_grpo, write_data, write_job

from grpo.config import LoraConfig, load_config
from grpo.errors import UserError
from grpo.training.dry_run import GIB, estimate_memory, inspect_model, make_plan, model_config, setup_for

torch.set_num_threads(1)
QWEN, GPT_OSS = REPO / "configs" / "gsm8k_qwen3_32b.yaml", REPO / "configs" / "gsm8k_gpt_oss_20b.yaml"


@pytest.fixture(scope="module")
def infos():
    lora = LoraConfig()  # rank 32, alpha 64, all-linear: the configs' LoRA
    return {name: inspect_model(model_config(name)[0], lora) for name in ("Qwen/Qwen3-32B", "openai/gpt-oss-20b")}


def test_parameter_counts_of_the_bedrock_models(infos):
    q, g = infos["Qwen/Qwen3-32B"], infos["openai/gpt-oss-20b"]
    # model cards: Qwen3-32B 32.8B parameters; gpt-oss-20b 21B total, 3.6B active
    assert round(q.total / 1e9, 1) == 32.8 and q.active == q.total - q.embedding
    assert round(g.total / 1e9) == 21 and round(g.active / 1e9, 1) == 3.6
    # LoRA rank 32 by hand: r x (in + out) per targeted matrix
    qwen_layer = 32 * (2 * (5120 + 8192) + 2 * (5120 + 1024) + 3 * (5120 + 25600))  # q, o; k, v; gate, up, down
    assert q.trainable == 64 * qwen_layer == 268_435_456
    attention = 32 * (2 * (2880 + 4096) + 2 * (2880 + 512))
    experts = 32 * 32 * (2880 + 2 * 2880) + 32 * 32 * (2880 + 2880)  # per expert: A [r, in], B [out, r]
    assert g.trainable == 24 * (attention + experts) == 369_819_648
    assert g.flops_per_token(train=True) == 4 * g.active


def test_memory_estimates_by_hand(infos):
    q, g = infos["Qwen/Qwen3-32B"], infos["openai/gpt-oss-20b"]
    job_q, job_g = load_config(QWEN), load_config(GPT_OSS)
    one = estimate_memory(q, job_q, setup_for(job_q, q))
    # KV cache: 4 prompts x 8 samples, 512 + 1024 tokens, 64 layers x K and V x 8 heads x 128 x bf16
    assert one["kv_cache"] == 32 * 1536 * 64 * 2 * 8 * 128 * 2
    assert one["weights"] == q.total * 2 and one["adapter"] == q.trainable * 16
    assert one["peak"] / GIB > 72  # bf16 Qwen3-32B does not fit one 80 GB GPU comfortably...
    s4 = setup_for(job_q, q)
    s4.load_in_4bit = True
    four = estimate_memory(q, job_q, s4)
    assert 17 < four["weights"] / GIB < 21 and four["peak"] / GIB < 50  # ...a 4-bit base does
    sharded = estimate_memory(q, job_q, setup_for(job_q, q, world=4, sharded=True))
    assert sharded["weights"] < one["weights"] / 3 and sharded["adapter"] == one["adapter"] / 4
    s_nogc = setup_for(job_q, q)
    s_nogc.gradient_checkpointing = False
    assert estimate_memory(q, job_q, s_nogc)["activations"] > 10 * one["activations"]
    gpt = estimate_memory(g, job_g, setup_for(job_g, g))
    # GPT-OSS: 12 full-attention layers cache 1536 tokens, 12 sliding ones 128; 8 KV heads x 64
    assert gpt["kv_cache"] == 32 * (12 * 1536 + 12 * 128) * 2 * 8 * 64 * 2
    assert gpt["expert_fold"] == 2 * g.experts / 24 * 2 and gpt["peak"] / GIB < 70


def test_dry_run_cli_prints_the_plan(tmp_path):
    train, _ = write_data(tmp_path, n_train=10, n_val=2)
    res = run_grpo("train", GPT_OSS, "--dry-run", "--set", f"training_file={train}", timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "the config is valid; nothing was loaded" in out
    assert "openai/gpt-oss-20b (GptOssForCausalLM; config: embedded copy" in out
    assert "20.91 B (active per token: 3.61 B" in out and "369.82 M" in out
    assert "parameters mlp.experts.gate_up_proj, mlp.experts.down_proj" in out
    assert "steps         3 (10 records / batch_size 4 x 1 epoch(s)" in out
    assert "4 GPUs FSDP2/ZeRO-3" in out and "on an 80 GB GPU" in out
    assert "rollout       engine.rollout.backend transformers" in out and "vLLM" not in out


def test_dry_run_counts_vllms_own_weights_copy():
    """Colocated vLLM holds a second, full bf16 copy of the weights on every GPU while it samples: GPT-OSS-20B's
    39 GiB twice over does not fit one 80 GB GPU, and 39 GiB exceed the default 0.3 share vLLM may take."""
    job = load_config(GPT_OSS, ["engine.rollout.backend=vllm"])
    info = inspect_model(model_config(job.local_model)[0], job.engine.lora)
    base = estimate_memory(info, load_config(GPT_OSS), setup_for(load_config(GPT_OSS), info))
    got = estimate_memory(info, job, setup_for(job, info))
    assert got["vllm_weights"] == info.total * 2
    assert got["vllm_reserved"] == got["vllm_weights"] + got["kv_cache"]  # more than 0.3 x 80 GiB
    assert got["peak"] == got["weights"] + got["adapter"] + got["vllm_reserved"] > base["peak"]
    text = make_plan(job)
    assert "old log-probs recomputed, TIS token (cap 2.0)" in text and "vLLM weights copy (bf16)" in text
    assert "does not fit" in text and "exceed engine.rollout.gpu_memory_utilization=0.3" in text


def test_dry_run_plan_for_qwen3_and_its_errors(tmp_path):
    text = make_plan(load_config(QWEN))
    assert "Qwen/Qwen3-32B (Qwen3ForCausalLM" in text and "32.76 B" in text and "268.44 M" in text
    assert "steps         unknown: training_file data/gsm8k/train.jsonl not found" in text
    assert "hint: engine.load_in_4bit" in text
    with pytest.raises(UserError, match="not one of the embedded configs"):
        make_plan(load_config(QWEN, ["engine.model=someone/not-a-model"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [], "reference_answer": "#### 1"}\n')
    with pytest.raises(UserError, match=f"{bad}:1: messages"):
        make_plan(load_config(QWEN, [f"training_file={bad}"]))


def test_dry_run_counts_equal_the_real_models(tmp_path):
    from grpo.models.loading import chat_tokenizer, count_parameters, load_policy
    from grpo.models.tiny import build_random_gpt_oss

    tok = chat_tokenizer("gpt_oss")
    build_random_gpt_oss(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lora = LoraConfig(rank=4, alpha=8)
    info = inspect_model(model_config(str(tmp_path))[0], lora)
    total, trainable = count_parameters(load_policy(str(tmp_path), lora, dtype=torch.float32))
    assert (info.total + info.trainable, info.trainable) == (total, trainable)


def test_accelerate_configs_load_and_say_what_they_are():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType as D

    got = {p.stem: load_config_from_file(str(p)) for p in sorted((REPO / "configs" / "accelerate").glob("*.yaml"))}
    assert set(got) == {"single_gpu", "ddp", "fsdp2", "zero3"}
    assert got["single_gpu"].distributed_type == D.NO and got["single_gpu"].num_processes == 1
    assert got["ddp"].distributed_type == D.MULTI_GPU
    assert got["fsdp2"].distributed_type == D.FSDP and str(got["fsdp2"].fsdp_config["fsdp_version"]) == "2"
    assert got["zero3"].distributed_type == D.DEEPSPEED and got["zero3"].deepspeed_config["zero_stage"] == 3


DIGITS_HANDLER = '''\
"""Test reward from the graded response (the final answer, thinking excluded): its share of digits, plus
0.1 x (its length mod 3) so that every group has spread even when a random model writes no digit."""


def score(text):
    return sum(c.isdigit() for c in text) / max(len(text), 1) + 0.1 * (len(text) % 3)


def lambda_handler(event, context):
    return [{"id": t["id"], "aggregate_reward_score": score(t["messages"][-1]["content"])} for t in event]
'''


@pytest.mark.parametrize("kind,effort,gc", [("gpt_oss", "low", True), ("qwen3", "high", False)])
def test_training_steps_on_tiny_models_with_the_real_templates(tmp_path, kind, effort, gc):
    from safetensors.torch import load_file

    from grpo.models.loading import chat_tokenizer
    from grpo.models.tiny import build_random_gpt_oss, build_random_qwen3

    tok = chat_tokenizer(kind)
    torch.manual_seed(0)
    (build_random_gpt_oss if kind == "gpt_oss" else build_random_qwen3)(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    train, _ = write_data(tmp_path / "data", n_train=4, n_val=1)
    handler = tmp_path / "digits.py"
    handler.write_text(DIGITS_HANDLER)
    job = write_job(tmp_path / "job.yaml", tmp_path / "model", train, None, handler=handler,
                    hyper={"reasoning_effort": effort, "inference_max_tokens": 12},
                    engine={"gradient_checkpointing": gc, "log_samples": 8})
    res = run_grpo("train", job, "--output-dir", tmp_path / "run", "--no-progress", timeout=180)
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["actor_grad_norm"] > 0 for r in rows)
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    def score(text):
        return sum(c.isdigit() for c in text) / max(len(text), 1) + 0.1 * (len(text) % 3)

    assert samples and all(s["score"] == pytest.approx(score(s["response"])) for s in samples)
    adapter = load_file(Path(json.loads((tmp_path / "run" / "summary.json").read_text())["adapter"])
                        / "adapter_model.safetensors")
    moved = {k for k, v in adapter.items() if "lora_B" in k and v.abs().sum() > 0}  # B starts at 0
    assert moved and any(".experts." in k for k in moved) == (kind == "gpt_oss")


SMOKE_FIELDS = {"model", "partial", "rehearsal", "width_scale", "dtype", "layers", "hidden_size", "vocab_size", "parameters",
                "active_parameters", "trainable_parameters", "build_s", "sequences_per_step", "prompt_tokens",
                "new_tokens", "gen_tokens_per_s", "update_tokens_per_s", "gen_tokens_per_s_transformers",
                "gen_tokens_per_s_continuous", "continuous_rollout_kl_k1", "continuous_rollout_kl_k3",
                "continuous_rollout_tis_weight_mean", "continuous_rollout_tis_clipfrac", "update_mfu",
                "update_flops_per_token", "peak_cpu_rss_gib", "cpu_rss_before_build_gib", "steps"}
STAGES = ["device", "versions", "gpt_oss", "qwen3", "combine"]


def test_gpu_check_rehearsal_runs_every_stage_and_writes_the_json(tmp_path):
    """scripts/gpu_check.sh --rehearse: the GPU check's own sequence on the CPU (gpu_smoke.py for both
    architectures with both rollout backends, the dry-run comparison, the JSON), its default limits checked to
    fit the 8 minutes a lent GPU gives (the test raises them: this CPU is shared); models smaller than the
    documented rehearsal (2 layers, a 512-token vocabulary, 4 new tokens) so that the test stays short. Then
    every limit at 1 s: each stage is killed, said to be, and the JSON is still written."""
    import subprocess

    env = cli_env(PYTHON=sys.executable, GPU_CHECK_SMOKE_ARGS="--layers 2 --steps 2 --group 2 --prompt-tokens 16 "
                  "--new-tokens 4 --vocab-size 512 --lora-rank 4")
    out = tmp_path / "check"
    # limits raised for this shared CPU (under load, importing torch alone has taken 30 s); the defaults, which a
    # GPU run gets, are in the JSON and checked against the 8 minutes
    roomy = {f"GPU_CHECK_LIMIT_{s.upper()}": "600" for s in STAGES}
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--rehearse", str(out)], cwd=tmp_path,
                         env={**env, **roomy}, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads((out / "gpu_check.json").read_text())
    assert got["rehearsal"] is True and got["device"] == "no nvidia-smi" and torch.__version__ in got["versions"]
    assert list(got["stages"]) == STAGES and "combine_error" not in got, got
    assert all(s["rc"] == 0 and not s["killed_by_limit"] and 0 < s["seconds"] < s["limit_s"]
               for s in got["stages"].values()), got["stages"]
    assert [got["stages"][s]["default_limit_s"] for s in STAGES] == [10, 30, 200, 150, 40]
    assert got["default_limits_total_s"] == 440 and got["worst_case_s"] == 470 <= 480  # the 8 minutes
    for name, layers in (("gpt_oss", 2), ("qwen3", 2)):
        entry = got[name]
        assert "--rehearse" in entry["smoke_args"] and entry["estimate_gib"]["peak"] > 0
        assert entry["measured_over_estimate"] > 0
        plan = entry["time_plan"]
        assert plan["gpu"] == "h200" and plan["smoke_step_s"] == pytest.approx(
            2 * plan["gen_s"] + 2 * plan["ref_s"] + plan["update_s"]) and plan["update_s"] > 0
        run = entry["measured"]["results"][0]
        assert set(run) == SMOKE_FIELDS, set(run) ^ SMOKE_FIELDS
        assert (run["model"], run["layers"], run["vocab_size"], run["width_scale"], run["dtype"]) == (
            name, layers, 512, 16, "bfloat16")
        assert len(run["steps"]) == 2 and run["partial"] is False and run["update_mfu"] > 0 and run["gen_tokens_per_s_continuous"] > 0
        # bf16 on both sides: the continuous sampler's log-probs against the trainer's forward
        assert 0 <= run["continuous_rollout_kl_k3"] < 1e-2 and abs(run["continuous_rollout_tis_weight_mean"] - 1) < 0.1
    killed = tmp_path / "killed"
    env.update({f"GPU_CHECK_LIMIT_{s.upper()}": "1" for s in STAGES})
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(killed)], cwd=tmp_path,
                         env={**env, "GPU_CHECK_REHEARSE": "1"}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads((killed / "gpu_check.json").read_text())
    for name in ("versions", "gpt_oss", "qwen3", "combine"):  # the device stage (no nvidia-smi) ends at once
        assert got["stages"][name]["rc"] == 124 and got["stages"][name]["killed_by_limit"], got["stages"]
    assert "no JSON from the combine stage" in got["combine_error"] and got["limits_total_s"] == 5 + 10


def test_job_configs_are_the_spec_example():
    for path in (QWEN, GPT_OSS):
        raw = yaml.safe_load(path.read_text())
        h = raw["method"]["reinforcement"]["hyperparameters"]
        assert (h["n_epochs"], h["batch_size"], h["learning_rate_multiplier"]) == (1, 4, 1.0)
        cfg = load_config(path)
        assert cfg.engine.dtype == "bfloat16" and cfg.engine.gradient_checkpointing
        assert "engine" not in cfg.bedrock_body() and cfg.bedrock_body()["model"] in ("qwen.qwen3-32b", "openai.gpt-oss-20b")


def test_dry_run_sizes_the_continuous_backends_paged_cache_for_the_whole_step():
    """grpo.rollout.samplers gives continuous batching a cache for every sequence of the step at full length, twice
    over (no sliding-window saving): the plan counts that, not one generate call's cache."""
    job = load_config(GPT_OSS, ["engine.rollout.backend=continuous"])
    info = inspect_model(model_config(job.local_model)[0], job.engine.lora)
    got = estimate_memory(info, job, setup_for(job, info))
    h = job.hyperparameters
    seq = h.max_prompt_length + h.inference_max_tokens
    assert got["kv_cache"] == 2 * h.batch_size * h.training_sample_per_prompt * 24 * seq * 2 * 8 * 64 * 2


def test_memory_model_follows_what_the_cpu_run_holds():
    """The corrections scripts/bench_memory.py led to (docs/scale.md "Memory model vs measured"), on the tiny
    model in fp32: activations in the weights' dtype; each group's prompt counted once in the update (a
    prefix-sharing decoder), plus the prompt's K and V that each row's attention saves (repeated to the query
    heads); the log-prob chunk's backward holds five fp32 [positions, vocab] tensors; fp32 decoding holds
    exactly one merged copy of every LoRA-wrapped weight, which is what grpo.models.merge really swaps in."""
    from grpo.config import TINY_MODEL
    from grpo.models.loading import load_policy, resolve_model_path
    from grpo.models.merge import merged_lora

    job = load_config(REPO / "configs" / "quickstart.yaml", ["engine.dtype=float32"])
    info = inspect_model(model_config(TINY_MODEL)[0], job.engine.lora)
    assert info.shares_prefix and info.model_type == "qwen3" and info.kv_heads < info.heads
    s = setup_for(job, info)
    got = estimate_memory(info, job, s)
    h, G, micro = job.hyperparameters, job.hyperparameters.training_sample_per_prompt, job.engine.micro_batch_size
    tokens = micro // G * h.max_prompt_length + micro * h.inference_max_tokens  # 8 prompts once, 64 responses
    q, kv = info.heads * info.head_dim, info.kv_heads * info.head_dim
    per_layer = tokens * 4 * (6 * info.hidden + 2 * q + 3 * kv + 4 * info.intermediate)
    per_layer += micro * h.max_prompt_length * 4 * 2 * q  # 64 rows x 128 prompt positions x K, V on 4 query heads
    assert got["activations"] == info.layers * per_layer
    assert got["logprob_chunk"] == 512 * info.vocab * 4 * 5
    assert got["update"] == got["activations"] + got["logprob_chunk"]  # no GC: all layers held during the head's backward
    bf16 = estimate_memory(info, load_config(REPO / "configs" / "quickstart.yaml", ["engine.dtype=bfloat16"]), setup_for(
        load_config(REPO / "configs" / "quickstart.yaml", ["engine.dtype=bfloat16"]), info))
    assert bf16["activations"] == got["activations"] / 2 and "merged_lora" not in bf16
    assert bf16["logprob_chunk"] == got["logprob_chunk"]  # the chunk is upcast to fp32 whatever the weights' dtype
    policy = load_policy(resolve_model_path(TINY_MODEL, progress=False), job.engine.lora, dtype=torch.float32)
    lora = [m for m in policy.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    before = [m.base_layer.weight for m in lora]
    with merged_lora(policy):
        swapped = sum(m.base_layer.weight.numel() for m, w in zip(lora, before) if m.base_layer.weight is not w)
    assert swapped == info.lora_linear > 0 and got["merged_lora"] == 4 * info.lora_linear
    assert got["peak"] == got["weights"] + got["adapter"] + max(got["kv_cache"] + got["merged_lora"], got["update"])


def test_memory_model_with_gradient_checkpointing():
    """With gradient checkpointing every row runs its prompt (grpo.models.forward shares prompts only through a KV
    cache, which the checkpointed training forward does not keep), and the update's peak is the checkpointed
    layer inputs plus either one recomputed layer or the log-prob chunk's backward, which come one after the
    other (measured on SmolLM2-135M: docs/scale.md)."""
    from grpo.config import TINY_MODEL

    job = load_config(REPO / "configs" / "quickstart.yaml", ["engine.dtype=float32", "engine.gradient_checkpointing=true"])
    info = inspect_model(model_config(TINY_MODEL)[0], job.engine.lora)
    got = estimate_memory(info, job, setup_for(job, info))
    h, micro = job.hyperparameters, job.engine.micro_batch_size
    tokens = micro * (h.max_prompt_length + h.inference_max_tokens)  # 64 rows x (128 + 48): no prompt sharing
    q, kv = info.heads * info.head_dim, info.kv_heads * info.head_dim
    per_layer = tokens * 4 * (6 * info.hidden + 2 * q + 3 * kv + 4 * info.intermediate)
    checkpoints = info.layers * tokens * info.hidden * 4
    assert got["activations"] == checkpoints + per_layer
    chunk = 512 * info.vocab * 4 * 5
    assert got["logprob_chunk"] == chunk and got["update"] == checkpoints + max(per_layer, chunk)
