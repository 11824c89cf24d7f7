"""The embedded tiny default model: made on first use, cached afterwards.

There is no model hub here, so the quickstart trains its own starting point: a small
``Qwen3ForCausalLM`` pretrained from scratch (full weights, AdamW, about a minute and a half on two CPU
cores) on the synthetic arithmetic of :mod:`grpo.models.tiny_data`. The corpus always does the arithmetic right
but ends with the ``#### <n>`` line the strict GSM8K grader needs only part of the time, so the base
model's reward sampled at temperature 1.0 (the quickstart's training temperature) starts well below 1
and GRPO has a real, learnable job: follow the requested format while keeping the arithmetic right.

``ensure_tiny_model()`` returns a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load. The cache key hashes the whole recipe, so changing the recipe
rebuilds; the build happens in a temporary directory renamed into place under a file lock, so
concurrent callers neither corrupt the cache nor build twice.

Also here: tiny *random* builders for tests (``build_random_qwen3``, ``build_random_gpt_oss``) and
``sampled_accuracy`` (batched sampling graded with the GSM8K strict rule).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from grpo.models.tiny_data import DATA_VERSION, IM_END, build_tokenizer, pretrain_examples

#: The temperature the tiny model is measured and trained at (the quickstart's rollout temperature).
TRAINING_TEMPERATURE = 1.0

#: Everything that determines the tiny model; its hash names the cache directory.
RECIPE: dict = {
    "data_version": DATA_VERSION,
    "tokenizer_vocab_size": 768,
    "model": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
    },
    "format_fraction": 0.4,  # share of pretraining answers that end with "#### <n>"
    "steps": 1100,
    "batch_size": 64,
    "learning_rate": 5e-3,
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "seed": 0,
    "threads": 2,
}


#: The tool-calling tiny model `grpo:tiny-tools` (grpo.models.tiny_tools; docs/tools.md): the same architecture,
#: pretrained on two-digit products that it answers directly or through a calculator call (`call_fraction`).
TOOLS_RECIPE: dict = {
    **{k: v for k, v in RECIPE.items() if k not in ("data_version", "format_fraction")},
    "kind": "tools",
    "data_version": 1,
    "call_fraction": 0.3,
    "steps": 400,
    "batch_size": 32,
    "threads": 1,  # on two busy cores one thread was 5x faster than two (oversubscription)
}


def recipe_hash(recipe: dict) -> str:
    """A short stable hash of a recipe (the cache subdirectory name)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$GRPO_CACHE`` if set, else ``~/.cache/grpo``."""
    env = os.environ.get("GRPO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "grpo"


# ----------------------------------------------------------------------------------------------
# Model builders


def _qwen3_config(tokenizer, **overrides):
    from transformers import Qwen3Config

    kwargs = dict(RECIPE["model"])
    kwargs.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def build_random_qwen3(tokenizer, **overrides):
    """A tiny randomly initialized ``Qwen3ForCausalLM`` (float32) for ``tokenizer``; builds in ms."""
    import torch
    from transformers import Qwen3ForCausalLM

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    small.update(overrides)
    model = Qwen3ForCausalLM(_qwen3_config(tokenizer, **small)).to(torch.float32)
    _set_generation_ids(model, tokenizer)
    return model.eval()


def build_random_gpt_oss(tokenizer, **overrides):
    """A tiny randomly initialized ``GptOssForCausalLM`` (float32, 4 experts, top-2) for ``tokenizer``."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=32,
        max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        dtype="float32",
    )
    kwargs.update(overrides)
    model = GptOssForCausalLM(GptOssConfig(**kwargs)).to(torch.float32)
    _set_generation_ids(model, tokenizer)
    return model.eval()


def _set_generation_ids(model, tokenizer) -> None:
    gc = model.generation_config
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = None


# ----------------------------------------------------------------------------------------------
# Pretraining


