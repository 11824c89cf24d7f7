"""One module per top-level `grpo` command.

Each module defines `add_arguments(parser)` and `run(args) -> int` (its one-line help is in `grpo.cli.COMMANDS`).
`grpo.cli` imports a command's module only when that command runs, so `grpo --help` stays fast (no torch import).
"""
