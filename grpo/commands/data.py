"""`grpo data validate FILE`, `grpo data gsm8k --input SRC --out FILE` and `grpo data filter` (grpo.commands.data_filter).

validate: prints every problem as FILE:LINE: field: message (capped, then a count line) and exits 2,
or prints a summary of a valid file and exits 0. gsm8k: builds the spec's headline data set.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    v = sub.add_parser("validate", help="check a Bedrock RFT JSONL file against the spec",
                       description="Check every rule of the Bedrock RFT data format; report every "
                                   "problem as FILE:LINE: field: message. Exit 0 if valid, 2 if not.")
    v.add_argument("file", metavar="FILE", help="JSONL file, one prompt record per line")
    v.add_argument("--allow-small", action="store_true",
                   help="fewer than 100 records is a warning, not an error (local prototyping)")
    g = sub.add_parser("gsm8k", help="build Bedrock RFT JSONL from GSM8K",
                       description="Turn GSM8K {question, answer} rows into Bedrock RFT records: "
                                   "the question plus the step-by-step suffix, reference '#### N'.")
    g.add_argument("--input", required=True, metavar="SRC",
                   help="GSM8K JSONL file (e.g. shared/data/gsm8k/train.jsonl), a directory holding "
                        "<split>.jsonl, or a hub id such as openai/gsm8k (needs `datasets`, online)")
    g.add_argument("--out", required=True, metavar="FILE", help="output JSONL (written atomically)")
    g.add_argument("--limit", type=int, metavar="N", help="keep only the first N rows")
    g.add_argument("--split", default="train",
                   help="hub split, or <split>.jsonl in a directory (default: train)")
    g.add_argument("--config", default="main", help="hub dataset config (default: main)")
    from grpo.commands import data_filter

    data_filter.add_parser(sub)
    parser.set_defaults(_data_parser=parser)


def run(args: argparse.Namespace) -> int:
    from grpo.errors import UserError

    if args.data_command == "validate":
        return _validate(args)
    if args.data_command == "filter":
        from grpo.commands import data_filter

        return data_filter.run(args)
    if args.data_command == "gsm8k":
        from grpo.gsm8k import convert_gsm8k

        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit must be at least 1, got {args.limit}")
        n = convert_gsm8k(args.input, args.out, split=args.split, limit=args.limit,
                          config=args.config)
        print(f"wrote {n:,} records to {args.out}")
        if n < 100:
            print("note: fewer than 100 records; validate with --allow-small")
        return 0
    args._data_parser.print_help()
    return 2


def _validate(args: argparse.Namespace) -> int:
    from grpo.data import validate_file

    t0 = time.perf_counter()
    rep = validate_file(args.file, allow_small=args.allow_small, keep_records=False)
    dt = time.perf_counter() - t0
    for w in rep.warnings:
        print(f"warning: {w}")
    if rep.problems:
        print("\n".join(rep.problem_lines()))
        return 2
    s = rep.summary
    print(f"{args.file}: OK, {s['records']:,} records (validated in {dt:.2f} s)")
    print(f"  ids: {s['records'] - s['derived_ids']:,} given, {s['derived_ids']:,} derived as "
          "line-<LINE>")
    print("  roles: " + _counts(s["roles"]))
    shapes = list(s["message_shapes"].items())
    print("  message shapes: " + ", ".join(f"[{k}] x{v:,}" for k, v in shapes[:5])
          + (f", ... {len(shapes) - 5} more" if len(shapes) > 5 else ""))
    print("  reference_answer: " + _counts(s["reference_types"]))
    print("  metadata fields: " + (_counts(s["metadata_fields"]) or "none"))
    print(f"  records with tools: {s['with_tools']:,}")
    pc = s["prompt_chars"]
    print(f"  prompt characters: min {pc['min']:,}, mean {pc['mean']:,}, max {pc['max']:,}")
    return 0


def _counts(counter: dict, shown: int = 10) -> str:
    """The first `shown` entries (names cut at 60 characters), then how many more: a summary line stays short."""
    items = list(counter.items())
    text = ", ".join(f"{k if len(str(k)) <= 60 else str(k)[:57] + '...'} {v:,}" for k, v in items[:shown])
    return text + (f", ... {len(items) - shown:,} more" if len(items) > shown else "")
