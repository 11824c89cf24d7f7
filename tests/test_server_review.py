"""The server's smaller guarantees, each on real processes: the server never loads torch for jobs-only
use; its path helpers stay torch-free; generation pads with the real pad id."""

from __future__ import annotations

import subprocess
import textwrap

from helpers_engine import PYTHON, REPO, cli_env


def test_server_modules_and_checkpoint_paths_do_not_import_torch(tmp_path):
    """What the server runs for files, jobs and /v1/models (grpo.api.app, and grpo.checkpoint's path
    helpers that jobs.py and worker.py call) leaves torch and numpy unimported, in a fresh interpreter."""
    run = tmp_path / "run"
    for step in (2, 10):
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:06d}" / "state.json").write_text("{}")
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import grpo.api.app
        from grpo.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints
        run = Path({str(run)!r})
        assert [s for s, _ in list_checkpoints(run)] == [2, 10]
        assert latest_checkpoint(run) == checkpoint_dir(run, 10)
        assert latest_checkpoint(run / "missing") is None
        loaded = sorted(m for m in ("torch", "numpy") if m in sys.modules)
        assert not loaded, loaded
        print("ok")
    """)
    res = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_generation_pads_with_the_tokenizers_pad_id_even_when_it_is_zero():
    """The tiny model's tokenizer pads with id 0 (<|endoftext|>); 0 is a real id, not "no pad token"."""
    from grpo.api.inference import Loaded, generation_config
    from grpo.tiny_data import build_tokenizer

    tok = build_tokenizer()
    assert tok.pad_token_id == 0 and tok.eos_token_id != 0
    loaded = Loaded(None, tok, [], [tok.eos_token_id])
    greedy = generation_config(loaded, max_new_tokens=5, temperature=0, top_p=1.0)
    assert greedy.pad_token_id == 0 and greedy.eos_token_id == [tok.eos_token_id] and not greedy.do_sample
    sampled = generation_config(loaded, max_new_tokens=5, temperature=0.7, top_p=0.9)
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p == 0.9 and sampled.pad_token_id == 0
    tok.pad_token = None  # no pad token at all: the first end token stands in
    assert tok.pad_token_id is None
    assert generation_config(loaded, max_new_tokens=5, temperature=0, top_p=1.0).pad_token_id == tok.eos_token_id
