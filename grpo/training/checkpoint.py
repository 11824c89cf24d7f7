"""Checkpoints: the LoRA adapter in peft's format, plus everything needed to resume bit for bit.

Layout: `<run>/checkpoints/step-000010/` with `adapter/` (loadable with `PeftModel.from_pretrained`),
`trainer_state.pt` (optimizer and scheduler), `rng_<rank>.pt` (each process's RNG states) and
`state.json` (step, epoch position, early-stopping state); under ZeRO-3 also `optimizer_<rank>.pt` (each
process's optimizer partition). Sharded modes (grpo.training.distributed): FSDP2's adapter weights and optimizer
state are gathered whole (keyed by parameter name), ZeRO-3's adapter is gathered; the adapter is a plain peft
adapter in every mode. A checkpoint is written into a temporary
directory and renamed into place, so a crash mid-write never leaves a half checkpoint that looks whole; a
write that fails (a full disk) removes the temporary directory and is a UserError saying so, the previous
checkpoint intact; `remove_partial` clears a crash's leftover `step-N.tmp` on resume.

The path helpers (checkpoint_dir, list_checkpoints, latest_checkpoint) are all the server uses: torch
and numpy are imported only by the functions that save or restore state, so they never load it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

from grpo.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_partial(run_dir: Path) -> list[Path]:
    """Remove the `step-N.tmp` directories a crash mid-write left (never a complete checkpoint)."""
    root = Path(run_dir) / "checkpoints"
    gone = [p for p in root.glob("step-*.tmp") if p.is_dir()] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _no_space(exc: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC/EDQUOT, or torch's own wording for a short write
    ("file write failed", "unexpected pos") on a device with almost nothing left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
        return True
    try:
        return shutil.disk_usage(where).free < 16 * 2**20
    except OSError:
        return False


def save_checkpoint(run_dir: Path, step: int, *, accelerator, model, optimizer, scheduler, state: dict) -> Path:
    """Collective: every process calls it (each saves its RNG); the main process writes the rest. A failed
    write (disk full) leaves no `.tmp` behind and raises a UserError; the previous checkpoint stays whole."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        return _save(final, tmp, step, accelerator=accelerator, model=model, optimizer=optimizer,
                     scheduler=scheduler, state=state)
    except Exception as exc:  # torch says "unexpected pos", safetensors "IoError": all end here
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        keep = (f"the previous checkpoint {previous.name} is intact (--resume continues from it)" if previous
                else "no earlier checkpoint exists")
        if _no_space(exc, Path(run_dir)):
            free = shutil.disk_usage(run_dir).free
            raise UserError(f"checkpoint at step {step} could not be written to {final.parent}: no space left on the "
                            f"device ({free / 2**20:.1f} MiB free); {keep}. Free some space and resume") from None
        if isinstance(exc, OSError):
            raise UserError(f"checkpoint at step {step} could not be written to {final.parent}: "
                            f"{exc.strerror or exc}; {keep}") from None
        raise


def _save(final: Path, tmp: Path, step: int, *, accelerator, model, optimizer, scheduler, state: dict) -> Path:
    import torch

    from grpo.training.distributed import full_trainable_state, mode_name

    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    mode = mode_name(accelerator)
    weights, optim = full_trainable_state(accelerator, model, optimizer)  # collective; (None, None) unsharded
    if mode.startswith("deepspeed"):
        torch.save(optimizer.state_dict(), tmp / f"optimizer_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        peft_model = accelerator.unwrap_model(model)
        peft_model.save_pretrained(tmp / "adapter", **({"state_dict": weights} if weights is not None else {}))
        if optim is None and not mode.startswith("deepspeed"):
            optim = optimizer.state_dict()
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "mode": mode}, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(ckpt: Path, *, accelerator, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and this process's RNG; returns state.json."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from grpo.training.distributed import load_full_trainable_state, mode_name

    saved = len(list(ckpt.glob("rng_*.pt")))
    if saved != accelerator.num_processes:
        raise UserError(f"{ckpt}: written by {saved} process(es) but resumed with {accelerator.num_processes}; "
                        f"resume with the same number of processes (each process's RNG state is restored)")
    trainer_state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    mode, was = mode_name(accelerator), trainer_state.get("mode", "ddp")
    layout = {"single": "plain", "ddp": "plain"}  # one process and DDP store the same optimizer state
    if layout.get(mode, mode) != layout.get(was, was):
        raise UserError(f"{ckpt}: written under {was} but resumed under {mode}; resume with the same accelerate "
                        f"config (the optimizer state is stored in that mode's layout)")
    weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    if mode.startswith("deepspeed"):
        # DeepSpeed's ZeRO optimizer loads from the list of every process's partition (it picks its own). Under
        # ZeRO-3 that partition also holds the fp32 master copy of this process's slice of the adapter, which
        # DeepSpeed copies into the partitioned parameters: the adapter file (their gathered copy, what a
        # partitioned parameter cannot take through load_state_dict) is not read back.
        parts = [torch.load(ckpt / f"optimizer_{r}.pt", map_location="cpu", weights_only=False)
                 for r in range(accelerator.num_processes)]
        if mode != "deepspeed-zero3":
            set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
        optimizer.load_state_dict(parts)
    elif not load_full_trainable_state(accelerator, model, optimizer, weights, trainer_state["optimizer"]):
        set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
        optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = ckpt / f"rng_{accelerator.process_index}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
