"""`grpo plot RUN [--out PNG]`."""

from pathlib import Path


def add_arguments(p):
    p.add_argument("run", type=Path, help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default RUN/metrics.png)")


def run(args) -> int:
    from grpo.remote.plot import plot_run

    print(plot_run(args.run, args.out))
    return 0
