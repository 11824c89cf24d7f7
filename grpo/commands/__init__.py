"""One module per top-level `grpo` command.

Each module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. `grpo.cli`
imports a command's module only when that command runs, so `grpo --help` stays fast (no torch import).
"""
