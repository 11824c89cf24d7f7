"""Write the digit-sums data of configs/smollm2.yaml: "What is a + b? Answer with just the number." for the 81
ordered pairs of digits 1-9, in Bedrock's RFT JSONL with a GSM8K-style reference (`#### <sum>`).

Validation holds the 22 ordered pairs of 12 unordered ones (both orders, so no validation question is a
training question with its operands swapped); training the other 59, in a fixed shuffled order. Deterministic (seed 0).

    python scripts/make_digit_sums.py [--out data/digit_sums]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def records() -> tuple[list[dict], list[dict]]:
    rng = random.Random(0)
    unordered = [(a, b) for a in range(1, 10) for b in range(a, 10)]
    rng.shuffle(unordered)
    held = {frozenset(p) for p in unordered[:12]}
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    rng.shuffle(pairs)

    def rec(split, i, a, b):
        return {"id": f"{split}-{i:03d}",
                "messages": [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}],
                "reference_answer": f"#### {a + b}", "operands": [a, b]}

    val = [p for p in pairs if frozenset(p) in held]
    train = [p for p in pairs if frozenset(p) not in held]
    return ([rec("train", i, a, b) for i, (a, b) in enumerate(train)],
            [rec("validation", i, a, b) for i, (a, b) in enumerate(val)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/digit_sums"))
    args = ap.parse_args()
    train, val = records()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", val)):
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{args.out / f'{name}.jsonl'}: {len(rows)} records")


if __name__ == "__main__":
    main()
