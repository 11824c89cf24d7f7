"""The `grpo` command line: a thin dispatcher over `grpo.commands.*`."""

from __future__ import annotations

import argparse
import importlib
import sys

from grpo import __version__
from grpo.errors import UserError

# command name -> (module under grpo.commands, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data", "validate Bedrock RFT JSONL, convert a dataset or GSM8K to it, or filter it by pass rate"),
    "reward": ("reward", "the reward lab: run a Lambda-contract handler over data and report"),
    "train": ("train", "run a GRPO job from a Bedrock-shaped YAML config"),
    "eval": ("evaluate", "sample and grade a model (base or adapter) on a data file"),
    "plot": ("plot", "draw a run's metrics as the walkthrough's six panels"),
    "quickstart": ("quickstart", "make the tiny model, train it with GRPO on arithmetic, plot the curve"),
    "serve": ("serve", "a local OpenAI-compatible server: files, fine-tuning jobs, chat completions"),
    "submit": ("submit", "upload the files and create the job on Bedrock (or any OpenAI-compatible server)"),
    "status": ("status", "show a fine-tuning job's status and latest metrics"),
    "pause": ("job_action", "pause a queued or running fine-tuning job (a running one checkpoints first)"),
    "resume": ("job_action", "resume a paused fine-tuning job from its last checkpoint"),
    "cancel": ("job_action", "cancel a fine-tuning job (its trainer stops; saved checkpoints stay)"),
    "pull": ("pull", "turn a job's events into a local run directory (metrics.jsonl, checkpoints)"),
    "compare": ("compare", "the parity check: compare two runs' metrics, with a verdict and a picture"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo",
        description="A local GRPO engine that mirrors Amazon Bedrock reinforcement fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"grpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(f"grpo.commands.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the chosen command's module is imported (and so only it pays for torch).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    module = importlib.import_module(f"grpo.commands.{COMMANDS[args.command][0]}")
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `grpo ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