def _encode_examples(tokenizer, examples):
    """Token ids and labels (prompt masked with -100) for (prompt, response) pairs."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p, _ in examples]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r + IM_END for _, r in examples], add_special_tokens=False)["input_ids"]
    return [(p + r, [-100] * len(p) + r) for p, r in zip(p_ids, r_ids)]


def _collate(rows, pad_id):
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def pretrain(recipe: dict, *, progress: bool = True, on_step=None):
    """Build the tokenizer and pretrain the tiny Qwen3 per ``recipe``; returns (model, tokenizer, stats).

    ``on_step(step, model, tokenizer)``, if given, is called after every optimizer step (experiments).
    """
    import torch
    from tqdm.auto import tqdm

    old_threads = torch.get_num_threads()
    torch.set_num_threads(recipe["threads"])
    try:
        torch.manual_seed(recipe["seed"])
        steps, bsz = recipe["steps"], recipe["batch_size"]
        if recipe.get("kind") == "tools":
            from grpo.models import tiny_tools

            tokenizer = tiny_tools.build_tools_tokenizer(recipe["tokenizer_vocab_size"], seed=recipe["seed"])
            rows = [tiny_tools.encode_example(tokenizer, tiny_tools.example_segments(tokenizer, a, b, q, call))
                    for a, b, q, call in tiny_tools.pretrain_problems(steps * bsz, seed=recipe["seed"],
                                                                       call_fraction=recipe["call_fraction"])]
        else:
            tokenizer = build_tokenizer(recipe["tokenizer_vocab_size"], seed=recipe["seed"])
            # No length bucketing: homogeneous batches made the arithmetic fail to emerge (measured).
            rows = _encode_examples(tokenizer, pretrain_examples(
                steps * bsz, seed=recipe["seed"], format_fraction=recipe["format_fraction"]))
        model = build_random_qwen3(tokenizer, **recipe["model"]).train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=recipe["learning_rate"], betas=(0.9, 0.98))
        warm = recipe["warmup_steps"]

        def lr_at(step):  # linear warmup, cosine decay to 10%
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, steps - warm)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        tokens, t0, loss_ema = 0, time.perf_counter(), None
        bar = tqdm(range(steps), desc="pretraining tiny model", disable=not progress, leave=False)
        for step in bar:
            ids, labels, mask = _collate(rows[step * bsz:(step + 1) * bsz], tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tokens += int(mask.sum())
            loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_ema:.3f}")
            if on_step is not None:
                on_step(step, model, tokenizer)
        wall = time.perf_counter() - t0
        stats = {"steps": steps, "tokens": tokens, "wall_s": round(wall, 2),
                 "tokens_per_s": round(tokens / wall, 1), "final_loss_ema": round(loss_ema, 4),
                 "num_parameters": sum(p.numel() for p in model.parameters()),
                 "threads": recipe["threads"]}
        return model.eval(), tokenizer, stats
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------------------------
# Cache


@contextlib.contextmanager
def cache_lock(path: Path):
    """An exclusive advisory lock on ``path`` (no-op where fcntl is missing: rename still wins)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_tiny_model(cache_dir: str | Path | None = None, *, progress: bool = True,
                      recipe_overrides: dict | None = None, base_recipe: dict | None = None) -> Path:
    """The cached tiny model's directory, pretraining it first if it is not there yet.

    ``cache_dir`` defaults to :func:`default_cache_dir`; the model lives in
    ``<cache_dir>/tiny-qwen3-<recipe hash>/`` with ``recipe.json`` and ``pretrain_stats.json``.
    ``recipe_overrides`` (e.g. ``{"steps": 20}`` in tests) change the recipe and hence the directory.
    """
    recipe = {**(RECIPE if base_recipe is None else base_recipe), **(recipe_overrides or {})}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    prefix = "tiny-tools" if recipe.get("kind") == "tools" else "tiny-qwen3"
    final = root / f"{prefix}-{recipe_hash(recipe)}"
    if (final / "recipe.json").exists():
        return final
    with cache_lock(root / f".{final.name}.lock"):
        if (final / "recipe.json").exists():  # another process built it while we waited
            return final
        if progress:
            print(f"Making the tiny {'tool-calling' if prefix == 'tiny-tools' else 'default'} model (first use; "
                  f"cached in {final}) ...", flush=True)
        model, tokenizer, stats = pretrain(recipe, progress=progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "pretrain_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
            # recipe.json last: its presence marks a complete directory.
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
            if final.exists():  # a half-made leftover without recipe.json
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress:
            print(f"Tiny model ready: {stats['wall_s']} s, {stats['tokens_per_s']:.0f} tokens/s.",
                  flush=True)
    return final


# ----------------------------------------------------------------------------------------------
# Measurement

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")


def strict_gsm8k_score(response: str, reference: str) -> float:
    """verl's GSM8K strict rule: the last ``#### <number>`` in the last 300 chars equals the reference's."""
    def last(text):
        found = _STRICT.findall(text[-300:])
        return found[-1].replace(",", "").replace("$", "") if found else None

    got, want = last(response), last(reference)
    return float(got is not None and got == want)


def generate_responses(model, tokenizer, records, *, temperature: float = TRAINING_TEMPERATURE,
                       max_new_tokens: int = 40, batch_size: int = 100, seed: int = 0) -> list[str]:
    """Sample one response per record (left-padded batches; greedy when temperature is 0)."""
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
                 for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 \
            else dict(do_sample=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sampling)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def sampled_accuracy(model, tokenizer, records, *, temperature: float = TRAINING_TEMPERATURE,
                     max_new_tokens: int = 40, batch_size: int = 100, seed: int = 0) -> float:
    """Mean strict GSM8K reward of one sampled response per record."""
    responses = generate_responses(model, tokenizer, records, temperature=temperature,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    refs = [r["reference_answer"] for r in records]
    return sum(strict_gsm8k_score(s, ref) for s, ref in zip(responses, refs)) / len(records)
