"""The documentation: the site builds with `mkdocs build --strict` (a broken link or anchor, a page missing from
the nav or a nav entry without its page fails it), the job file's key tables are generated from the config models,
the API reference is rendered from docstrings, and the README stays short with CI's exact test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs", reason="the docs tools are in the dev extra: pip install -e '.[dev]'")
pytest.importorskip("material", reason="mkdocs-material is in the dev extra")
pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is in the dev extra")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def test_site_builds_strict_with_every_page(site):
    pages = {p.relative_to(REPO / "docs").with_suffix("").as_posix() for p in (REPO / "docs").rglob("*.md")}
    for page in pages:
        built = site / (page[: -len("index")] + "index.html" if page.rsplit("/", 1)[-1] == "index" else f"{page}/index.html")
        assert built.is_file(), page
    for image in (REPO / "docs").glob("*.png"):
        assert (site / image.name).is_file()


def test_job_file_tables_come_from_the_config_models(site):
    from grpo.algorithm_config import AlgorithmConfig
    from grpo.config import EngineConfig

    html = (site / "job_file" / "index.html").read_text()
    for name in EngineConfig.model_fields:
        assert f"<code>engine.{name}</code>" in html, name
    for name in AlgorithmConfig.model_fields:
        assert f"<code>engine.algorithm.{name}</code>" in html, name
    assert re.search(r"<code>engine.cpu_linear</code></td>\s*<td><code>\"onednn\"</code>", html)


def test_cli_reference_has_every_command(site):
    from grpo.cli import COMMANDS

    html = (site / "cli" / "index.html").read_text()
    for name in COMMANDS:
        assert f"usage: grpo {name}" in html, name
    assert "usage: grpo data convert" in html and "--prompt-column" in html


def test_api_reference_is_rendered_from_docstrings(site):
    html = (site / "reference" / "reward" / "index.html").read_text()
    assert "RewardRunner" in html and "progress(n)" in html  # RewardRunner.score's docstring
    html = (site / "reference" / "algorithms" / "index.html").read_text()
    assert "register_adv_est" in html and "compute_grpo_outcome_advantage" in html


def test_readme_is_short_and_runs_cis_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    assert len(readme) <= 125, len(readme)
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(ci) == 1 and ci[0] in readme  # byte for byte, as its own line
    for link in re.findall(r"\]\((docs/[^)#]+)", "\n".join(readme)):
        assert (REPO / link).is_file(), link
