"""Step metrics with Bedrock's names (verl's keys, `/` -> `_`) and where they go.

Sinks: `<run>/metrics.jsonl` (one line per step), `<run>/events.jsonl` (OpenAI
`fine_tuning.job.event` objects, as Bedrock's `list_events` returns them), and TensorBoard through
accelerate's trackers. Only the main process writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the trainer; `grpo compare`/`plot` do not pay for it
    import torch
from grpo.rundir import RunDir, _append_lines, make_event, read_jsonl

# The six the OpenAI-compatible path reports per step (spec section 3), in the walkthrough's order.
BEDROCK_STEP_METRICS = ("critic_rewards_mean", "actor_pg_loss", "actor_entropy", "actor_grad_norm",
                        "critic_advantages_mean", "response_length_mean")


# Fields that differ run to run even with the same seed (wall-clock), left out of equality checks.
VOLATILE_PREFIXES = ("timing_s_", "timing_per_token_ms_", "perf_", "reward_seconds")


def _stats(prefix: str, x: "torch.Tensor") -> dict[str, float]:
    x = x.float()
    if not x.numel():  # nothing graded this step (every trajectory failed under on_failure=skip)
        return {f"{prefix}_{k}": float("nan") for k in ("mean", "max", "min")}
    return {f"{prefix}_mean": float(x.mean()), f"{prefix}_max": float(x.max()), f"{prefix}_min": float(x.min())}


@contextlib.contextmanager
def marked_timer(name: str, timing: dict[str, float]):
    """verl's `marked_timer`: the block's wall-clock seconds are added to `timing[name]`."""
    start = time.perf_counter()
    yield
    timing[name] = timing.get(name, 0.0) + time.perf_counter() - start


class Processes:
    """The cross-process reductions the metrics need (accelerate collectives; identities for one process)."""

    def __init__(self, accelerator):
        self.acc, self.world = accelerator, accelerator.num_processes

    def cat(self, x: "torch.Tensor") -> "torch.Tensor":
        """All processes' values of a 1-D tensor (lengths may differ), on the CPU."""
        if self.world == 1:
            return x
        x = self.acc.pad_across_processes(x.float().to(self.acc.device), pad_index=float("nan"))
        x = self.acc.gather(x).cpu()
        return x[~x.isnan()]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (same keys on every process), as float32 on any world size."""
        import torch

        keys = sorted(values)
        vals = torch.tensor([values[k] for k in keys], device=self.acc.device)
        return dict(zip(keys, self.acc.reduce(vals, reduction="mean").tolist()))

    def objects(self, obj) -> list:
        from accelerate.utils import gather_object

        return [obj] if self.world == 1 else gather_object([obj])


def step_metrics(batch, procs: Processes, *, actor: dict, reward, timing: dict[str, float], max_prompt_length: int,
                 tis_cap: float, flops_config=None, ppo_epochs: int = 1, tools: bool = False) -> dict:
    """One step's metrics from its StepBatch (grpo.batch), over every process: the data (verl's
    compute_data_metrics), the actor's (averaged over processes), the reward handler's, the sampler mismatch
    (when another engine sampled), timing (compute_timing_metrics) and throughput/memory/MFU."""
    m = data_metrics(batch, procs, max_prompt_length=max_prompt_length)
    m.update(procs.mean(actor))
    if batch.sampler_logprobs is not None:
        from grpo.algorithms.tis import sampler_mismatch_metrics

        sel = batch.loss_mask.bool()
        old, sampler = procs.cat(batch.old_logprobs[sel]), procs.cat(batch.sampler_logprobs[sel])
        m.update(sampler_mismatch_metrics(old, sampler, old.new_ones(old.shape), cap=tis_cap))
    m.update(reward_metrics(reward, procs))
    if tools:
        m.update(tool_metrics(batch, procs))
    m.update(perf_metrics(batch, procs, timing, flops_config=flops_config, ppo_epochs=ppo_epochs))
    return m


def data_metrics(batch, procs: Processes, *, max_prompt_length: int) -> dict:
    """verl's `compute_data_metrics` for one step, over the scored rows (an unscored row is no sample).

    `critic_score_*` and `critic_rewards_*`: sequence scores (equal: no KL is folded into the reward, KL is a
    loss). `critic_advantages_*` and `critic_returns_*` (GRPO's returns are its advantages, as in verl): over
    response *tokens*, so with unequal lengths their mean is not exactly 0.
    `critic_frac_reward_zero_std`: the share of groups whose rewards are all equal (no gradient from them).
    `response_length_*` counts every generated token; `response_length_clip_ratio` is the share of responses
    that hit `inference_max_tokens` without an end token; `response_aborted_ratio` the share with no token at
    all, and `response_length_non_aborted_*` the statistics of the others. `prompt_length_clip_ratio`: share
    of prompts exactly `max_prompt_length` long (longer ones are filtered out when the job starts).
    `global_seqlen_*` (verl's balance statistics): the tokens (prompt + response) of each process's rows;
    `balanced_*` equal the plain ones, since rows are not re-balanced across processes.
    """
    import torch

    ok = batch.scored
    scores = batch.scores[ok].float()
    groups, inverse = torch.unique(batch.group[ok], return_inverse=True)
    hi = torch.full((len(groups),), -math.inf).scatter_reduce(0, inverse, scores, "amax")
    lo = torch.full((len(groups),), math.inf).scatter_reduce(0, inverse, scores, "amin")
    resp = procs.cat(batch.response_lengths[ok].float())
    truncated = procs.cat(batch.truncated[ok].float())
    prompt = procs.cat(batch.prompt_lengths[ok].float())
    adv = procs.cat(batch.advantages[batch.loss_mask.bool()])
    m = {}
    m.update(_stats("critic_score", procs.cat(scores)))
    m["critic_rewards_mean"], m["critic_rewards_max"], m["critic_rewards_min"] = (
        m["critic_score_mean"], m["critic_score_max"], m["critic_score_min"])
    if adv.numel():
        m.update(_stats("critic_advantages", adv))
        m.update(_stats("critic_returns", adv))
    m["critic_frac_reward_zero_std"] = float(procs.cat((hi == lo).float()).mean())
    m.update(_stats("response_length", resp))
    m["response_length_clip_ratio"] = float(truncated.mean())
    aborted = resp == 0
    m["response_aborted_ratio"] = float(aborted.float().mean())
    m.update(_stats("response_length_non_aborted", resp[~aborted]))
    m["response_length_non_aborted_clip_ratio"] = float(truncated[~aborted].mean())
    m.update(_stats("prompt_length", prompt))
    m["prompt_length_clip_ratio"] = float((prompt == max_prompt_length).float().mean())
    per_process = procs.cat(batch.packed.attention_mask.sum().reshape(1).float())
    lo_s, hi_s = float(per_process.min()), float(per_process.max())
    m.update(global_seqlen_min=lo_s, global_seqlen_max=hi_s, global_seqlen_minmax_diff=hi_s - lo_s,
             global_seqlen_balanced_min=lo_s, global_seqlen_balanced_max=hi_s,
             global_seqlen_mean=float(per_process.sum()) / len(per_process))
    return m


def tool_metrics(batch, procs: Processes) -> dict:
    """Tool calling (grpo.rollout.tools), over the rows whose prompt had tools (every process calls it when the
    job's data has tools, whether or not its own share of a step does: the gathers are collective).

    `response_tool_call_parse_error_ratio`: the share of trajectories with a call that could not be taken (bad
    JSON, unknown function, arguments against the schema; the grader reads it in metadata.tool_call_parse_error).
    `tools_call_ratio`: the share of trajectories that made at least one call; `tools_calls_mean`: calls per
    trajectory. Multi-turn rollouts (engine.environment) add `tools_turns_mean` (assistant turns per trajectory),
    `tools_errors_mean` (tool calls that failed: exception, timeout, crash), `tools_max_turns_ratio` (share that
    stopped at engine.rollout.max_turns with a call unanswered); `timing_s_tools` is the time spent in tools."""
    import torch

    messages = batch.messages or [None] * len(batch)
    rows = [i for i, msgs in enumerate(messages) if msgs is not None]
    calls = [sum(len(m.get("tool_calls") or []) for m in messages[i] if m["role"] == "assistant") for i in rows]
    cols = {"response_tool_call_parse_error_ratio": [float(batch.parse_errors[i] is not None) for i in rows],
            "tools_call_ratio": [float(c > 0) for c in calls], "tools_calls_mean": [float(c) for c in calls]}
    if batch.tool_stats is not None:  # engine.environment: set on every process
        st = batch.tool_stats
        cols.update(tools_turns_mean=[float(st["turns"][i]) for i in rows],
                    tools_errors_mean=[float(st["errors"][i]) for i in rows],
                    tools_max_turns_ratio=[float(st["max_turns"][i]) for i in rows])
    out = {}
    for name, values in cols.items():
        x = procs.cat(torch.tensor(values, dtype=torch.float32))
        out[name] = float(x.mean()) if x.numel() else float("nan")
    return out


def reward_metrics(result, procs: Processes) -> dict:
    """reward_score_mean, the handler's reward_<name>_mean, reward_failures and reward_calls over every
    process's trajectories: sums and counts are gathered, so each mean weighs every trajectory once."""
    if procs.world == 1:
        return {k: float(v) for k, v in result.summary().items()
                if isinstance(v, (int, float)) and k != "reward_seconds"}  # wall-clock: timing_s_reward has it
    ok = [s for s in result.scores if s is not None]
    local = {"score": (sum(ok), len(ok)), **{k: (sum(v), len(v)) for k, v in result.metrics.items() if v},
             "#failures": (float(result.n_failed), 0), "#calls": (float(result.n_calls), 0)}
    totals: dict[str, list[float]] = {}
    for part in procs.objects(local):
        for k, (total, count) in part.items():
            acc = totals.setdefault(k, [0.0, 0])
            acc[0] += total
            acc[1] += count
    out = {f"reward_{k}_mean": t / c for k, (t, c) in totals.items() if not k.startswith("#") and c}
    out.update(reward_failures=totals["#failures"][0], reward_calls=totals["#calls"][0])
    return out


#: Per-token timings, as verl's compute_timing_metrics: generation over response tokens, the rest over all tokens.
PER_TOKEN_SECTIONS = {"gen": "response", "ref": "all", "adv": "all", "update_actor": "all"}


def perf_metrics(batch, procs: Processes, timing: dict[str, float], *, flops_config=None, ppo_epochs: int = 1) -> dict:
    """verl's timing_s_*, timing_per_token_ms_* (milliseconds per token of the whole step, every process),
    perf_total_num_tokens / perf_time_per_step / perf_throughput (tokens per second per process), memory,
    and perf_mfu_actor (the update's model FLOP utilisation, where the model's FLOPs can be counted)."""
    import psutil
    import torch

    counts = procs.cat(torch.tensor([float(batch.response_lengths.sum()), float(batch.packed.attention_mask.sum())]))
    tokens = {"response": float(counts[0::2].sum()), "all": float(counts[1::2].sum())}
    m = {f"timing_s_{k}": v for k, v in timing.items()}
    m.update({f"timing_per_token_ms_{k}": timing[k] * 1000 / tokens[kind] if tokens[kind] else 0.0
              for k, kind in PER_TOKEN_SECTIONS.items() if k in timing})
    m["perf_total_num_tokens"] = tokens["all"]
    m["perf_time_per_step"] = timing["step"]
    m["perf_throughput"] = tokens["all"] / (timing["step"] * procs.world)
    if torch.cuda.is_available():
        m["perf_max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        m["perf_max_memory_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    m["perf_cpu_memory_used_gb"] = psutil.virtual_memory().used / 2**30
    if flops_config is not None and timing.get("update_actor"):
        seqlens = procs.cat(batch.packed.attention_mask.sum(dim=1).float()).tolist()
        mfu = actor_mfu(flops_config, seqlens, timing["update_actor"] / ppo_epochs, procs.world)
        if mfu is not None:
            m["perf_mfu_actor"] = mfu
    return m


#: Peak dense bf16 FLOP/s by device name (verl's get_device_flops table; its nominal CPU figure included).
DEVICE_FLOPS = {"GB200": 2.5e15, "B200": 2.25e15, "MI300X": 1307e12, "H100": 989e12, "H800": 989e12, "H200": 989e12,
                "A100": 312e12, "A800": 312e12, "L40S": 362.05e12, "L40": 181.05e12, "A40": 149.7e12, "H20": 148e12}
CPU_FLOPS = 448e9
DENSE_DECODERS = ("qwen2", "qwen3", "llama", "mistral")  # verl's _estimate_qwen2_flops covers these


def actor_mfu(config, seqlens: list[float], seconds: float, world: int) -> float | None:
    """verl's perf/mfu/actor: model FLOPs of a forward + backward over `seqlens` (every process's sequences)
    in `seconds` (one pass), over the devices' peak. FLOPs as verl's dense-decoder count: 6 N per token for the
    N weights of the linear layers, embedding and head, plus 6 L^2 h d per sequence of length L for attention
    (h heads of size d, every layer). None for models outside DENSE_DECODERS or a device not in the table."""
    import torch

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "model_type", None) not in DENSE_DECODERS or not seconds:
        return None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in sorted(DEVICE_FLOPS.items(), reverse=True) if k in name), None)
    else:
        peak = CPU_FLOPS
    if peak is None:
        return None
    hidden, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, cfg.num_key_value_heads * head_dim
    dense = (3 * hidden * cfg.intermediate_size + hidden * (2 * q + 2 * kv)) * layers + 2 * cfg.vocab_size * hidden
    flops = 6 * dense * sum(seqlens) + 6 * sum(n * n for n in seqlens) * head_dim * heads * layers
    return flops / seconds / (peak * world)


class RunLog:
    """metrics.jsonl + events.jsonl (+ TensorBoard via the accelerator), main process only."""

    def __init__(self, run_dir: Path, accelerator=None, *, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = RunDir(self.run_dir).metrics
        self.events_path = RunDir(self.run_dir).events
        self.accelerator = accelerator
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: keep exactly the lines of steps up to the checkpoint (one line per step)."""
        if not self.enabled:
            return
        for path, get in ((self.metrics_path, lambda r: r.get("step")), (RunDir(self.run_dir).samples, lambda r: r.get("step")),
                          (self.events_path, lambda r: (r.get("data") or {}).get("step"))):
            rows = [r for r in read_jsonl(path) if get(r) is None or get(r) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, path)

    def amend_step(self, step: int, extra: dict) -> None:
        """Add `extra` to step `step`'s metrics line and event: values known only once the line is written (the
        checkpoint's save time, saved after the line so that a checkpoint never outlives its step's line). Each
        file is rewritten whole and replaced atomically."""
        if not self.enabled:
            return
        for path, data in ((self.metrics_path, lambda r: r if r.get("step") == step else None),
                           (self.events_path, lambda r: r.get("data") if r.get("type") == "metrics" else None)):
            rows = read_jsonl(path)
            hit = next((d for d in map(data, reversed(rows)) if isinstance(d, dict) and d.get("step") == step), None)
            if hit is None:
                continue
            hit.update(extra)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, path)
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(extra, step=step)

    def clear(self) -> None:
        """On a resume with no checkpoint to resume from: the run starts over, its logs with it."""
        if self.enabled:
            for path in (self.metrics_path, self.events_path, RunDir(self.run_dir).samples, RunDir(self.run_dir).summary):
                path.unlink(missing_ok=True)

    def event(self, message: str, **kw) -> None:
        if self.enabled:
            _append_lines(self.events_path, [make_event(message, **kw)])

    def step(self, metrics: dict) -> None:
        if not self.enabled:
            return
        step, total = metrics["step"], metrics["total_steps"]
        _append_lines(self.metrics_path, [metrics])
        _append_lines(self.events_path, [make_event(f"Step {step}/{total}: training metrics", type="metrics", data=metrics)])
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
