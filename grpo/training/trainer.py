"""The GRPO loop: sample -> score -> normalize -> update, one step readable top to bottom.

`Trainer(cfg, run_dir).train()` runs a job under plain `python` or `accelerate launch` (each process
takes its share of the step's prompts; groups never span processes, so advantages need no
communication). See `Trainer.step` for one step in order.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from grpo.algorithms import core as alg
from grpo.algorithms.tis import sampler_mismatch_metrics, tis_weights
from grpo.batch import pack
from grpo.config import JobConfig
from grpo.errors import UserError
from grpo.reward.runner import RewardError
from grpo.rollout.prompts import encode_prompt
from grpo.rollout.samplers import logprob_tensor, make_sampler
from grpo.rundir import RunDir, read_jsonl
from grpo.training.actor import UpdateSettings, adapter_disabled, compute_logprobs, update_policy
from grpo.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from grpo.training.health import HealthMonitor
from grpo.training.metrics import RunLog, data_metrics, reward_metrics
from grpo.training.validation import build_trajectories, sample_and_score


def _group_scores(scores: torch.Tensor, groups: torch.Tensor) -> list[list[float]]:
    out: dict[int, list[float]] = {}
    for s, g in zip(scores.tolist(), groups.tolist()):
        out.setdefault(g, []).append(s)
    return list(out.values())


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: Path, *, resume: bool = False, progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from grpo.data import load_records
        from grpo.models.loading import load_policy, load_tokenizer, model_options, pick_dtype, resolve_model_path
        from grpo.reward.runner import RewardRunner, resolve_handler

        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        e, h = cfg.engine, cfg.hyperparameters
        trackers = [t for t in e.log_with if t != "none"]
        # Without GPUs, `accelerate launch --multi_gpu --num_processes N` starts N processes that each see a
        # world of one (N independent runs writing one run dir) unless the Accelerator is told to use the
        # CPU: then it is DDP over gloo.
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        self.acc = Accelerator(cpu=launched > 1 and not torch.cuda.is_available(), log_with=trackers or None,
                               project_dir=str(self.run_dir))
        if self.acc.num_processes != launched:
            raise UserError(f"{launched} processes were launched but accelerate sees {self.acc.num_processes} "
                            f"({self.acc.distributed_type}); check the accelerate config")
        self.is_main = self.acc.is_main_process
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if h.batch_size % self.world:
            raise UserError(f"hyperparameters.batch_size={h.batch_size} must be a multiple of the number of processes ({self.world})")
        if cfg.mini_batch_prompts() % self.world:
            raise UserError(f"engine.mini_batch_size={cfg.mini_batch_prompts()} must be a multiple of the number of processes ({self.world})")
        set_seed(cfg.run_seed + self.rank)
        # The run directory is made when the job starts (train), so a start that fails here leaves none behind.
        self.log = RunLog(self.run_dir, self.acc, enabled=self.is_main)
        self._data_warnings: list[str] = []  # events.jsonl gets them once, when the job starts (not on resume)

        # Cheap checks before anything heavy: the handler exists, the data files read and validate.
        resolve_handler(cfg.handler)
        train_records = load_records(cfg.training_file, allow_small=True)
        val_records = load_records(cfg.validation_file, allow_small=True) if cfg.validation_file else None

        # Data: the prompts, encoded once; too-long prompts are filtered out, not truncated (as Bedrock).
        self.model_path = resolve_model_path(cfg.local_model, progress=progress and self.is_main)
        self.tok = load_tokenizer(self.model_path)
        self.train_records, self.train_prompts = self._load(train_records, "training_file")
        self.val_records, self.val_prompts = [], []
        if val_records is not None:
            recs, ids = self._load(val_records, "validation_file")
            cap = e.eval_max_records or len(recs)
            self.val_records, self.val_prompts = recs[:cap], ids[:cap]
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
        self.model, self.optimizer = self.acc.prepare(policy, optimizer)
        self.policy = self.acc.unwrap_model(self.model)
        self.sampler = make_sampler(e, self.policy, self.tok, self.model_path, seed=cfg.run_seed + self.rank,
                                    max_model_len=h.max_prompt_length + h.inference_max_tokens)
        self.runner = RewardRunner(cfg.handler, batch_size=e.reward.batch_size, max_concurrency=e.reward.concurrency,
                                   timeout_s=e.reward.timeout_s, on_failure=e.reward.on_failure,
                                   endpoint_url=e.reward.endpoint_url)
        G = h.training_sample_per_prompt
        self.settings = UpdateSettings(
            temperature=e.temperature, clip_ratio_low=e.clip_ratio_low, clip_ratio_high=e.clip_ratio_high,
            clip_ratio_c=e.clip_ratio_c, loss_agg_mode=e.loss_agg_mode, kl_coef=e.kl_coef, kl_penalty=e.kl_penalty,
            entropy_coef=e.entropy_coef, max_grad_norm=e.max_grad_norm, ppo_epochs=e.ppo_epochs,
            mini_batch_seqs=cfg.mini_batch_prompts() // self.world * G, micro_batch_seqs=e.micro_batch_size,
            loss_scale_factor=float(h.inference_max_tokens))
        self.on_policy = e.ppo_epochs == 1 and cfg.mini_batch_prompts() == h.batch_size
        self.health = HealthMonitor(e.health)
        self.start_step, self.state = 0, {"best_val": None, "evals_without_improvement": 0, "baseline_val": None}
        if resume:
            self._resume()

    # -- setup helpers ---------------------------------------------------------------------
    def _load(self, records, field):
        h = self.cfg.hyperparameters
        ids = [encode_prompt(self.tok, r.messages, reasoning_effort=h.reasoning_effort, tools=r.tools) for r in records]
        keep = [i for i, p in enumerate(ids) if len(p) <= h.max_prompt_length]
        dropped = len(records) - len(keep)
        if dropped and self.is_main:
            msg = f"{field}: filtered out {dropped} of {len(records)} prompts longer than max_prompt_length={h.max_prompt_length} tokens"
            print(f"warning: {msg}")
            self._data_warnings.append(msg)
        if not keep:
            raise UserError(f"{field}: every prompt is longer than max_prompt_length={h.max_prompt_length} tokens")
        return [records[i] for i in keep], [ids[i] for i in keep]

    def _resume(self):
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            if self.is_main:
                print(f"no checkpoint in {self.run_dir}; starting from step 0")
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

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All processes' values of a 1-D tensor (lengths may differ)."""
        if self.world == 1:
            return x
        x = self.acc.pad_across_processes(x.float().to(self.acc.device), pad_index=float("nan"))
        x = self.acc.gather(x).cpu()
        return x[~torch.isnan(x)]

    # -- the step --------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        cfg, e, h = self.cfg, self.cfg.engine, self.cfg.hyperparameters
        timing, t_step = {}, time.perf_counter()
        idx = self._step_prompts(step)
        records = [self.train_records[i] for i in idx]

        # 1. sample a group of responses per prompt (grpo.rollout.samplers: engine.rollout.backend)
        t = time.perf_counter()
        sampled = self.sampler.generate([self.train_prompts[i] for i in idx], n=h.training_sample_per_prompt,
                                        max_new_tokens=h.inference_max_tokens, temperature=e.temperature, top_p=e.top_p)
        rollout = sampled.batch
        self.sampler.sleep()  # its memory back before the reference, old-log-prob and update passes
        timing["gen"] = time.perf_counter() - t

        # 2. score them with the reward function (the Lambda contract)
        t = time.perf_counter()
        result = self.runner.score(build_trajectories(records, rollout))
        timing["reward"] = time.perf_counter() - t
        keep = [i for i, s in enumerate(result.scores) if s is not None]  # on_failure=skip: failures get no weight
        self._log_samples(step + 1, records, rollout, result.scores)

        # 3. group-normalized advantages, broadcast over each response's tokens
        t = time.perf_counter()
        scores = torch.tensor([result.scores[i] for i in keep], dtype=torch.float32)
        groups = torch.tensor([rollout.group[i] for i in keep])
        adv = torch.zeros(len(rollout))
        if keep:
            adv[keep] = alg.group_normalized_advantages(scores, groups, norm_by_std=e.norm_adv_by_std)
        # A failed trajectory stays a row with an empty response mask: no token and no sequence in the loss
        # (grpo.training.actor), while every process keeps the same mini-batch layout (dropping rows would desynchronise
        # DDP's collectives).
        batch = pack(rollout.prompt_ids, rollout.response_ids, self.tok.pad_token_id)
        batch.response_mask[[i for i in range(len(rollout)) if result.scores[i] is None]] = 0.0
        token_adv = alg.broadcast_to_tokens(adv, batch.response_mask)
        timing["adv"] = time.perf_counter() - t

        # 4. log-probs the update needs: the reference (adapter off) for KL, the old policy if off-policy or if
        # another engine sampled (its numerics differ: the trainer's log-probs are the old policy, TIS corrects)
        ref_logp = old_logp = is_weights = None
        other_sampler = sampled.logprobs is not None
        mb = e.micro_batch_size
        if e.kl_coef > 0:
            t = time.perf_counter()
            with adapter_disabled(self.policy):
                ref_logp = compute_logprobs(self.policy, batch, e.temperature, mb)
            timing["ref"] = time.perf_counter() - t
        if not self.on_policy or other_sampler:
            t = time.perf_counter()
            old_logp = compute_logprobs(self.policy, batch, e.temperature, mb)
            timing["old_log_prob"] = time.perf_counter() - t
        mismatch = {}
        if other_sampler:
            sampler_logp = logprob_tensor(sampled.logprobs, rollout.prompt_ids, batch.response_mask.shape[1])
            sel = batch.response_mask.bool()
            old_tok, sampler_tok = self._gather(old_logp[sel]), self._gather(sampler_logp[sel])
            mismatch = sampler_mismatch_metrics(old_tok, sampler_tok, torch.ones_like(old_tok), cap=e.rollout.tis_cap)
            if e.rollout.tis != "off":
                is_weights = tis_weights(old_logp, sampler_logp, batch.response_mask, cap=e.rollout.tis_cap,
                                         level=e.rollout.tis)

        # 5. the clipped policy-gradient update (mini-batches x ppo_epochs), then the learning-rate schedule's
        # step (once per training step, as verl) and the sampler's copy of the new weights
        t = time.perf_counter()
        actor = update_policy(self.model, self.optimizer, batch, token_adv, self.settings,
                              accelerator=self.acc, old_logp=old_logp, ref_logp=ref_logp, is_weights=is_weights)
        self.scheduler.step()
        timing["update_actor"] = time.perf_counter() - t
        if self.sampler.name != "transformers":
            t = time.perf_counter()
            self.sampler.sync(self.policy)
            timing["sync_weights"] = time.perf_counter() - t

        # 6. metrics, with Bedrock's names, over all processes
        resp_len = torch.tensor([len(rollout.response_ids[i]) for i in keep], dtype=torch.float32)
        zero_std = [float(len(set(s)) == 1) for s in _group_scores(scores, groups)]
        m = data_metrics(scores=self._gather(scores), token_advantages=self._gather(token_adv[batch.response_mask.bool()]),
                         frac_zero_std=float(self._gather(torch.tensor(zero_std)).mean()), response_lengths=self._gather(resp_len),
                         prompt_lengths=self._gather(torch.tensor([len(rollout.prompt_ids[i]) for i in keep], dtype=torch.float32)),
                         truncated=self._gather(torch.tensor([float(rollout.truncated[i]) for i in keep])))
        vals = torch.tensor([actor[k] for k in sorted(actor)], device=self.acc.device)
        actor = dict(zip(sorted(actor), self.acc.reduce(vals, reduction="mean").tolist()))
        m.update(actor)
        m.update(mismatch)
        m.update(self._reward_metrics(result))
        timing["step"] = time.perf_counter() - t_step
        m.update({f"timing_s_{k}": v for k, v in timing.items()})
        tokens = float(batch.attention_mask.sum()) * self.world
        m["perf_throughput"] = tokens / timing["step"] / self.world
        m["perf_time_per_step"] = timing["step"]
        m["perf_total_num_tokens"] = tokens
        if torch.cuda.is_available():
            m["perf_max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return m

    def _reward_metrics(self, result) -> dict:
        """reward_score_mean, the handler's reward_<name>_mean, reward_failures and reward_calls over every
        process's trajectories: sums and counts are gathered, so each mean weighs every trajectory once."""
        if self.world == 1:
            return reward_metrics(result.summary())
        from accelerate.utils import gather_object

        ok = [s for s in result.scores if s is not None]
        local = {"score": (sum(ok), len(ok)), **{k: (sum(v), len(v)) for k, v in result.metrics.items() if v},
                 "#failures": (float(result.n_failed), 0), "#calls": (float(result.n_calls), 0)}
        totals: dict[str, list[float]] = {}
        for part in gather_object([local]):
            for k, (total, count) in part.items():
                acc = totals.setdefault(k, [0.0, 0])
                acc[0] += total
                acc[1] += count
        out = {f"reward_{k}_mean": t / c for k, (t, c) in totals.items() if not k.startswith("#") and c}
        out.update(reward_failures=totals["#failures"][0], reward_calls=totals["#calls"][0])
        return out

    def _log_samples(self, step: int, records, rollout, scores) -> None:
        """A few responses per step in <run>/samples.jsonl: the first thing to read when a curve looks odd."""
        n = min(self.cfg.engine.log_samples, len(rollout))
        if not (self.is_main and n):
            return
        rows = [{"step": step, "id": records[rollout.group[i]].id, "sample": rollout.sample[i], "score": scores[i],
                 "response": rollout.contents[i], "reasoning_content": rollout.reasoning[i],
                 "truncated": rollout.truncated[i]} for i in range(0, len(rollout), max(1, len(rollout) // n))][:n]
        with RunDir(self.run_dir).samples.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def validate(self) -> float | None:
        """val_score_rewards_mean: one sample per held-out prompt at the eval temperature, graded."""
        if not self.val_records:
            return None
        e, h = self.cfg.engine, self.cfg.hyperparameters
        mine = list(range(self.rank, len(self.val_records), self.world))
        res = sample_and_score(self.policy, self.tok, [self.val_records[i] for i in mine], self.runner,
                               temperature=e.eval_temperature or e.temperature, top_p=e.top_p,
                               max_new_tokens=h.inference_max_tokens, prompt_ids=[self.val_prompts[i] for i in mine],
                               sampler=self.sampler)
        graded = self._gather(torch.tensor(res.graded, dtype=torch.float32))
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
                self.log.event(f"Baseline validation reward {base:.4f}", data={"step": 0, "val_score_rewards_mean": base})
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
            m = {"step": step, "total_steps": self.total_steps, "epoch": (step - 1) // self.steps_per_epoch + 1}
            try:
                m.update(self.step(step - 1))
            except RewardError as err:  # on_failure=fail: the job fails, saying the handler's own words
                bar.close()
                self._fail(step, f"Step {step}: the reward function failed on {err.result.n_failed} "
                                 f"trajectories: {err}")
                raise
            if self.val_records and (step % self.eval_interval == 0 or step == self.total_steps):
                m["val_score_rewards_mean"] = self.validate()
                stopped_early = self._early_stop(m["val_score_rewards_mean"]) and step < self.total_steps
            self.log.step(m)
            for alarm in self.health.update(m):
                self._alarm(alarm, bar)
            last = m
            post = {"reward": f"{m['critic_rewards_mean']:.3f}", "len": f"{m['response_length_mean']:.0f}"}
            if "val_score_rewards_mean" in m:
                post["val"] = f"{m['val_score_rewards_mean']:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            stop_alarm = self.health.stop_alarm if self.health.should_stop else None
            if step % cfg.engine.checkpoint_interval == 0 or step == self.total_steps or stopped_early or stop_alarm:
                self._checkpoint(step)
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
