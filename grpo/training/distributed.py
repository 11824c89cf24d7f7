"""How the trainer runs on several processes: the Accelerator, sharded preparation, generation with sharded
weights, and the adapter/optimizer state of a sharded model.

Launch modes (the accelerate config a job is started with, `configs/accelerate/*.yaml`):

- one process, DDP (`--multi_gpu`), FSDP2 (`distributed_type: FSDP`, `fsdp_version: 2`), DeepSpeed ZeRO-3
  (`distributed_type: DEEPSPEED`), on one machine or several (`--num_machines`).
- On GPUs accelerate sets all of this up itself. Without a GPU it does not: `Accelerator(cpu=True)` turns an
  FSDP config into DDP (its state only honours FSDP for GPU-like device types) and a DeepSpeed config into
  nothing, and `Accelerator()` makes each launched process a world of one. `make_accelerator` closes that
  gap so the same launch commands run on CPU over gloo, through accelerate's own FSDP2 and DeepSpeed
  preparation (`fsdp2_prepare_model`, `_prepare_deepspeed`): for FSDP2 it sets the two fields of
  accelerate's shared state that its GPU path sets (`distributed_type = FSDP`, `fsdp_plugin`); for DeepSpeed
  it gives accelerate the gloo backend, and DeepSpeed's CPU accelerator does the rest. What differs from a
  GPU run: the device (`cpu`) and the collective backend (gloo instead of NCCL); `--mixed_precision bf16` runs too
  (FSDP2 with `fsdp2_bf16_policy`; tests/test_bf16_sharded.py).

Sharded weights and generation: with FSDP2 every forward all-gathers each decoder layer and frees it after
(`reshard_after_forward`), so `generate` would gather every layer once per decoded token; ZeRO-3's hooks do
the same. `gathered_for_generation` gathers each layer once for the whole `generate` call and frees them
after it (TRL's `unwrap_model_for_generation` does the same for ZeRO-3): generation then holds the full
weights, which the dry-run counts.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from grpo.errors import UserError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_mode() -> str:
    """The launch mode the accelerate launcher asked for: 'fsdp2', 'fsdp1', 'deepspeed' or 'data-parallel'."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    return "data-parallel"


