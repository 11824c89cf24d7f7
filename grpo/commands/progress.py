"""Progress bars of the long commands (`grpo eval`, `grpo reward check`): tqdm on stderr, with a rate and an ETA.

Not a command: a helper those modules share. A bar is off with --no-progress, and off by itself when stderr
is not a terminal (a log file or a pipe gets no bar lines), as `grpo train`'s; it leaves no line behind.
"""

from __future__ import annotations

import sys


def add_progress_argument(p) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is on stderr, and off anyway when stderr is not a terminal)")


def progress_bar(total: int, desc: str, unit: str, *, off: bool = False):
    """A tqdm bar to stderr: `with progress_bar(n, "sampling", "prompt", off=args.no_progress) as bar:
    ... bar.update(k)`. `disable=None` is tqdm's own rule: shown only on a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=True if off else None, leave=False,
                dynamic_ncols=True)
