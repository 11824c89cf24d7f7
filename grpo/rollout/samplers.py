"""Where a step's responses come from: the rollout backends behind `engine.rollout.backend`.

Every backend has the same three calls, in the order the trainer makes them each step:

    batch = sampler.generate(prompts, n=G, ...)     # grpo.batch.StepBatch: packed, + the sampler's token log-probs
    sampler.sleep()                                 # right after: its memory back for the log-prob and update passes
    sampler.sync(policy)                            # after the optimizer step: the sampler sees the new weights

- "transformers" (default): grpo.rollout.generate on the policy being trained. It samples from exactly the
  trained distribution, so `sampler_logprobs` is None and no importance correction applies.
- "continuous": transformers' continuous batching (`generate_batch`: paged KV cache, requests scheduled as
  they finish, CUDA graphs on GPU) on the same module. Same weights, other kernels (paged attention), so it
  returns its own log-probs and the trainer corrects with TIS (grpo.algorithms.tis). Nothing to sync.
- "vllm": a vLLM engine colocated in sleep mode (grpo.rollout.vllm), synced with the merged LoRA weights
  after each update. Optional extra, not measured here.
"""

from __future__ import annotations

import dataclasses

import torch

from grpo.batch import StepBatch
from grpo.errors import UserError
from grpo.rollout.batch import RolloutBatch
from grpo.rollout.generate import generate
from grpo.rollout.prompts import end_token_ids, pad_token_id, special_tokens


class TransformersSampler:
    """grpo.rollout.generate on the trained policy itself."""

    name = "transformers"

    def __init__(self, policy, tokenizer, *, ignore_eos: bool = False):
        self.policy, self.tok, self.ignore_eos = policy, tokenizer, ignore_eos

    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, grammars: list[str | None] | None = None) -> StepBatch:
        return generate(self.policy, self.tok, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, ignore_eos=self.ignore_eos, grammars=grammars).pack(pad_token_id(self.tok, self.policy))

    def sleep(self) -> None:
        pass

    def sync(self, policy) -> None:
        pass


