"""The server's smaller guarantees, each on real processes: the server never loads torch for jobs-only
use; its path helpers stay torch-free."""

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
