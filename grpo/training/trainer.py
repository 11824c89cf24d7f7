"""The GRPO loop: sample -> score -> normalize -> update, one step readable top to bottom.

`Trainer(cfg, run_dir).train()` runs a job under plain `python` or `accelerate launch` (each process
takes its share of the step's prompts; groups never span processes, so advantages need no
communication). See `Trainer.step` for one step in order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from grpo.algorithms import core as alg
from grpo.algorithms.tis import tis_weights
from grpo.config import JobConfig
from grpo.errors import UserError
from grpo.reward.runner import RewardError
from grpo.rollout.multiturn import attach_tool_calls
from grpo.rollout.prompts import encode_prompt
from grpo.rollout.constrain import pick_grammars, rollout_grammars
from grpo.rollout.samplers import make_sampler
from grpo.rundir import RunDir, read_jsonl
from grpo.training.actor import UpdateSettings, adapter_disabled, compute_logprobs, update_policy
from grpo.training.checkpoint import latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from grpo.training.distributed import for_generation, make_accelerator, prepare_policy
from grpo.training.health import HealthMonitor
from grpo.training.metrics import Processes, RunLog, marked_timer, step_metrics
from grpo.training.validation import build_trajectories, sample_and_score


def _signal_groups(group: list[int], values: list[float | None]) -> list[int]:
    """The groups (in order) whose graded values do not all tie, or that have one graded member (verl keeps
    those: std > 0 or a single sample); a group with no graded row has no signal."""
    vals: dict[int, list[float]] = {}
    for g, v in zip(group, values):
        lst = vals.setdefault(g, [])
        if v is not None:
            lst.append(v)
    return [g for g, v in vals.items() if len(v) == 1 or (len(v) > 1 and max(v) > min(v))]


def _merge_results(results):
    """One RewardResult of several rounds' (scores, metrics and failures in order; calls and seconds summed)."""
    if len(results) == 1:
        return results[0]
    from grpo.reward.runner import RewardResult

    out = RewardResult(scores=[s for r in results for s in r.scores])
    for r in results:
        for k, v in r.metrics.items():
            out.metrics.setdefault(k, []).extend(v)
        for k, v in r.metric_types.items():
            out.metric_types.setdefault(k, v)
        out.failures.extend(r.failures)
        out.n_calls += r.n_calls
        out.seconds += r.seconds
    return out


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: Path, *, resume: bool = False, progress: bool = True):
        from accelerate.utils import set_seed

        from grpo.data import load_records
        from grpo.models.loading import load_policy, load_tokenizer, model_options, pick_dtype, resolve_model_path
        from grpo.reward.runner import RewardRunner, resolve_handler

        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        e, h = cfg.engine, cfg.hyperparameters
        trackers = [t for t in e.log_with if t != "none"]
        # DDP, FSDP2, ZeRO-3, several nodes; on CPUs over gloo too (grpo.training.distributed)
        self.acc = make_accelerator(log_with=trackers or None, project_dir=str(self.run_dir))
        self.is_main = self.acc.is_main_process
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if h.batch_size % self.world:
            raise UserError(f"hyperparameters.batch_size={h.batch_size} must be a multiple of the number of processes ({self.world})")
        if cfg.mini_batch_prompts() % self.world:
            raise UserError(f"engine.algorithm.mini_batch_size={cfg.mini_batch_prompts()} must be a multiple of the number "
                            f"of processes ({self.world})")
        set_seed(cfg.run_seed + self.rank)
        # The run directory is made when the job starts (train), so a start that fails here leaves none behind.
        self.log = RunLog(self.run_dir, self.acc, enabled=self.is_main)
        self._data_warnings: list[str] = []  # events.jsonl gets them once, when the job starts (not on resume)

        # Cheap checks before anything heavy: the handler exists, the data files read and validate.
        resolve_handler(cfg.handler)
        train_records = load_records(cfg.training_file, allow_small=True)
        val_records = load_records(cfg.validation_file, allow_small=True) if cfg.validation_file else None

        # Tools that run (engine.environment): the file's functions in worker processes; their schemas are the
        # tools every prompt shows (grpo.rollout.multiturn)
        self.env = None
        if e.environment:
            from grpo.rollout.multiturn import ToolEnvironment

            self.env = ToolEnvironment(e.environment, timeout_s=e.rollout.tool_timeout_s,
                                       concurrency=e.rollout.tool_concurrency, env=e.reward.env or None,
                                       pass_env=e.reward.pass_env)
        self._tool_error_logged = False
        self.val_extra: dict[str, float] = {}

        # Data: the prompts, encoded once; too-long prompts are filtered out, not truncated (as Bedrock).
        self.model_path = resolve_model_path(cfg.local_model, progress=progress and self.is_main)
        self.tok = load_tokenizer(self.model_path)
        self.train_records, self.train_prompts = self._load(train_records, "training_file")
        self.has_tools = self.env is not None or any(r.tools for r in self.train_records)
        self.val_records, self.val_prompts = [], []
        if val_records is not None:
            recs, ids = self._load(val_records, "validation_file")
            cap = e.eval_max_records or len(recs)
            self.val_records, self.val_prompts = recs[:cap], ids[:cap]
        # engine.rollout.tool_choice: a tool-call grammar per prompt (None: sampled freely; grpo.rollout.constrain)
        self.train_grammars = rollout_grammars(self.tok, self.train_records, e.rollout.tool_choice,
                                               reasoning_effort=h.reasoning_effort,
                                               parallel=e.rollout.parallel_tool_calls)
        self.val_grammars = rollout_grammars(self.tok, self.val_records, e.rollout.tool_choice,
                                             reasoning_effort=h.reasoning_effort, strict=False,
                                             parallel=e.rollout.parallel_tool_calls)
        n = len(self.train_records)
        self.steps_per_epoch = math.ceil(n / h.batch_size)
        self.total_steps = cfg.total_steps(n)
        self.eval_interval = cfg.eval_interval(n)

        dtype = pick_dtype(e.dtype, self.acc.device)
        policy = load_policy(self.model_path, e.lora, dtype=dtype, gradient_checkpointing=e.gradient_checkpointing,
                             **model_options(e))
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=e.weight_decay)
        warm = e.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.model, self.optimizer = prepare_policy(self.acc, policy, optimizer, micro_batch_seqs=e.algorithm.micro_batch_size,
                                                   max_grad_norm=e.algorithm.max_grad_norm)
        self.policy = self.acc.unwrap_model(self.model)
        if self.env is not None:
            from grpo.rollout.multiturn import ToolSampler

            sampler = ToolSampler(self.policy, self.tok, self.env, max_turns=e.rollout.max_turns,
                                  reasoning_effort=h.reasoning_effort)
        else:
            sampler = make_sampler(e, self.policy, self.tok, self.model_path, seed=cfg.run_seed + self.rank,
                                   max_model_len=h.max_prompt_length + h.inference_max_tokens)
        self.sampler = for_generation(sampler, self.acc, self.model)  # sharded weights: gathered once per generate call
        self.runner = RewardRunner(cfg.handler, batch_size=e.reward.batch_size, max_concurrency=e.reward.concurrency,
                                   timeout_s=e.reward.timeout_s, on_failure=e.reward.on_failure,
                                   endpoint_url=e.reward.endpoint_url, env=e.reward.env or None,
                                   pass_env=e.reward.pass_env, error_detail=e.reward.error_detail,
                                   error_log=RunDir(self.run_dir).reward_errors)
        self.settings = UpdateSettings.from_config(cfg, self.world)
        self.on_policy = e.algorithm.ppo_epochs == 1 and cfg.mini_batch_prompts() == h.batch_size
        self.procs = Processes(self.acc)
        self.health = HealthMonitor(e.health)
        self.start_step, self.state = 0, {"best_val": None, "evals_without_improvement": 0, "baseline_val": None}
        if resume:
            self._resume()

    # -- setup helpers ---------------------------------------------------------------------
    def _load(self, records, field):
        h = self.cfg.hyperparameters
        ids = [encode_prompt(self.tok, r.messages, reasoning_effort=h.reasoning_effort, tools=self._tools(r)) for r in records]
        keep = [i for i, p in enumerate(ids) if len(p) <= h.max_prompt_length]
        dropped = len(records) - len(keep)
        if dropped and self.is_main:
            msg = f"{field}: filtered out {dropped} of {len(records)} prompts longer than max_prompt_length={h.max_prompt_length} tokens"
            print(f"warning: {msg}")
            self._data_warnings.append(msg)
        if not keep:
            raise UserError(f"{field}: every prompt is longer than max_prompt_length={h.max_prompt_length} tokens")
        return [records[i] for i in keep], [ids[i] for i in keep]

    def _tools(self, record):
        """The tools a record's prompt shows: the environment's functions when the job has one, else its own."""
        return self.env.schemas if self.env is not None else record.tools

    def _conversations(self, records):
        from grpo.rollout.multiturn import Conversation

        return [Conversation(r.messages, self._tools(r)) for r in records]

    def _resume(self):
        if self.is_main:
            for partial in remove_partial(self.run_dir):  # a crash while it was being written
                print(f"removed {partial}: a checkpoint a crash left half written")
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:  # nothing to resume: the steps logged so far are redone, so they are dropped
            logged = len(read_jsonl(RunDir(self.run_dir).metrics))
            if self.is_main:
                self.log.clear()
                print(f"no checkpoint in {self.run_dir}; starting from step 0"
                      + (f" (the {logged} step(s) logged before it stopped are discarded)" if logged else ""))
            self.acc.wait_for_everyone()
            return
        state = load_checkpoint(ckpt, accelerator=self.acc, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.start_step = state.pop("step")
        self.state.update(state)
        self.log.truncate_after(self.start_step)

        if self.state.get("baseline_val") is not None:
            self.health.check_baseline(self.state["baseline_val"])
        for row in read_jsonl(RunDir(self.run_dir).metrics):  # the alarms so far fire again silently
            self.health.update(row)
        self.log.event(f"Resumed from checkpoint at step {self.start_step}")

    def _step_prompts(self, step: int) -> list[int]:
        """Indices of this process's prompts for global step `step` (0-based). Each epoch is a seeded
        permutation; a short last batch is filled from the epoch's start, so every step has batch_size."""
        n, B = len(self.train_records), self.cfg.hyperparameters.batch_size
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.run_seed * 1000 + epoch)).tolist()
        picked = [perm[(i * B + k) % n] for k in range(B)]
        return picked[self.rank::self.world]

    # -- the step --------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """One GRPO step (0-based `step`) on this process's prompts; its metrics over every process."""
        e, h, a = self.cfg.engine, self.cfg.hyperparameters, self.cfg.engine.algorithm
        timing: dict[str, float] = {}
        with marked_timer("step", timing):
            # 1. sample a group of responses per prompt, packed (grpo.rollout.samplers: engine.rollout.backend);
            # 2. score them with the reward function (the Lambda contract), DAPO's overlong shaping after it; a
            # failure skipped under on_failure=skip leaves its row unscored: no token and no sequence of the loss.
            # With engine.algorithm.filter_groups (DAPO's dynamic sampling), tied groups are dropped and more
            # prompts sampled until the step has batch_size groups with signal or the round cap is hit.
            prompt_idx, records, batch, scores, result, extra = self._rollout(step, timing)
            batch.fill_scores(scores)
            self._log_samples(step + 1, records, batch)

            # 3. advantages from the registered estimator (engine.algorithm.adv_estimator), on each response token;
            # remax's baseline is the score of one greedy response per prompt, sampled and scored here
            baselines = (self._greedy_baselines(prompt_idx, records, batch, timing, extra)
                         if a.adv_estimator == "remax" else None)
            with marked_timer("adv", timing):
                batch.fill_advantages(alg.get_advantage_estimator(a.adv_estimator), reward_baselines=baselines,
                                      norm_adv_by_std=a.norm_adv_by_std, gamma=a.gamma)

            # 4. log-probs the update needs: the reference (adapter off) for the KL loss; the old policy when
            # off-policy or when another engine sampled (the trainer's numerics are the old policy; TIS corrects)
            if a.kl_coef > 0:
                with marked_timer("ref", timing), adapter_disabled(self.policy):
                    batch.ref_logprobs = compute_logprobs(self.policy, batch.trained, e.temperature, a.micro_batch_size)
            if not self.on_policy or batch.sampler_logprobs is not None:
                with marked_timer("old_log_prob", timing):
                    batch.old_logprobs = compute_logprobs(self.policy, batch.trained, e.temperature, a.micro_batch_size)

            # 5. the policy update (mini-batches x ppo_epochs, the registered policy loss), the learning-rate
            # schedule's step (once per training step, as verl), and the sampler's copy of the new weights
            with marked_timer("update_actor", timing):
                actor = update_policy(self.model, self.optimizer, batch.trained, batch.advantages, self.settings,
                                      accelerator=self.acc, old_logp=batch.old_logprobs, ref_logp=batch.ref_logprobs,
                                      is_weights=self._tis_weights(batch))
                self.scheduler.step()
            if self.sampler.name != "transformers":
                with marked_timer("sync_weights", timing):
                    self.sampler.sync(self.policy)

        # 6. metrics, with Bedrock's names, over every process (grpo.training.metrics)
        m = step_metrics(batch, self.procs, actor=actor, reward=result, timing=timing,
                         max_prompt_length=h.max_prompt_length, tis_cap=e.rollout.tis_cap,
                         flops_config=getattr(self.policy, "config", None), ppo_epochs=a.ppo_epochs,
                         tools=self.has_tools)
        m.update(extra)
        return m

    # -- sampling and scoring, DAPO's dynamic sampling and overlong shaping, remax's baseline ----------------
    def _sample_and_score(self, step: int, idx: list[int], timing: dict, *, n: int, gen_key: str = "gen",
                          reward_key: str = "reward"):
        """Generate n responses for the prompts `idx` (with the tools that run, engine.environment, or the
        tool-call grammars of engine.rollout.tool_choice) and score them: (records, batch, result)."""
        e, h = self.cfg.engine, self.cfg.hyperparameters
        records = [self.train_records[i] for i in idx]
        with marked_timer(gen_key, timing):
            conversations = self._conversations(records)
            batch = self.sampler.generate([self.train_prompts[i] for i in idx], n=n, max_new_tokens=h.inference_max_tokens,
                                          temperature=e.temperature, top_p=e.top_p,
                                          **({"conversations": conversations} if self.env is not None
                                             else pick_grammars(self.train_grammars, idx)))
            self.sampler.sleep()  # the sampler frees its memory for the passes below
            if self.env is None:  # single turn: responses to prompts with tools parsed into tool calls
                attach_tool_calls(batch, self.tok, conversations)
        if batch.tool_stats is not None:
            timing["tools"] = timing.get("tools", 0.0) + batch.tool_stats["seconds"]
            self._log_tool_errors(step + 1, batch.tool_stats["error_messages"])
        with marked_timer(reward_key, timing):
            result = self.runner.score(build_trajectories(records, batch))
        return records, batch, result

    def _shaped(self, batch, result) -> list[float | None]:
        """The handler's scores with DAPO's overlong penalty added (verl's DAPORewardManager, overlong_buffer):
        expected = inference_max_tokens - len; penalty = min(0, -(length - expected) / len x penalty_factor). The
        penalty and whether it applied go to the result's metrics (reward_overlong_reward_mean, reward_overlong_mean)."""
        ob = self.cfg.engine.algorithm.overlong_buffer
        if not ob.enable:
            return list(result.scores)
        buf = self.cfg.overlong_buffer_len()
        expected = self.cfg.hyperparameters.inference_max_tokens - buf
        out, pens = [], []
        for s, n in zip(result.scores, batch.response_lengths.tolist()):
            if s is None:
                out.append(None)
                continue
            pen = min(-(n - expected) / buf * ob.penalty_factor, 0.0)
            out.append(s + pen)
            pens.append(pen)
        if ob.log:
            result.metrics.setdefault("overlong_reward", []).extend(pens)
            result.metrics.setdefault("overlong", []).extend(float(p < 0) for p in pens)
            result.metric_types.setdefault("overlong_reward", "Metric")
            result.metric_types.setdefault("overlong", "Metric")
        return out

    def _extra_prompts(self, step: int, round_: int, taken: set[int]) -> list[int]:
        """This process's prompts for generation round `round_` (>= 2) of step `step`: a seeded draw from the whole
        training set, avoiding the step's prompts so far, so the base prompts of every step stay those of a run
        without dynamic sampling (verl takes the next dataloader batch instead)."""
        n, B = len(self.train_records), self.cfg.hyperparameters.batch_size
        g = torch.Generator().manual_seed(self.cfg.run_seed * 1_000_003 + step * 1009 + round_)
        perm = [i for i in torch.randperm(n, generator=g).tolist() if i not in taken] or list(range(n))
        picked = [perm[k % len(perm)] for k in range(B)]
        return picked[self.rank::self.world]

    def _rollout(self, step: int, timing: dict):
        """The step's scored responses: (prompt indices, records, batch, shaped scores, the RewardResult of every
        round, extra metrics)."""
        a, h = self.cfg.engine.algorithm, self.cfg.hyperparameters
        G = h.training_sample_per_prompt
        idx = self._step_prompts(step)
        records, batch, result = self._sample_and_score(step, idx, timing, n=G)
        scores = self._shaped(batch, result)
        fg = a.filter_groups
        if not fg.enable:
            return idx, records, batch, scores, result, {}
        need = len(idx)  # this process's share of batch_size groups
        parts, results, taken = [], [result], set(idx)
        kept: list[tuple[int, int]] = []  # (round, group id in that round's batch)
        rounds, n_groups, n_tied = 1, 0, 0
        while True:
            values = scores if fg.metric == "seq_final_reward" else list(result.scores)
            groups = _signal_groups(batch.group.tolist(), values)
            n_groups += len(records)
            n_tied += len(records) - len(groups)
            parts.append((idx, records, batch, scores))
            kept += [(len(parts) - 1, g) for g in groups]
            enough = self._all_processes(len(kept) >= need)
            if enough or rounds >= fg.max_num_gen_batches:
                break
            rounds += 1
            idx = self._extra_prompts(step, rounds, taken)
            taken.update(idx)
            records, batch, result = self._sample_and_score(step, idx, timing, n=G, gen_key="gen_extra",
                                                            reward_key="reward_extra")
            results.append(result)
            scores = self._shaped(batch, result)
        for k in ("gen", "reward"):  # timing_s_gen / _reward: every round; *_extra: the rounds after the first
            timing[k] += timing.get(f"{k}_extra", 0.0)
        n_keep = min(need, self._min_over_processes(len(kept)))  # the same number of groups on every process
        extra = {"train_num_gen_batches": float(rounds), "dynamic_sampling_cap_hit": float(not enough),
                 "dynamic_sampling_frac_tied_before": self._sum_over_processes(n_tied) / self._sum_over_processes(n_groups),
                 "dynamic_sampling_groups_kept": self._sum_over_processes(n_keep),
                 "dynamic_sampling_extra_responses": self._sum_over_processes(sum(len(p[1]) for p in parts[1:]) * G)}
        if n_keep == 0:  # no group with signal on some process: the first round trains as plain GRPO would
            idx, records, batch, scores = parts[0]
        else:
            chosen = kept[:n_keep]
            batch = type(batch).concat([parts[r][2].select_groups([g]) for r, g in chosen], pad_id=self._pad_id())
            idx = [parts[r][0][g] for r, g in chosen]
            records = [parts[r][1][g] for r, g in chosen]
            scores = [parts[r][3][i] for r, g in chosen for i in (parts[r][2].group == g).nonzero().flatten().tolist()]
        if not enough:
            self.log.event(f"Step {step + 1}: dynamic sampling hit its cap of {fg.max_num_gen_batches} generation "
                           f"rounds with {int(extra['dynamic_sampling_groups_kept'])} of {h.batch_size} groups with "
                           "signal; training on those", level="warning",
                           data={"step": step + 1, "groups_kept": extra["dynamic_sampling_groups_kept"],
                                 "max_num_gen_batches": fg.max_num_gen_batches})
        return idx, records, batch, scores, _merge_results(results), extra

    def _greedy_baselines(self, prompt_idx: list[int], records, batch, timing: dict, extra: dict) -> torch.Tensor:
        """remax: one greedy response per prompt (temperature 0), scored (overlong shaping included), as each row's
        baseline [N]; timed as timing_s_gen_greedy / timing_s_reward_greedy and counted in extra."""
        h = self.cfg.hyperparameters
        with marked_timer("gen_greedy", timing):
            greedy = self.sampler.generate([self.train_prompts[i] for i in prompt_idx], n=1,
                                           max_new_tokens=h.inference_max_tokens, temperature=0.0, top_p=1.0)
            self.sampler.sleep()
        with marked_timer("reward_greedy", timing):
            result = self.runner.score(build_trajectories(records, greedy))
        shaped = self._shaped(greedy, result)
        base = torch.tensor([0.0 if s is None else s for s in shaped], dtype=torch.float32)
        extra.update(remax_baseline_reward_mean=float(self.procs.cat(base).mean()),
                     remax_baseline_reward_calls=self._sum_over_processes(result.n_calls),
                     remax_baseline_failures=self._sum_over_processes(result.n_failed))
        return base[batch.group]

    def _pad_id(self) -> int:
        pad = self.tok.pad_token_id
        return pad if pad is not None else (self.tok.eos_token_id or 0)

    def _all_processes(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.acc.device)
        return float(self.acc.reduce(t, reduction="sum").item()) == 0.0

    def _min_over_processes(self, n: int) -> int:
        if self.world == 1:
            return n
        t = torch.tensor([float(n)], device=self.acc.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def _sum_over_processes(self, n: float) -> float:
        if self.world == 1:
            return float(n)
        return float(self.acc.reduce(torch.tensor([float(n)], device=self.acc.device), reduction="sum").item())


    def _tis_weights(self, batch) -> torch.Tensor | None:
        """Truncated importance weights (grpo.algorithms.tis) when another engine sampled and engine.rollout.tis is on."""
        r = self.cfg.engine.rollout
        if batch.sampler_logprobs is None or r.tis == "off":
            return None
        return tis_weights(batch.old_logprobs, batch.sampler_logprobs, batch.loss_mask, cap=r.tis_cap, level=r.tis)

    def _log_tool_errors(self, step: int, messages: list[str]) -> None:
        """The first failing tool call of the run, in the tool's own words (the counts are in the metrics)."""
        if messages and not self._tool_error_logged:
            self._tool_error_logged = True
            self.log.event(f"Step {step}: a tool call failed (the model read an error; counted in tools_errors_mean): "
                           f"{messages[0]}", level="warning", data={"step": step})

    def _log_samples(self, step: int, records, batch) -> None:
        """A few responses per step in <run>/samples.jsonl: the first thing to read when a curve looks odd."""
        n = min(self.cfg.engine.log_samples, len(batch))
        if not (self.is_main and n):
            return
        rows = [{"step": step, "id": records[int(batch.group[i])].id, "prompt": _last_user_text(records[int(batch.group[i])]),
                 "sample": int(batch.sample[i]),
                 "score": float(batch.scores[i]) if batch.scored[i] else None, "response": batch.contents[i],
                 "reasoning_content": batch.reasoning[i], "truncated": bool(batch.truncated[i]),
                 **({"messages": batch.messages[i]} if batch.messages is not None and batch.messages[i] else {})}
                for i in range(0, len(batch), max(1, len(batch) // n))][:n]
        with RunDir(self.run_dir).samples.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def validate(self) -> float | None:
        """val_score_rewards_mean: one sample per held-out prompt at the eval temperature, graded."""
        if not self.val_records:
            return None
        e, h = self.cfg.engine, self.cfg.hyperparameters
        mine = list(range(self.rank, len(self.val_records), self.world))
        recs = [self.val_records[i] for i in mine]
        res = sample_and_score(self.policy, self.tok, recs, self.runner,
                               temperature=e.eval_temperature or e.temperature, top_p=e.top_p,
                               max_new_tokens=h.inference_max_tokens, prompt_ids=[self.val_prompts[i] for i in mine],
                               sampler=self.sampler, conversations=self._conversations(recs),
                               **pick_grammars(self.val_grammars, mine))
        self.val_extra = {}
        if res.tool_calls is not None:  # the share of validation trajectories that called a tool
            calls = self.procs.cat(torch.tensor([float(c > 0) for c in res.tool_calls]))
            self.val_extra["val_tools_call_ratio"] = float(calls.mean()) if calls.numel() else float("nan")
        graded = self.procs.cat(torch.tensor(res.graded, dtype=torch.float32))
        return float(graded.mean()) if graded.numel() else float("nan")

    def _early_stop(self, val: float) -> bool:
        """Stop when the validation reward has not improved by min_delta for `patience` evaluations."""
        e, s = self.cfg.engine, self.state
        if s["best_val"] is None or val > s["best_val"] + e.early_stopping_min_delta:
            s["best_val"], s["evals_without_improvement"] = val, 0
            return False
        s["evals_without_improvement"] += 1
        return self.cfg.hyperparameters.early_stopping and s["evals_without_improvement"] >= e.early_stopping_patience

    def _checkpoint(self, step: int) -> None:
        path = save_checkpoint(self.run_dir, step, accelerator=self.acc, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, state=self.state)
        self.log.event(f"Checkpoint created at step {step}", type="checkpoint",
                       data={"step": step, "path": str(path)})

    def _pause_requested(self, done: int) -> bool:
        """Whether a pause was asked for (RunDir.pause_request, written by the server's pause): then the `done`
        steps are checkpointed (unless they are already) and the job stops; a resume continues from there."""
        asked = torch.tensor([float(RunDir(self.run_dir).pause_request.exists())], device=self.acc.device)
        if self.world > 1:  # every process stops at the same step
            asked = self.acc.reduce(asked, reduction="sum")
        if not asked.item():
            return False
        from grpo.training.checkpoint import checkpoint_dir

        if done > 0 and not (checkpoint_dir(self.run_dir, done) / "state.json").is_file():
            self._checkpoint(done)
        return True

    # -- the job ---------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            RunDir(self.run_dir).config.write_text(json.dumps(cfg.model_dump(by_alias=True), indent=2))
        if self.acc.trackers == [] and cfg.engine.log_with and cfg.engine.log_with != ["none"]:
            self.acc.init_trackers("tensorboard", config={"learning_rate": cfg.learning_rate})
        if self.start_step == 0:
            for msg in self._data_warnings:
                self.log.event(msg, level="warning")
            self.log.event("Fine-tuning job started", data={"total_steps": self.total_steps})
            base = self.validate()
            if base is not None:
                self.state["baseline_val"] = base
                self.log.event(f"Baseline validation reward {base:.4f}", data={"step": 0, "val_score_rewards_mean": base,
                                                                               **self.val_extra})
                for alarm in self.health.check_baseline(base):
                    self._alarm(alarm)
        if self.start_step:
            self.sampler.sync(self.policy)  # a resumed adapter is not the base the sampler loaded
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="grpo", unit="step",
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)
        last, stopped_early, paused = None, False, False
        step = self.start_step
        for step in range(self.start_step + 1, self.total_steps + 1):
            if self._pause_requested(step - 1):
                step, paused = step - 1, True
                break
            epoch = (step - 1) // self.steps_per_epoch
            # verl's training/global_step (1-based) and training/epoch (0-based) beside our 1-based epoch
            m = {"step": step, "total_steps": self.total_steps, "epoch": epoch + 1, "training_global_step": step,
                 "training_epoch": epoch}
            try:
                m.update(self.step(step - 1))
            except RewardError as err:  # on_failure=fail: the job fails, saying the handler's own words
                bar.close()
                self._fail(step, f"Step {step}: the reward function failed on {err.result.n_failed} "
                                 f"trajectories: {err}")
                raise
            timing: dict[str, float] = {}
            if self.val_records and (step % self.eval_interval == 0 or step == self.total_steps):
                with marked_timer("testing", timing):
                    m["val_score_rewards_mean"] = self.validate()
                m.update(self.val_extra)
                stopped_early = self._early_stop(m["val_score_rewards_mean"]) and step < self.total_steps
            m.update({f"timing_s_{k}": v for k, v in timing.items()})
            self.log.step(m)
            for alarm in self.health.update(m):
                self._alarm(alarm, bar)
            last = m
            post = {"reward": f"{m['critic_rewards_mean']:.3f}", "len": f"{m['response_length_mean']:.0f}"}
            if "tools_call_ratio" in m:
                post["tools"] = f"{m['tools_call_ratio']:.2f}"
            if "val_score_rewards_mean" in m:
                post["val"] = f"{m['val_score_rewards_mean']:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            stop_alarm = self.health.stop_alarm if self.health.should_stop else None
            if step % cfg.engine.checkpoint_interval == 0 or step == self.total_steps or stopped_early or stop_alarm:
                with marked_timer("save_checkpoint", timing):
                    self._checkpoint(step)
                m["timing_s_save_checkpoint"] = timing["save_checkpoint"]
                self.log.amend_step(step, {"timing_s_save_checkpoint": timing["save_checkpoint"]})
            if stopped_early:
                self.log.event(f"Early stopping at step {step}: validation reward has not improved for "
                               f"{cfg.engine.early_stopping_patience} evaluations")
                break
            if stop_alarm:
                self.log.event(f"Stopping at step {step}: alarm {stop_alarm.name} is in engine.health.stop_on",
                               level="warning")
                stopped_early = True
                break
        bar.close()
        summary = self._finish(step, last, stopped_early, paused)
        self.runner.close()
        if self.env is not None:
            self.env.close()
        self.acc.end_training()
        return summary

    def _alarm(self, alarm, bar=None) -> None:
        """A health alarm, once when it starts: on the console (above the bar), in events.jsonl."""
        if self.is_main:
            text = f"warning: [{alarm.name}] step {alarm.step}: {alarm.message}"
            (bar.write(text) if bar is not None else print(text))
        self.log.event(alarm.message, level=alarm.level, data={"alarm": alarm.name, "step": alarm.step, **alarm.data})

    def _fail(self, step: int, message: str) -> None:
        self.log.event(message, type="error", level="error", data={"step": step})
        if self.is_main:
            RunDir(self.run_dir).summary.write_text(json.dumps(
                {"status": "failed", "steps": step - 1, "total_steps": self.total_steps, "error": message}, indent=2))
        self.runner.close()
        if self.env is not None:
            self.env.close()

    def _finish(self, step: int, last: dict | None, stopped_early: bool, paused: bool = False) -> dict:
        from grpo.training.checkpoint import latest_checkpoint as latest

        ckpt = latest(self.run_dir)
        summary = {"status": "paused" if paused else "succeeded", "steps": step, "total_steps": self.total_steps, "stopped_early": stopped_early,
                   "baseline_val_score_rewards_mean": self.state.get("baseline_val"),
                   "best_val_score_rewards_mean": self.state.get("best_val"),
                   "final": {k: v for k, v in (last or {}).items() if not k.startswith(("timing_", "perf_"))},
                   "adapter": str(ckpt / "adapter") if ckpt else None, "model": self.model_path,
                   "health": self.health.summary()}
        if self.is_main:
            RunDir(self.run_dir).summary.write_text(json.dumps(summary, indent=2))
            self.log.event(f"The job was paused after step {step}; it resumes from its checkpoint" if paused
                           else "The job has successfully completed", data={"step": step})
        return summary


def _last_user_text(record) -> str | None:
    """The prompt's last user message (samples.jsonl shows it beside each response)."""
    m = next((m for m in reversed(record.messages) if m.get("role") == "user"), None)
    c = m.get("content") if m else None
    return c if isinstance(c, str) else (json.dumps(c) if c is not None else None)
