"""Write the single-turn function-calling data of configs/smollm2_tools.yaml: a question that one of three tools
answers (multiply, add, get_weather), the tools in the record's `tools`, and the expected call as
`reference_answer` (`{"tool_calls": [{"name", "arguments"}]}`), graded by rewards/tool_call.py.

Questions are phrased several ways; train and validation share no (tool, arguments) pair. Deterministic (seed 0).

    python scripts/make_function_calls.py [--out data/function_calls]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _fn(name, description, props, required):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required}}}


TOOLS = [
    _fn("multiply", "Multiply two integers.", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
    _fn("add", "Add two integers.", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
    _fn("get_weather", "Get the current weather in a city.",
        {"city": {"type": "string", "description": "the city name"},
         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city", "unit"]),
]
CITIES = ["Paris", "London", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Berlin", "Madrid", "Rome",
          "Seoul", "Dubai", "Nairobi", "Lisbon", "Vienna"]


def _question(rng: random.Random) -> tuple[str, str, dict]:
    kind = rng.choice(("multiply", "add", "get_weather"))
    if kind == "get_weather":
        city, unit = rng.choice(CITIES), rng.choice(("celsius", "fahrenheit"))
        q = rng.choice(("What is the weather in {c} in {u}?", "How warm is it in {c}? Answer in {u}.",
                        "Tell me the temperature in {c} ({u})."))
        return q.format(c=city, u=unit), kind, {"city": city, "unit": unit}
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    q = rng.choice({"multiply": ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute the product of {a} and {b}."),
                    "add": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.")}[kind])
    return q.format(a=a, b=b), kind, {"a": a, "b": b}


def records(n_train: int = 128, n_val: int = 32, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n_train + n_val:
        q, name, args = _question(rng)
        key = (name, json.dumps(args, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        split = "validation" if len(out) < n_val else "train"
        out.append({"id": f"{split}-{len(out):03d}",
                    "messages": [{"role": "user", "content": q}], "tools": TOOLS,
                    "reference_answer": {"tool_calls": [{"name": name, "arguments": args}]}})
    return out[n_val:], out[:n_val]


def main() -> None:
    from grpo.data import write_jsonl

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/function_calls"), help="directory for the two files")
    out = ap.parse_args().out
    for name, rows in zip(("train", "validation"), records()):
        print(f"{out / f'{name}.jsonl'}: {write_jsonl(out / f'{name}.jsonl', rows)} records")


if __name__ == "__main__":
    main()