class ContinuousSampler:
    """transformers' continuous batching (`generate_batch`) on the trained module: LoRA layers included,
    so there is nothing to sync; the paged KV cache is built for each call and freed after it."""

    name = "continuous"

    def __init__(self, policy, tokenizer, *, ignore_eos: bool = False):
        import inspect

        import transformers

        if ignore_eos:
            raise UserError("engine.ignore_eos is not supported by engine.rollout.backend=continuous "
                            "(transformers' continuous batching always stops at an end token); use the "
                            "transformers backend for fixed-length benchmarks")
        self.policy, self.tok = policy, tokenizer
        self.base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        try:
            from transformers.generation import ContinuousBatchingConfig
        except ImportError:
            ContinuousBatchingConfig = None
        fields = ({f.name: f.default for f in dataclasses.fields(ContinuousBatchingConfig)}
                  if dataclasses.is_dataclass(ContinuousBatchingConfig) else {})
        takes_config = "continuous_batching_config" in inspect.signature(getattr(self.base, "generate_batch", len)).parameters
        if not (takes_config and "return_logprobs" in fields):
            raise UserError(f"engine.rollout.backend=continuous needs transformers' continuous batching with "
                            f"log-probs (generate_batch, ContinuousBatchingConfig.return_logprobs); transformers "
                            f"{transformers.__version__} has none: upgrade it or use the transformers backend")
        self.config_cls, self.config_fields = ContinuousBatchingConfig, fields
        self.page = fields["page_size"] if isinstance(fields.get("page_size"), int) else 256
        self.ends = end_token_ids(tokenizer, self.base)
        self.pad = pad_token_id(tokenizer, self.base)
        self.specials = special_tokens(tokenizer)

    def _configs(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float, top_p: float):
        from transformers import GenerationConfig

        gen = GenerationConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=top_p, top_k=0,
                               max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=self.ends,
                               pad_token_id=self.pad)
        # The paged KV cache sized to this call (every response at full length, twice over for layer groups
        # and fragmentation) instead of a share of all free memory: the update that follows needs that memory,
        # and on CPU "free memory" is the host's RAM (a 24 GB cache made a 1 s call take 15 s).
        blocks = 2 * n * sum(-(-(len(p) + max_new_tokens) // self.page) for p in prompts) + 4
        # A seed per call from torch's global generator (seeded per process, saved in checkpoints): a run and its
        # resumption are reproducible, and no two steps reuse one.
        wanted = {"return_logprobs": True, "num_blocks": blocks, "seed": int(torch.randint(2**31 - 1, ()))}
        return gen, self.config_cls(**{k: v for k, v in wanted.items() if k in self.config_fields})

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0) -> StepBatch:
        gen, cb = self._configs(prompts, n, max_new_tokens, temperature, top_p)
        was_training = self.policy.training
        self.policy.eval()
        try:
            results = self.base.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
        finally:
            self.policy.train(was_training)
        return self._read_results(results, prompts, n)

    def sleep(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def sync(self, policy) -> None:
        pass

    def _read_results(self, results: dict, prompts: list[list[int]], n: int) -> StepBatch:
        """generate_batch's {request_id: GenerationOutput} in prompt order, sample order within a group.
        Request ids are `req_<k>` for the k-th prompt and `req_<k>__child#<j>` for its other samples; anything
        missing, failed or without one log-prob per token is an error, not a gap."""
        groups: dict[int, list] = {}
        for rid, out in results.items():
            try:
                k = int(rid.split("__child#")[0].rsplit("_", 1)[1])
            except (IndexError, ValueError):
                raise RuntimeError(f"continuous batching returned an unexpected request id {rid!r}") from None
            if getattr(out, "error", None):
                raise RuntimeError(f"continuous batching failed on request {rid}: {out.error}")
            groups.setdefault(k, []).append((rid, out))
        base = min(groups) if groups else 0  # ids count up from the manager's counter
        if sorted(groups) != list(range(base, base + len(prompts))) or any(len(v) != n for v in groups.values()):
            raise RuntimeError(f"continuous batching returned {sum(map(len, groups.values()))} of "
                               f"{len(prompts) * n} responses ({len(groups)} of {len(prompts)} prompts)")
        batch, logprobs = RolloutBatch(), []
        for g in range(len(prompts)):
            for s, (rid, out) in enumerate(sorted(groups[base + g], key=lambda r: _child_index(r[0], n))):
                if list(out.prompt_ids) != list(prompts[g]):
                    raise RuntimeError(f"continuous batching request {rid} answered another prompt")
                ids = list(out.generated_tokens)
                if len(out.logprobs) != len(ids):
                    raise RuntimeError(f"continuous batching request {rid}: {len(ids)} tokens but "
                                       f"{len(out.logprobs)} log-probs")
                batch.add(self.tok, prompts[g], ids, truncated=not ids or ids[-1] not in self.ends, group=g,
                          sample=s, specials=self.specials)
                logprobs.append([float(x) for x in out.logprobs])
        return batch.pack(self.pad, sampler_logprobs=logprobs)


def _child_index(rid: str, n: int) -> int:
    return int(rid.split("__child#")[1]) if "__child#" in rid else n


def make_sampler(engine, policy, tokenizer, model_path: str, *, seed: int = 0, max_model_len: int = 4096):
    """The sampler `engine.rollout.backend` names, ready for the first step (`seed`: vLLM's own sampler)."""
    backend = engine.rollout.backend
    if backend != "transformers" and engine.rollout.tool_choice != "auto":
        raise UserError(f"engine.rollout.tool_choice={engine.rollout.tool_choice!r} (constrained tool calls) needs "
                        f"engine.rollout.backend=transformers, not {backend}")
    if backend == "transformers":
        return TransformersSampler(policy, tokenizer, ignore_eos=engine.ignore_eos)
    if backend == "continuous":
        return ContinuousSampler(policy, tokenizer, ignore_eos=engine.ignore_eos)
    if backend == "vllm":
        from grpo.rollout.vllm import VLLMRollout

        return VLLMRollout(model_path, tokenizer, max_model_len=max_model_len, ignore_eos=engine.ignore_eos,
                           gpu_memory_utilization=engine.rollout.gpu_memory_utilization,
                           dtype=engine.dtype if engine.dtype != "auto" else "bfloat16", seed=seed)
    raise UserError(f"engine.rollout.backend: unknown backend {backend!r}")
