"""Write the data of configs/tools.yaml: two-digit products ("What is 47 * 86?", reference `#### 4042`) in
Bedrock's RFT JSONL, from grpo.models.tiny_tools (train and validation never share a problem with each other or
with grpo:tiny-tools' pretraining corpus). Deterministic (seed 0).

    python scripts/make_tool_data.py [--out data/tools] [--n-train 640] [--n-val 100]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grpo.models.tiny_tools import write_tools_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/tools", help="directory for train.jsonl and validation.jsonl")
    p.add_argument("--n-train", type=int, default=640, help="training records")
    p.add_argument("--n-val", type=int, default=100, help="validation records")
    a = p.parse_args()
    out = Path(a.out)
    train, val = write_tools_data(out / "train.jsonl", out / "validation.jsonl", n_train=a.n_train, n_val=a.n_val)
    print(f"wrote {train} ({a.n_train} records) and {val} ({a.n_val})")


if __name__ == "__main__":
    main()