def die_with_launcher() -> None:
    """Under `accelerate launch` / torchrun each rank runs in a session of its own (torch's elastic agent
    starts them with start_new_session), so SIGKILLing the launcher's process group (a preemption, a job
    scheduler, a user's kill) left the ranks training on, holding their GPUs and writing into the run
    directory. Linux: the kernel SIGKILLs this rank when the agent that started it dies (PR_SET_PDEATHSIG);
    the rank's reward workers follow (they watch their parent)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if parent == 1:  # the agent died before the line above: nothing would send the signal
        os._exit(137)


def make_accelerator(**kwargs):
    """The Accelerator for this process, sharded on CPU too (see the module docstring); checks that accelerate
    sees every launched process."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    die_with_launcher()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = launched > 1 and not torch.cuda.is_available()
    mode = requested_mode()
    if on_cpu and mode == "fsdp1":
        raise UserError("FSDP version 1 is not supported; use fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
    if on_cpu and mode == "deepspeed":
        # cpu=True would switch DeepSpeed off; without a backend accelerate sees no device and a world of one.
        acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
    else:
        acc = Accelerator(cpu=on_cpu, **kwargs)
        if on_cpu and mode == "fsdp2" and acc.distributed_type == DistributedType.MULTI_CPU:
            _fsdp2_on_cpu(acc)
    if acc.num_processes != launched:
        raise UserError(f"{launched} processes were launched but accelerate sees {acc.num_processes} "
                        f"({acc.distributed_type}); check the accelerate config")
    return acc


def _fsdp2_on_cpu(acc) -> None:
    """What AcceleratorState does for FSDP on a GPU (state.py: distributed_type and fsdp_plugin), on the gloo
    process group accelerate has already made (and, as its __init__ ends, in PartialState's shared state,
which every later `AcceleratorState()` copies). Everything after this is accelerate's own FSDP2 code."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment, as on a GPU
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)  # bf16: replaced by fsdp2_bf16_policy in prepare_policy
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ ends


def mode_name(acc) -> str:
    from accelerate.utils import DistributedType

    t = acc.distributed_type
    if t == DistributedType.FSDP:
        return "fsdp2" if acc.is_fsdp2 else "fsdp1"
    if t == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{acc.state.deepspeed_plugin.zero_stage}"
    return "single" if acc.num_processes == 1 else "ddp"


def is_sharded(acc) -> bool:
    return mode_name(acc) in ("fsdp2", "deepspeed-zero3")


def prepare_policy(acc, policy, optimizer, *, micro_batch_seqs: int, max_grad_norm: float):
    """`acc.prepare(policy, optimizer)`, with what sharding needs first: every process starts from rank 0's
    LoRA initialisation (DDP broadcasts it when it wraps the model; `fully_shard` and ZeRO-3 keep each rank's
    own slice of its own random init, and the trainer seeds each rank differently). DeepSpeed is told the
    micro-batch size (accelerate refuses to guess it without a dataloader) and the clip: DeepSpeed clips inside
    its own step (`gradient_clipping`, which accelerate fills with its config's value or 1.0), and
    `accelerator.clip_grad_norm_` only reads the norm back, so engine.algorithm.max_grad_norm is put there.
    DeepSpeed's own gradient accumulation must stay 1: grpo marks the accumulation boundary itself (the last
    micro-batch of a mini-batch, `grpo.training.actor`) and normalises each micro-batch's loss by the
    mini-batch's global token count, so DeepSpeed's extra division of the loss by its accumulation steps would
    shrink every update."""
    from accelerate.utils import DistributedType

    if acc.num_processes > 1:
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad and p.device.type != "meta":
                    torch.distributed.broadcast(p.data, src=0)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            ds["train_micro_batch_size_per_gpu"] = micro_batch_seqs
        ds["gradient_clipping"] = max_grad_norm
        gas = ds.get("gradient_accumulation_steps")
        if gas not in (None, "auto", 1):
            raise UserError(f"the accelerate/DeepSpeed config sets gradient_accumulation_steps: {gas}; set it to 1. grpo "
                            "accumulates micro-batches itself: engine.algorithm.micro_batch_size sequences per "
                            "backward, one optimizer step per mini-batch")
        ds["gradient_accumulation_steps"] = 1
    if acc.distributed_type == DistributedType.FSDP:
        retie_through_adapters(policy)
        if acc.mixed_precision == "bf16":
            acc.state.fsdp_plugin.mixed_precision_policy = fsdp2_bf16_policy()
    model, optimizer = acc.prepare(policy, optimizer)
    if mode_name(acc) == "fsdp2":
        _finish_fsdp2_setup(model)
    return model, optimizer


def fsdp2_bf16_policy():
    """FSDP2 under `--mixed_precision bf16`: parameters all-gathered and computed in bf16, gradients reduced in fp32
    (verl's FSDP policy; accelerate's own reduces in bf16, which adds a bf16 rounding of every gradient sum over
    the processes). The sharded LoRA weights stay fp32 (accelerate upcasts trainable parameters), and so do the
    optimizer's states."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _finish_fsdp2_setup(model) -> None:
    """FSDP2 finishes its setup at the first forward (lazy init), and reads there which parameters train: it casts
    their reduced gradients back to their (fp32) dtype only if it saw them trainable. A first forward with the
    adapter off (the reference pass) saw none, and under bf16 the next backward assigned bf16 gradients to fp32
    parameters (a RuntimeError). Finished here, with the adapter on."""
    state = model._get_fsdp_state() if hasattr(model, "_get_fsdp_state") else None
    if state is not None and hasattr(state, "_lazy_init"):
        state._lazy_init()


def retie_through_adapters(model) -> int:
    """Give `model` a `tie_weights` that re-ties its shared parameters where they really live; returns how many
    names it re-ties.

    accelerate's FSDP2 preparation moves the model to the meta device (which unties shared weights) and calls
    `model.tie_weights()` to tie them again, twice. transformers' `tie_weights` sets `lm_head.weight`; with a LoRA
    adapter on a tied lm_head (the quickstart's engine.lora), `lm_head` is peft's wrapper, whose `weight` is a
    read-only view of `lm_head.base_layer.weight`, and the call died with `KeyError: "attribute 'weight' already
    exists"`. This one records which parameter names share one tensor now (`named_parameters` with
    duplicates: `model.embed_tokens.weight` and `lm_head.base_layer.weight`) and ties each later name to the first
    name's tensor on the module that owns it."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    ties = [names for names in groups.values() if len(names) > 1]

    def tie_weights(*_args, **_kwargs) -> None:
        for first, *others in ties:
            source = model.get_parameter(first)
            for name in others:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, leaf, source)

    model.tie_weights = tie_weights
    return sum(len(names) - 1 for names in ties)


def _fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reshards_after_forward(unit, *, root: bool) -> bool:
    """The unit's effective reshard_after_forward. The root's default is resolved only at FSDP2's lazy init
    (to False: the root keeps its parameters after forward, which the chunked log-probs' lm_head call relies
    on); read before that, it looks True, and setting it True for good made the next backward segfault."""
    state = unit._get_fsdp_state()
    group = state._fsdp_param_group
    if group is None:
        return False
    if root and getattr(state, "_auto_reshard_after_forward", False):
        return False
    return group.post_forward_mesh_info is not None


@contextlib.contextmanager
def gathered_for_generation(acc, model):
    """Within: every sharded layer is gathered once (on first use) and kept, instead of once per forward,
    i.e. once per decoded token; after: sharded again. A no-op for unsharded modes."""
    mode = mode_name(acc)
    if mode == "fsdp2":
        units = _fsdp_units(model)
        before = [_reshards_after_forward(u, root=u is model) for u in units]
        for u in units:
            u.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for u, keep in zip(units, before):
                u.set_reshard_after_forward(keep, recurse=False)
            reshard_all(model)
    elif mode == "deepspeed-zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
    else:
        yield


def reshard_all(model) -> None:
    """Every FSDP2 unit of `model` sharded again, its gathered copies freed and its sharded parameters the ones its
    modules hold (a no-op for other models). `FSDPModule.reshard()` alone skips a unit whose
    `reshard_after_forward` is False while its last forward is still its state (the lm_head unit after a no-grad
    pass, whose post-forward hook does not run): such a unit is resharded with the flag set True for the call."""
    for u in _fsdp_units(model):
        state = u._get_fsdp_state()
        if all(g is None for g in state._fsdp_param_groups):
            continue
        keep = _reshards_after_forward(u, root=u is model)
        if not keep:
            u.set_reshard_after_forward(True, recurse=False)
        try:
            u.reshard()
        finally:
            if not keep:
                u.set_reshard_after_forward(False, recurse=False)


class GatheringSampler:
    """A rollout sampler whose `generate` runs with the sharded weights gathered once per call
    (`gathered_for_generation`); everything else is the wrapped sampler's."""

    def __init__(self, sampler, acc, model):
        self._sampler, self._acc, self._model = sampler, acc, model

    def generate(self, *args, **kwargs):
        with gathered_for_generation(self._acc, self._model):
            return self._sampler.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._sampler, name)


