"""A test environment: tools that answer, raise, hang and kill their worker (tests/test_multiturn.py)."""

import os
import time


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def fail(reason: str) -> str:
    """Raise an error."""
    raise RuntimeError(f"the tool failed: {reason}")


def hang(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "woke up"


def crash(code: int = 7) -> str:
    """Kill the worker process."""
    os._exit(code)


def _helper() -> None:
    """Not a tool (private)."""
