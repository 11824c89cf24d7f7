"""A calculator environment: its functions are the tools of a multi-turn rollout (engine.environment).

Each public function here is a tool; its name, docstring and type hints are what the model is shown
(grpo.reward.tool_functions). They run in worker processes, with a timeout, like reward handlers.
"""


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first term
        b: the second term
    """
    return a + b
