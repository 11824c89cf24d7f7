"""OPTIONAL vLLM generation backend, colocated with training. NOT MEASURED HERE: vLLM cannot be installed
on this project's CI machines (no GPU), so only the parts below that do not need vLLM are tested
(`merged_weights`, and the TIS math in grpo.algorithms.tis). The default backend is transformers generation
(grpo.rollout.generate), which samples from exactly the policy being trained.

How the pieces fit (the design TRL's and verl's colocated modes use):
  1. vLLM runs in the training process on the same GPU, in sleep mode: `sleep()` after each rollout frees
     its KV cache and moves its weights to CPU; `wake_up()` brings them back for the next rollout.
  2. After each optimizer step the LoRA adapter is folded into the base weights (`merged_weights`, out of
     place: the training weights are never modified) and loaded into vLLM's model (`sync`).
  3. vLLM returns each sampled token's log-prob under *its* numerics (bf16 kernels, maybe fp8). The trainer
     then computes the old log-probs with the training engine and reweights the policy-gradient loss by
     the truncated importance ratio (grpo.algorithms.tis.tis_weights), logging grpo.algorithms.tis.sampler_mismatch_metrics.

Install: `pip install 'grpo[vllm]'` (vllm>=0.10.2, for `logprobs_mode`) on a CUDA machine. Limits, unmeasured:
the engine loads the checkpoint at `model` itself, so a GPT-OSS MXFP4 checkpoint loads in vLLM's MXFP4 layout,
which the bf16 merged weights do not fit: point `engine.model` at a bf16 copy for this backend.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from grpo.batch import StepBatch
from grpo.errors import UserError
from grpo.rollout.batch import RolloutBatch
from grpo.rollout.prompts import pad_token_id, special_tokens


def merged_weights(policy, adapter: str = "default") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every base-model weight with the LoRA delta added, named as in the base checkpoint
    (`model.layers.0.self_attn.q_proj.weight`, `model.layers.0.mlp.experts.gate_up_proj`): what an inference
    engine's `load_weights` takes. Nothing in `policy` changes (no merge/unmerge round trip, which would
    leave bf16 rounding in the training weights)."""
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                pname = getattr(module, "parameter_name", None) or "weight"  # ParamWrapper targets a parameter
                deltas[_clean(f"{name}.{pname}")] = module.get_delta_weight(adapter)
        for name, param in base.named_parameters():
            if ".lora_" in name:
                continue
            clean = _clean(name)
            delta = deltas.get(clean)
            yield clean, (param.detach() if delta is None else (param.detach() + delta.to(param.dtype)))


def _clean(name: str) -> str:
    return name.replace(".base_layer", "")


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserError("the vLLM rollout backend needs vllm (pip install 'grpo[vllm]', CUDA only); "
                        "the default transformers backend needs nothing") from None
    return vllm


class VLLMRollout:
    """vLLM colocated with the trainer, in sleep mode: the "vllm" backend of grpo.rollout.samplers (same calls as the
    others). Not measured here (see the module docstring)."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, *, max_model_len: int, gpu_memory_utilization: float = 0.3,
                 dtype: str = "bfloat16", seed: int = 0, ignore_eos: bool = False):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights reachable
        vllm = _import_vllm()
        self.vllm, self.tokenizer, self.ignore_eos = vllm, tokenizer, ignore_eos
        # processed_logprobs: log-probs after temperature/top-p, the distribution actually sampled from (the
        # default, raw_logprobs, is the untempered model's and would bias the TIS ratio).
        self.llm = vllm.LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True,
                            enable_prefix_caching=True, logprobs_mode="processed_logprobs")
        self.asleep_tags: set[str] = set()  # what sleep() released and no wake_up has brought back

    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0) -> StepBatch:
        """Like grpo.rollout.generate (the full tempered distribution, top-k off), plus each sampled token's
        log-prob under vLLM (for grpo.algorithms.tis)."""
        self.wake_up()
        params = self.vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=-1,
                                          max_tokens=max_new_tokens, logprobs=0, ignore_eos=self.ignore_eos)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        specials = special_tokens(self.tokenizer)
        batch, sampler_logp = RolloutBatch(), []
        for g, out in enumerate(outs):
            for s, comp in enumerate(out.outputs):
                ids = list(comp.token_ids)
                batch.add(self.tokenizer, prompts[g], ids, truncated=comp.finish_reason == "length", group=g, sample=s,
                          specials=specials)
                sampler_logp.append([lp[t].logprob for t, lp in zip(ids, comp.logprobs)])
        return batch.pack(pad_token_id(self.tokenizer), sampler_logprobs=sampler_logp)

    def sync(self, policy) -> None:
        """Load the policy's merged weights into vLLM (after each optimizer step), as TRL's colocate mode does."""
        self._wake(["weights"])  # weights back first, the KV cache only after the load (at the next generate)
        model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        model.load_weights(merged_weights(policy))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def sleep(self) -> None:
        """Free the GPU for the update: weights to CPU, KV cache dropped."""
        if not self.asleep_tags:
            self.llm.sleep(level=1)
            self.asleep_tags = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        self._wake(sorted(self.asleep_tags))

    def _wake(self, tags: list[str]) -> None:
        """Bring back only what is asleep: vLLM re-maps and restores every tag it is given, awake or not."""
        tags = [t for t in tags if t in self.asleep_tags]
        if tags:
            self.llm.wake_up(tags=tags)
            self.asleep_tags -= set(tags)
