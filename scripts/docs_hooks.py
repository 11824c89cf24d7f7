"""mkdocs hook (mkdocs.yml `hooks:`): tables of the job file's keys generated from the config models, so the
documented defaults are the code's. A page line `<!-- keys: engine -->` becomes the table of `engine.*` (also
`hyperparameters`, `engine.algorithm`, `engine.lora`, `engine.reward`, `engine.rollout`): key, default, and the
field's description (the reason for the default) from grpo/config.py and grpo/algorithm_config.py. A line
`<!-- cli -->` becomes every command's `--help` (docs/cli.md), from grpo.cli's parsers."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MARKER = re.compile(r"^<!-- keys: ([\w.]+) -->$", re.MULTILINE)
CLI_MARKER = "<!-- cli -->"
NESTED = ("algorithm", "lora", "reward", "rollout", "health")  # engine.* sections with their own table


def _models() -> dict:
    from grpo.algorithm_config import AlgorithmConfig
    from grpo.config import EngineConfig, Hyperparameters, LoraConfig, RewardRunnerConfig, RolloutConfig

    return {"hyperparameters": Hyperparameters, "engine": EngineConfig, "engine.algorithm": AlgorithmConfig,
            "engine.lora": LoraConfig, "engine.reward": RewardRunnerConfig, "engine.rollout": RolloutConfig}


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(see its table)"
        if hasattr(value, "model_dump") or not isinstance(value, (list, dict)):
            return "(see its table)"
        return f"`{json.dumps(value)}`"
    if field.is_required():
        return "required"
    return "`null`" if field.default is None else f"`{json.dumps(field.default)}`"


def table(section: str) -> str:
    model = _models()[section]
    rows = ["| key | default | what, and why this default |", "| --- | --- | --- |"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        if section == "engine" and name in NESTED:
            where = {"health": "[health thresholds](health.md)"}.get(name, f"the `engine.{name}` table below")
            rows.append(f"| `engine.{key}` | (a section) | {field.description}; see {where} |")
            continue
        desc = (field.description or "").replace("|", "\\|")
        prefix = "method.reinforcement.hyperparameters" if section == "hyperparameters" else section
        rows.append(f"| `{prefix}.{key}` | {_default(field)} | {desc} |")
    return "\n".join(rows)


def cli_reference() -> str:
    """Every command's `--help`, from the parsers themselves (subcommands too)."""
    import argparse
    import os

    from grpo.cli import COMMANDS, build_parser

    was = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps at the terminal's width: the page's code block's
    try:
        return _cli_reference(COMMANDS, build_parser, argparse)
    finally:
        os.environ.pop("COLUMNS") if was is None else os.environ.__setitem__("COLUMNS", was)


def _cli_reference(COMMANDS, build_parser, argparse) -> str:
    parts = []
    for name, (_, help_text) in COMMANDS.items():
        parser = build_parser(load=name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        parts.append(f"## `grpo {name}`\n\n{help_text[0].upper() + help_text[1:]}.\n\n```text\n{sub.format_help()}```\n")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for subname, subparser in action.choices.items():
                    parts.append(f"### `grpo {name} {subname}`\n\n```text\n{subparser.format_help()}```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return MARKER.sub(lambda m: table(m.group(1)), markdown)
