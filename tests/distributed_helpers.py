"""Shared by tests/test_fsdp.py, tests/test_multinode.py and tests/test_zero3.py: a script that runs
`update_policy` on fixed data under whatever launch mode started it (through `grpo.training.distributed`, as the
trainer does), the launchers that start it (plain python, `accelerate launch` with an accelerate config, several
"nodes" on loopback), and `grpo train` SIGKILLed mid-run and resumed under a sharded launch mode.

The script (the same idea as tests/test_distributed.py's, which it extends): 16 fixed sequences of unequal
lengths, fixed advantages and old/reference log-probs, the same tiny model; each rank seeds its LoRA init
differently (as the trainer does), so the runs agree only if every process starts from rank 0's; SGD, so
float noise stays float noise (one AdamW run too); `logprob_chunk` in the plan sets the positions per lm_head chunk
(each rank's chunks counted). The run named `probe` in the plan also writes a checkpoint through
`grpo.training.checkpoint.save_checkpoint`, the sharded model's log-probs on the whole batch, and the
all-gathers of one `generate` call with and without `gathered_for_generation`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers_engine import (
    PYTHON,
    REPO,
    build_model_dir,
    cli_env,
    read_jsonl,
    stable_metrics,
    write_data,
    write_job,
    write_varied_handler,
)

ACCELERATE = str(Path(PYTHON).with_name("accelerate"))
ROWS, MINI = 16, 8
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# SGD learning rates that move the adapter by about 0.1 in every mode (tests/test_distributed.py's)
LR = {"token-mean": 2.0, "seq-mean-token-mean": 0.7, "seq-mean-token-sum": 0.25, "seq-mean-token-sum-norm": 0.4}

UPDATE_SCRIPT = r'''
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from grpo.batch import PackedBatch, pack
from grpo.config import LoraConfig
from grpo.models.loading import load_policy, load_tokenizer
from grpo.rollout.generate import generate
from grpo.training.actor import UpdateSettings, adapter_disabled, compute_logprobs, update_policy
from grpo.training.checkpoint import save_checkpoint
from grpo.training.distributed import (full_trainable_state, gathered_for_generation, make_accelerator, mode_name,
                                       prepare_policy)

model_dir, plan_path, out_path = sys.argv[1:4]
plan = json.load(open(plan_path))
acc = make_accelerator()
world, rank = acc.num_processes, acc.process_index
N, M, T = plan["rows"], plan["mini"], 0.9

g = torch.Generator().manual_seed(123)
prompts = [torch.randint(3, 300, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(N)]
responses = [torch.randint(3, 300, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist() for _ in range(N)]
full = pack(prompts, responses, pad_id=0)
mask = full.response_mask
advantages = torch.randn(N, generator=g)[:, None] * mask
noise_old = torch.randn(mask.shape, generator=g) * 0.3 * mask
noise_ref = torch.randn(mask.shape, generator=g) * 0.3 * mask
local = torch.tensor([k * M + j for k in range(N // M) for j in range(rank, M, world)])
results = {"mode": mode_name(acc), "world": world, "runs": {}}


def trainable(model):
    weights, _ = full_trainable_state(acc, model)  # collective; None when the model is not sharded
    if weights is None:
        weights = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
    return weights


def loaded_weights_whole(policy):
    """Collective under ZeRO-3: its zero.Init partitioned the weights as they loaded, so rank 0's plain
    forward needs them gathered (no hooks are installed before `prepare`); a no-op in other modes."""
    if mode_name(acc) == "deepspeed-zero3":
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(policy.parameters()))
    return contextlib.nullcontext()


def count_all_gathers(fn):
    calls = [0]
    real = dist.all_gather_single if hasattr(dist, "all_gather_single") else None
    real_tensor = dist.all_gather_into_tensor

    def counted(real_fn):
        def wrapper(*a, **k):
            calls[0] += 1
            return real_fn(*a, **k)
        return wrapper

    if real is not None:
        dist.all_gather_single = counted(real)
    dist.all_gather_into_tensor = counted(real_tensor)
    try:
        fn()
    finally:
        if real is not None:
            dist.all_gather_single = real
        dist.all_gather_into_tensor = real_tensor
    return calls[0]


chunk_calls = [0]
if plan.get("logprob_chunk"):  # positions per lm_head chunk (grpo.models.forward, read at each call); counted
    import grpo.models.forward as fwd

    fwd.LOGPROB_CHUNK = plan["logprob_chunk"]
    real_chunk = fwd._head_chunk

    def counted_chunk(*a, **k):
        chunk_calls[0] += 1
        return real_chunk(*a, **k)

    fwd._head_chunk = counted_chunk
for name, run in plan["runs"].items():
    batch = PackedBatch(full.input_ids[local], full.attention_mask[local], mask[local])
    torch.manual_seed(rank)  # each rank its own LoRA A init, as the trainer seeds them: rank 0's must win
    targets = {"target_modules": run["targets"]} if "targets" in run else {}
    policy = load_policy(plan.get("models", {}).get(run.get("model"), model_dir), LoraConfig(rank=4, alpha=8, **targets),
                         dtype=getattr(torch, run.get("dtype", plan.get("dtype", "float32"))))
    gb = torch.Generator().manual_seed(1)
    for n, p in sorted(policy.named_parameters()):
        if p.requires_grad and "lora_B" in n:  # nonzero B, so the A matrices get gradients from step one
            p.data.copy_(torch.randn(p.shape, generator=gb) * 0.05)
        if p.requires_grad and run.get("bf16_init"):  # one start for fp32 and bf16 runs (peft inits A in the base dtype)
            p.data.copy_(p.data.bfloat16().float())
    base = torch.zeros(mask.shape)
    with loaded_weights_whole(policy):  # ZeRO-3 (zero3_init_flag) partitions the base weights as they load
        if rank == 0:
            base = compute_logprobs(policy, full, T, N)
    if world > 1:
        dist.broadcast(base, 0)
    chunk_calls[0] = 0  # from here: the update's chunks
    old, ref = (base + noise_old)[local], (base + noise_ref)[local]
    trained = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=run["lr"]) if run.get("optim") == "adamw" else torch.optim.SGD(trained, lr=run["lr"])
    torch_opt = opt  # the trainer's scheduler drives it (DeepSpeed's own optimizer is no torch Optimizer)
    model, opt = prepare_policy(acc, policy, opt, micro_batch_seqs=run["micro"], max_grad_norm=run["max_grad_norm"])
    before = trainable(model)
    if run.get("ref_pass"):  # the trainer's reference pass (adapter off) before the update, as in every step
        with adapter_disabled(acc.unwrap_model(model)):
            compute_logprobs(model, batch, T, 5)
    s = UpdateSettings(temperature=T, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                       loss_agg_mode=run["mode"], kl_coef=0.1, kl_penalty="low_var_kl", entropy_coef=0.01,
                       max_grad_norm=run["max_grad_norm"], ppo_epochs=run["ppo_epochs"], mini_batch_seqs=M // world,
                       loss_scale_factor=12.0, micro_batch_seqs=run["micro"])
    m = update_policy(model, opt, batch, advantages[local] * batch.response_mask, s, accelerator=acc,
                      old_logp=None if run.get("on_policy") else old, ref_logp=ref)
    vals = torch.tensor([m[k] for k in sorted(m)], dtype=torch.float64)
    m = dict(zip(sorted(m), acc.reduce(vals, reduction="mean").tolist()))
    out = {"metrics": m, "before": before, "after": trainable(model), "head_chunks": [chunk_calls[0]]}
    if world > 1:  # each rank's count of lm_head chunks in this run's update (forward and recompute)
        out["head_chunks"] = [None] * world
        dist.all_gather_object(out["head_chunks"], chunk_calls[0])
    if name == plan.get("probe"):
        from torch.distributed.tensor import DTensor

        p0 = next(p for p in model.parameters() if p.requires_grad)
        if hasattr(p0, "ds_tensor"):  # ZeRO-3: this rank's partition (flat), the full shape
            out["shard"] = [tuple(p0.ds_tensor.shape), tuple(p0.ds_shape)]
        else:
            out["shard"] = [tuple(p0.to_local().shape) if isinstance(p0, DTensor) else tuple(p0.shape), tuple(p0.shape)]
        sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda s: 1.0)
        save_checkpoint(Path(plan["ckpt_dir"]), 1, accelerator=acc, model=model, optimizer=opt, scheduler=sched, state={})
        out["logp"] = compute_logprobs(model, full, T, 5)
        policy_view = acc.unwrap_model(model)

        def gen():
            torch.manual_seed(0)
            generate(policy_view, load_tokenizer(model_dir), [prompts[0], prompts[1]], n=2, max_new_tokens=plan["new_tokens"],
                     temperature=1.0, ignore_eos=True)

        def gen_gathered():
            with gathered_for_generation(acc, model):
                gen()

        out["all_gathers"] = {"plain": count_all_gathers(gen), "gathered": count_all_gathers(gen_gathered)}
        units = [mod for mod in model.modules() if type(mod).__name__.startswith("FSDP")]
        out["fsdp_units"] = len(units)
        out["logp_after_generation"] = compute_logprobs(model, full, T, 5)
    results["runs"][name] = out
    acc.free_memory()
if acc.is_main_process:
    torch.save(results, out_path)
acc.wait_for_everyone()
'''



def assert_same_update(one: dict, two: dict, name: str) -> None:
    """Two runs of the UPDATE_SCRIPT plan's `name` (one process, and a sharded/multi-process one) started from the
    same adapter and ended at the same one (to float tolerance), with the same metrics; the adapter moved enough
    for that to mean something, and a binding clip did bind."""
    import pytest
    import torch

    moved = max(float((one["after"][k] - one["before"][k]).abs().max()) for k in one["after"])
    assert moved > 1e-3, f"{name}: the adapter barely moved ({moved:.2e}); the comparison would prove nothing"
    assert one["after"].keys() == two["after"].keys()
    for k in one["after"]:
        assert torch.equal(one["before"][k], two["before"][k]), f"{name}: different initial {k}"
        torch.testing.assert_close(two["after"][k], one["after"][k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        if "lm_head" in k:  # the LoRA on lm_head trained in both runs (FSDP2 once froze it after a reference pass)
            assert not torch.equal(two["after"][k], two["before"][k]), f"{name}: {k} did not move"
    m1, m2 = one["metrics"], two["metrics"]
    for key in ("actor_pg_loss", "actor_kl_loss", "actor_entropy", "actor_grad_norm", "actor_pg_clipfrac", "actor_ppo_kl"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), f"{name}: {key}"
    if name == "token-mean-clipped":
        assert m1["actor_grad_norm"] > 0.1, "the clip did not bind"

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def update_runs(micro: int) -> dict:
    runs = {mode: {"mode": mode, "micro": micro, "ppo_epochs": 2, "max_grad_norm": 1e4, "lr": LR[mode]} for mode in MODES}
    # A binding grad-norm clip: the norm must be the global one for the clipped update to agree.
    runs["token-mean-clipped"] = {"mode": "token-mean", "micro": micro, "ppo_epochs": 1, "max_grad_norm": 0.05, "lr": 2.0}
    # AdamW, the trainer's optimizer (its state is sharded too): Adam turns float noise in a near-zero gradient
    # into a whole step, so this only agrees when the gradients do to float precision
    runs["token-mean-adamw"] = {"mode": "token-mean", "micro": micro, "ppo_epochs": 2, "max_grad_norm": 1.0, "lr": 0.005,
                                "optim": "adamw"}
    runs.update(lm_head_runs(micro))
    return runs


#: LoRA on lm_head too (the quickstart's engine.lora): the runs above use the model's tied embeddings with LoRA on
#: the decoder only; a LoRA on a tied lm_head is what broke FSDP2's preparation (`tie_weights`), and the reference
#: pass before the update (adapter off, then on) is what froze its sharded parameters (grpo.training.actor).
LM_HEAD_TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


def lm_head_runs(micro: int) -> dict:
    """token-mean with LoRA on lm_head and a reference pass first, on the tied model and on an untied one (the plan's
    `models: {"untied": dir}`, built by `untied_model`)."""
    one = {"mode": "token-mean", "micro": micro, "ppo_epochs": 2, "max_grad_norm": 1e4, "lr": LR["token-mean"],
           "targets": LM_HEAD_TARGETS, "ref_pass": True}
    return {"tied-lm-head": one, "untied-lm-head": {**one, "model": "untied"}}


def untied_model(directory: Path) -> Path:
    """The same tiny Qwen3 as build_model_dir(seed=3), with separate input and output embeddings."""
    return build_model_dir(directory, seed=3, tie_word_embeddings=False)


def write_plan(path: Path, runs: dict, **extra) -> Path:
    path.write_text(json.dumps({"rows": ROWS, "mini": MINI, "runs": runs, **extra}), encoding="utf-8")
    return path


def launch_cmd(args: list[str], *, world: int = 1, config: str | None = None, port: int | None = None,
               machines: int = 1, machine_rank: int = 0, mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` with `world` processes in all (over `machines` loopback "nodes"), with an accelerate
    config from configs/accelerate; plain python for one process."""
    if world == 1 and config is None:
        return [PYTHON, *args]
    cmd = [ACCELERATE, "launch"]
    if config:
        cmd += ["--config_file", str(REPO / "configs" / "accelerate" / config)]
    else:
        cmd += ["--multi_gpu"]
    return cmd + ["--num_processes", str(world), "--num_machines", str(machines), "--machine_rank", str(machine_rank),
                  "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                  "--main_process_port", str(port or free_port()), *args]


def run_checked(cmds: list[list[str]], cwd: Path, timeout: float = 180, **env) -> list[subprocess.CompletedProcess]:
    """Start every command at once (the nodes of one job), wait for all; each must succeed."""
    e = cli_env(MASTER_ADDR="127.0.0.1", **env)
    procs = [subprocess.Popen(c, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    results = []
    for c, p in zip(cmds, procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    for r in results:
        assert r.returncode == 0, f"{' '.join(r.args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return results


# -- SIGKILL + --resume through the CLI, under a sharded launch mode --------------------------------------------

RESUME_STEPS = 4


def _train_cmd(job, out, config, *extra, mixed_precision="no"):
    return launch_cmd(["-m", "grpo", "train", str(job), "--output-dir", str(out), "--no-progress", *extra],
                      world=2, config=config, mixed_precision=mixed_precision)


def ranks_of(out) -> list[int]:
    """Live `grpo train` rank processes writing to `out` (the launcher itself runs `accelerate`)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        launcher = any(c.endswith(b"bin/accelerate") for c in cmd[:2])
        if str(out).encode() in cmd and b"grpo" in cmd and not launcher and state != b"Z":
            found.append(int(pid))
    return found


def killed_and_resumed(tmp_path: Path, config: str, *, micro_batch_size: int, engine: dict | None = None,
                       mixed_precision: str = "no") -> tuple[Path, Path]:
    """Run A: `grpo train` (2 ranks, `config`) for RESUME_STEPS steps uninterrupted. Run B: the same job,
    SIGKILLed as a whole process group once step 2's checkpoint is written (each reward call then takes 1 s, so
    the kill lands inside step 3): the ranks (torch's agent starts each in a session of its own) die with it;
    then `--resume`. Checks what every mode shares (the kill, the resumed steps, the same metrics as A); returns
    (A, B) for the mode's own checks of the final checkpoint."""
    model = build_model_dir(tmp_path / "model", seed=1)
    train, val = write_data(tmp_path, n_train=8, n_val=2)
    handler = write_varied_handler(tmp_path / "varied.py")
    job = write_job(tmp_path / "job.yaml", model, train, val, handler=handler,
                    hyper={"n_epochs": 1, "batch_size": 2, "eval_interval": 4},
                    engine={"checkpoint_interval": 2, "micro_batch_size": micro_batch_size, "seed": 7, **(engine or {})})
    a, b = tmp_path / "A", tmp_path / "B"
    run_checked([_train_cmd(job, a, config, mixed_precision=mixed_precision)], REPO, timeout=300)
    log = open(tmp_path / "B.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(_train_cmd(job, b, config, mixed_precision=mixed_precision), cwd=REPO,
                            env=cli_env(TEST_REWARD_SLEEP_S="1.0", MASTER_ADDR="127.0.0.1"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (b / "checkpoints" / "step-000002" / "state.json").is_file():
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'B.log').read_text()[-3000:]}"
        ranks = ranks_of(b)
        assert len(ranks) == 2, ranks
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10  # the ranks lead sessions of their own: they die with their agent
        while ranks_of(b) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not ranks_of(b), "training ranks outlived the SIGKILLed launcher"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    killed = read_jsonl(b / "metrics.jsonl")
    assert not (b / "summary.json").exists() and 2 <= len(killed) < RESUME_STEPS

    run_checked([_train_cmd(job, b, config, "--resume", mixed_precision=mixed_precision)], REPO, timeout=300)
    rows = read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, RESUME_STEPS + 1))
    for x, y in zip(rows[:2], killed[:2]):
        assert stable_metrics(x) == stable_metrics(y)
    events = read_jsonl(b / "events.jsonl")
    assert [e["message"] for e in events if e["message"].startswith("Resumed")] == ["Resumed from checkpoint at step 2"]
    for x, y in zip(read_jsonl(a / "metrics.jsonl"), rows):
        assert stable_metrics(x) == stable_metrics(y), f"step {x['step']} metrics differ"
    return a, b