def for_generation(sampler, acc, model):
    """The trainer's sampler: wrapped in `GatheringSampler` when the weights are sharded."""
    return GatheringSampler(sampler, acc, model) if is_sharded(acc) else sampler


# -- the adapter and optimizer state of a sharded model (checkpoints) -----------------------------------------

def _dcp_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_trainable_state(acc, model, optimizer=None) -> tuple[dict | None, dict | None]:
    """Collective (every process calls it). FSDP2: the full (unsharded) LoRA weights and (given `optimizer`)
    the full optimizer state, on the main process, keyed by parameter name; other modes: (None, None), meaning
    the caller reads the plain module and optimizer. ZeRO-3: the adapter weights gathered, no optimizer state
    (each process saves its own partition).

    Careful: torch's get_optimizer_state_dict initialises an optimizer that has no state yet by stepping it
    with zero gradients at lr 0, which counts as an Adam step (bias correction); so ask for the optimizer
    state only once the optimizer has stepped."""
    mode = mode_name(acc)
    if mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = get_model_state_dict(model, options=_dcp_options(ignore_frozen_params=True))
        optim = None
        if optimizer is not None and getattr(optimizer, "state", None):
            optim = get_optimizer_state_dict(model, optimizer, options=_dcp_options(ignore_frozen_params=True))
        # a tied frozen weight (lm_head = embed_tokens) comes along under its second name: drop it
        return {k: v for k, v in weights.items() if k in trained}, optim
    if mode == "deepspeed-zero3":
        import deepspeed

        inner = acc.unwrap_model(model)
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            weights = {n: p.detach().cpu().clone() for n, p in named}
        return weights, None
    return None, None


def peft_key_map(model, adapter: str = "default") -> dict[str, str]:
    """peft's saved key (adapter name removed) -> the parameter's name in `model`, for its trainable params."""
    return {n.replace(f".{adapter}.", "."): n for n, p in model.named_parameters() if p.requires_grad}


def load_full_trainable_state(acc, model, optimizer, adapter_weights: dict, optim_state: dict | None) -> bool:
    """FSDP2: put full adapter weights (peft's saved keys) and a full optimizer state into the sharded model
    and optimizer (each process reads the files itself); returns False for other modes (caller's plain path)."""
    if mode_name(acc) != "fsdp2":
        return False
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    names = peft_key_map(model)
    missing = sorted(set(names) - set(adapter_weights))
    if missing:
        raise UserError(f"the checkpoint's adapter lacks {len(missing)} trained tensor(s), e.g. {missing[0]}")
    weights = {names[k]: v for k, v in adapter_weights.items() if k in names}
    # FSDP2 finishes its setup (lazy init) at the first forward; written before that, the weights ended up where the
    # forward read them for the adapter but not for the reference pass (adapter off): finish it first
    _finish_fsdp2_setup(model)
    set_model_state_dict(model, weights, options=_dcp_options(strict=False))
    if optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=_dcp_options(ignore_frozen_params=True))
    return True
