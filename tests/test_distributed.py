"""Gradient accumulation and the number of processes do not change the math.

`grpo.training.actor.update_policy` normalises every micro-batch loss by the mini-batch's global token (or
sequence) count, as current verl does. So one process on all 16 rows, and two CPU processes (DDP over
gloo, started by `accelerate launch`) on 8 rows each, with different micro-batch sizes, must give the
same adapter after the same optimizer steps, and the same reported losses.

The comparison is at the level of the update function, on the SAME fixed data in every run (sampling
differs by rank seed, so whole training runs are not comparable): a script written into tmp_path builds
a fixed PackedBatch with unequal response lengths, fixed advantages and old/reference log-probs, loads
the same tiny model with the same LoRA init, and calls `update_policy`. The optimizer is plain SGD, so
the final weights are linear in the gradients and float noise stays at float noise (Adam's first step
would turn a 1e-9 difference in a near-zero gradient into a full learning-rate step).

A last test runs the real CLI under `accelerate launch` with two processes and checks it completes with
exactly one metrics line per step, each step's prompts split between the two ranks' reward workers.

On a machine without GPUs accelerate needs to be told to use the CPU (`ACCELERATE_USE_CPU=true`, or
`Accelerator(cpu=True)`), else `--multi_gpu` starts processes that each believe they are alone and
`--cpu --num_processes 2` starts one process: `_launch` sets it.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_helpers import lm_head_runs, untied_model
from helpers_engine import (
    PYTHON,
    REPO,
    build_model_dir,
    cli_env,
    read_jsonl,
    write_data,
    write_job,
    write_varied_handler,
)

ROWS, MINI = 16, 8  # 16 sequences, 8 per optimizer step (2 steps per epoch)
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))

UPDATE_SCRIPT = r'''
"""One update_policy call per run in PLAN on fixed data; the main process saves adapters and metrics."""
import json
import sys

import torch
from accelerate import Accelerator

from grpo.training.actor import UpdateSettings, adapter_disabled, compute_logprobs, update_policy
from grpo.config import LoraConfig
from grpo.models.loading import load_policy
from grpo.batch import PackedBatch, pack

model_dir, plan_path, out_path = sys.argv[1:4]
plan = json.load(open(plan_path))
acc = Accelerator(cpu=not torch.cuda.is_available())
world, rank = acc.num_processes, acc.process_index
assert world == plan["world"], (world, plan["world"])
N, M, T = plan["rows"], plan["mini"], 0.9

g = torch.Generator().manual_seed(123)
prompts = [torch.randint(3, 300, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(N)]
responses = [torch.randint(3, 300, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist() for _ in range(N)]
full = pack(prompts, responses, pad_id=0)
mask = full.response_mask
advantages = torch.randn(N, generator=g)[:, None] * mask
noise_old = torch.randn(mask.shape, generator=g) * 0.3 * mask
noise_ref = torch.randn(mask.shape, generator=g) * 0.3 * mask


def local_rows(keep, M):
    """This rank's rows: global mini-batch k is keep[k*M:(k+1)*M]; each rank takes every world-th of them."""
    return torch.tensor([keep[k * M + j] for k in range(len(keep) // M) for j in range(rank, M, world)])


local = local_rows(list(range(N)), M)
rank_tokens = acc.gather(mask[local].sum().reshape(1)).tolist()
results = {"distributed_type": str(acc.distributed_type), "rank_tokens": rank_tokens, "runs": {}}
for name, run in plan["runs"].items():
    # "dropped": rows left out of the batch; "masked": rows kept with an empty response mask (a skipped
    # reward failure); "mini": global sequences per optimizer step for this run.
    run_mini = run.get("mini", M)
    local = local_rows([i for i in range(N) if i not in run.get("dropped", [])], run_mini)
    rmask = mask.clone()
    rmask[run.get("masked", [])] = 0.0
    batch = PackedBatch(full.input_ids[local], full.attention_mask[local], rmask[local])
    torch.manual_seed(0)
    targets = {"target_modules": run["targets"]} if "targets" in run else {}
    policy = load_policy(plan.get("models", {}).get(run.get("model"), model_dir), LoraConfig(rank=4, alpha=8, **targets),
                         dtype=torch.float32)
    gb = torch.Generator().manual_seed(1)
    for n, p in sorted(policy.named_parameters()):
        if p.requires_grad and "lora_B" in n:  # nonzero B, so the A matrices get gradients from step one
            p.data.copy_(torch.randn(p.shape, generator=gb) * 0.05)
    with torch.no_grad():
        base = compute_logprobs(policy, full, T, N)  # the whole batch in one pass: identical everywhere
    old, ref = (base + noise_old)[local], (base + noise_ref)[local]
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=run["lr"])
    model, opt = acc.prepare(policy, opt)
    if run.get("ref_pass"):  # the trainer's reference pass (adapter off) before the update
        with adapter_disabled(acc.unwrap_model(model)):
            compute_logprobs(model, batch, T, 5)
    s = UpdateSettings(temperature=T, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                       loss_agg_mode=run["mode"], kl_coef=0.1, kl_penalty="low_var_kl", entropy_coef=0.01,
                       max_grad_norm=run["max_grad_norm"], ppo_epochs=run["ppo_epochs"], mini_batch_seqs=run_mini // world,
                       loss_scale_factor=12.0, micro_batch_seqs=run["micro"])
    adv = advantages[local] * batch.response_mask
    m = update_policy(model, opt, batch, adv, s, accelerator=acc, old_logp=old, ref_logp=ref)
    vals = torch.tensor([m[k] for k in sorted(m)], dtype=torch.float64)
    m = dict(zip(sorted(m), acc.reduce(vals, reduction="mean").tolist()))  # as the trainer reports them
    after = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
    results["runs"][name] = {"metrics": m, "before": before, "after": after}
    acc.free_memory()
if acc.is_main_process:
    torch.save(results, out_path)
acc.wait_for_everyone()
'''

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
MASK_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# SGD learning rates that move the adapter by about 0.1 in every mode (the sum modes have larger losses).
LR = {"token-mean": 2.0, "seq-mean-token-mean": 0.7, "seq-mean-token-sum": 0.25, "seq-mean-token-sum-norm": 0.4}


def _runs(micro: int) -> dict:
    runs = {mode: {"mode": mode, "micro": micro, "ppo_epochs": 2, "max_grad_norm": 1e4, "lr": LR[mode]} for mode in MODES}
    # A binding grad-norm clip: the norm must be the global one for the clipped update to agree.
    runs["token-mean-clipped"] = {"mode": "token-mean", "micro": micro, "ppo_epochs": 1, "max_grad_norm": 0.05, "lr": 2.0}
    # Rows 3 and 12 fully masked (as skipped reward failures are) vs left out: the same update.
    for mode in MASK_MODES:
        one = {"mode": mode, "micro": micro, "ppo_epochs": 1, "max_grad_norm": 1e4, "lr": LR[mode]}
        runs[f"masked-{mode}"] = {**one, "masked": [3, 12], "mini": ROWS}
        runs[f"dropped-{mode}"] = {**one, "dropped": [3, 12], "mini": ROWS - 2}
    runs.update(lm_head_runs(micro))  # LoRA on lm_head too, tied and untied embeddings
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], world: int, tmp: Path, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    """`accelerate launch` with `world` CPU processes (DDP over gloo); plain python for one."""
    if world == 1:
        cmd = [PYTHON, *args]
    else:
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(world), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(_free_port()), *args]
    e = cli_env(ACCELERATE_USE_CPU="true", MASTER_ADDR="127.0.0.1", **env)
    r = subprocess.run(cmd, cwd=tmp, env=e, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def updates(tmp_path_factory) -> dict:
    """Run the update script with 1 process (micro-batch 5) and with 2 processes (micro-batch 3)."""
    d = tmp_path_factory.mktemp("ddp")
    model = build_model_dir(d / "model", seed=3)
    models = {"untied": str(untied_model(d / "untied"))}
    script = d / "update.py"
    script.write_text(UPDATE_SCRIPT, encoding="utf-8")
    out = {}
    for world, micro in ((1, 5), (2, 3)):
        plan = d / f"plan{world}.json"
        plan.write_text(json.dumps({"world": world, "rows": ROWS, "mini": MINI, "runs": _runs(micro), "models": models}))
        _launch([str(script), str(model), str(plan), str(d / f"out{world}.pt")], world, d)
        out[world] = torch.load(d / f"out{world}.pt", weights_only=False)
    return out


def test_two_processes_really_ran_ddp(updates):
    assert updates[1]["distributed_type"] == "DistributedType.NO"
    assert updates[2]["distributed_type"] == "DistributedType.MULTI_CPU"


@pytest.mark.parametrize("name", [*MODES, "token-mean-clipped", *(f"masked-{m}" for m in MASK_MODES), *lm_head_runs(1)])
def test_same_update_with_one_or_two_processes(updates, name):
    one, two = updates[1]["runs"][name], updates[2]["runs"][name]
    moved = max(float((one["after"][k] - one["before"][k]).abs().max()) for k in one["after"])
    assert moved > 1e-3, f"{name}: the adapter barely moved ({moved:.2e}); the comparison would prove nothing"
    for k in one["after"]:
        assert torch.equal(one["before"][k], two["before"][k]), f"{name}: different initial {k}"
        torch.testing.assert_close(two["after"][k], one["after"][k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    m1, m2 = one["metrics"], two["metrics"]
    for key in ("actor_pg_loss", "actor_kl_loss", "actor_entropy", "actor_grad_norm",
                "actor_pg_clipfrac", "actor_ppo_kl", "actor_pg_clipfrac_lower"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), f"{name}: {key}"
    if name == "token-mean-clipped":
        assert m1["actor_grad_norm"] > 0.1, "the clip did not bind"
    assert m1["actor_pg_clipfrac"] > 0.05, "no token was clipped: the clip statistics went untested"


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("mode", MASK_MODES)
def test_a_fully_masked_row_changes_nothing(updates, world, mode):
    """A row with no response token (how the trainer keeps a skipped reward failure, so that every process
    keeps the same mini-batch layout) counts as no token and no sequence: the update equals the one
    without the row."""
    masked, dropped = updates[world]["runs"][f"masked-{mode}"], updates[world]["runs"][f"dropped-{mode}"]
    for k in masked["after"]:
        torch.testing.assert_close(masked["after"][k], dropped["after"][k], rtol=1e-5, atol=1e-6, msg=f"{mode}: {k}")
    for key in ("actor_pg_loss", "actor_kl_loss", "actor_entropy", "actor_grad_norm", "actor_pg_clipfrac"):
        assert masked["metrics"][key] == pytest.approx(dropped["metrics"][key], rel=1e-5, abs=1e-7), key


def test_modes_differ_by_far_more_than_the_tolerance(updates):
    """The tolerance above is discriminating: the aggregation modes give visibly different updates."""
    runs = updates[1]["runs"]
    for a, b in (("token-mean", "seq-mean-token-mean"), ("seq-mean-token-sum", "seq-mean-token-sum-norm")):
        diff = max(float((runs[a]["after"][k] - runs[b]["after"][k]).abs().max()) for k in runs[a]["after"])
        assert diff > 1e-4, (a, b, diff)


def test_ranks_hold_unequal_token_counts(updates):
    """Rows are split so the two ranks have different numbers of response tokens (the case where a
    per-rank mean would differ from the global one)."""
    assert len(updates[2]["rank_tokens"]) == 2
    assert len(set(updates[2]["rank_tokens"])) == 2, updates[2]["rank_tokens"]


def test_accelerate_launch_two_processes_train_smoke(tmp_path):
    """`accelerate launch` x2 `-m grpo train`: completes, one metrics line per step, each step's 2 prompts
    split between the two ranks' reward workers (4 trajectories each)."""
    model = build_model_dir(tmp_path / "model", seed=0)
    train, val = write_data(tmp_path, n_train=6, n_val=2)
    handler = write_varied_handler(tmp_path / "varied.py")
    job = write_job(tmp_path / "job.yaml", model, train, val, handler=handler,
                    hyper={"batch_size": 2, "eval_interval": 3},
                    engine={"checkpoint_interval": 3, "reward": {"pass_env": ["TEST_REWARD_LOG"]}})
    calls = tmp_path / "calls.jsonl"
    _launch(["-m", "grpo", "train", str(job), "--output-dir", str(tmp_path / "run"), "--no-progress"], 2, REPO,
            timeout=150, TEST_REWARD_LOG=str(calls))
    run = tmp_path / "run"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the handler's metrics are over both ranks' trajectories, not rank 0's
        assert r["reward_calls"] == 2 and r["reward_failures"] == 0
        assert r["reward_score_mean"] == pytest.approx(r["critic_rewards_mean"], abs=1e-6)
    events = read_jsonl(run / "events.jsonl")
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3]
    assert sum(e["message"] == "Fine-tuning job started" for e in events) == 1
    assert (run / "checkpoints" / "step-000003" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    # Training calls carry 4 trajectories (1 prompt x group 4 per rank); validation calls 1 each.
    train_calls = [c for c in read_jsonl(calls) if c["ids"][0].startswith("train-")]
    assert len(train_calls) == 6 and all(len(c["ids"]) == 4 for c in train_calls)
    assert len({c["pid"] for c in train_calls}) == 2, "one reward worker per rank"
    for step in range(3):  # each step: two ranks, two different prompts
        prompts = {c["ids"][0].rpartition("#")[0] for c in train_calls[2 * step:2 * step + 2]}
        assert len(prompts) == 2
