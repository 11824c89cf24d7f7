"""Progress bars with an ETA on the long commands: `grpo eval` (prompts sampled, then samples graded) and
`grpo reward check` (trajectories graded), on stderr when it is a terminal, none with --no-progress or when
stderr is not a terminal; and generation reports each chunk's prompts (what the eval bar counts)."""

from __future__ import annotations

import contextlib
import io

import pytest
from helpers_engine import GSM8K_HANDLER, build_model_dir, write_data

from grpo.cli import main


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def grpo(*args, tty: bool) -> tuple[int, str, str]:
    out, err = io.StringIO(), (Terminal() if tty else io.StringIO())
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    train, _ = write_data(d / "data", n_train=6, n_val=2)
    return build_model_dir(d / "model"), train


def test_generate_reports_every_prompt_chunk_by_chunk(setup):
    import torch
    from transformers import AutoModelForCausalLM

    from grpo.models.loading import load_tokenizer
    from grpo.rollout.generate import generate

    model_dir, _ = setup
    tok, model = load_tokenizer(str(model_dir)), AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [tok.encode(t) for t in ("1+1=", "2+2=", "3+3=")]
    seen: list[int] = []
    torch.manual_seed(0)
    out = generate(model, tok, prompts, n=2, max_new_tokens=3, temperature=1.0, batch_size=2, progress=seen.append)
    assert seen == [1, 1, 1] and len(out.contents) == 6  # batch 2 // group 2 = one prompt per chunk


def test_eval_bar_on_a_terminal_only(setup):
    model_dir, train = setup
    args = ("eval", "--model", model_dir, "--data", train, "--handler", GSM8K_HANDLER, "--max-tokens", "3",
            "--samples", "2")
    code, out, err = grpo(*args, tty=True)
    assert code == 0 and "reward_mean" in out
    assert "sampling:   0%|" in err and "0/6 [00:00<?, ?prompt/s]" in err  # the ETA field, filled as it goes
    assert "grading:   0%|" in err and "0/12" in err
    for quiet in (grpo(*args, "--no-progress", tty=True), grpo(*args, tty=False)):
        assert quiet[0] == 0 and "sampling" not in quiet[2] and "grading" not in quiet[2]


def test_reward_check_bar_on_a_terminal_only(setup):
    _, train = setup
    args = ("reward", "check", "--handler", GSM8K_HANDLER, "--data", train, "--concurrency", "1")
    code, out, err = grpo(*args, tty=True)
    assert code == 0 and "checks (BEDROCK_RFT.md section 7)" in out
    assert "scoring:   0%|" in err and "0/6 [00:00<?, ?traj/s]" in err
    for quiet in (grpo(*args, "--no-progress", tty=True), grpo(*args, tty=False)):
        assert quiet[0] == 0 and "scoring" not in quiet[2]
