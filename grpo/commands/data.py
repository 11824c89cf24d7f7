"""`grpo data validate FILE`, `grpo data convert SOURCE --out FILE` (grpo.convert), `grpo data gsm8k --input SRC
--out FILE` and `grpo data filter` (grpo.commands.data_filter).

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
    c = sub.add_parser("convert", help="turn a local dataset (save_to_disk dir, parquet, CSV, JSON/JSONL) into RFT JSONL",
                       description="Turn a dataset you already have into Bedrock RFT JSONL, validated with `grpo data "
                                   "validate`'s rules: each row's --prompt-column becomes the user message (or is the "
                                   "conversation, for a column of chat messages), --answer-column the reference_answer. "
                                   "Reads through the `datasets` package (pip install 'grpo[datasets]'); nothing from "
                                   "the network. Every problem is printed as SOURCE:row N: column: message, and "
                                   "nothing is written unless all rows convert.")
    c.add_argument("source", metavar="SOURCE", help="a save_to_disk directory, or a .parquet, .csv, .json or .jsonl file")
    c.add_argument("--out", required=True, metavar="FILE", help="output JSONL (written atomically)")
    c.add_argument("--prompt-column", default="prompt", metavar="COL",
                   help="the prompt: text, or a list of {role, content} messages (default: prompt)")
    c.add_argument("--answer-column", default="answer", metavar="COL",
                   help="the reference answer: text, a number or an object (default: answer)")
    c.add_argument("--system", default=None, metavar="TEXT", help="a system message put before every prompt")
    c.add_argument("--id-column", default=None, metavar="COL",
                   help="record ids (default: <source file stem>-<row index>, from 0)")
    c.add_argument("--keep", action="append", default=[], metavar="COL",
                   help="carry a column into each record as a metadata field (the handler sees it); repeatable")
    c.add_argument("--split", default=None, help="which split of a saved DatasetDict (default: train, or its only one)")
    c.add_argument("--limit", type=int, metavar="N", help="keep only the first N rows")
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
    if args.data_command == "convert":
        return _convert(args)
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


def _convert(args: argparse.Namespace) -> int:
    from grpo.convert import ColumnMap, convert_dataset
    from grpo.data import MIN_RECORDS
    from grpo.errors import UserError

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    mapping = ColumnMap(prompt_column=args.prompt_column, answer_column=args.answer_column, system=args.system,
                        id_column=args.id_column, keep=args.keep)
    res = convert_dataset(args.source, args.out, mapping, split=args.split, limit=args.limit)
    for w in res.warnings:
        print(f"warning: {w}")
    split = f" (split {res.split})" if res.split else ""
    print(f"wrote {res.records:,} record{'s' * (res.records != 1)} to {args.out} from {args.source}{split}: prompt <- {args.prompt_column}, "
          f"reference_answer <- {args.answer_column}" + (", with a system message" if args.system else ""))
    print(f"  valid Bedrock RFT JSONL (grpo data validate's rules); source columns: {', '.join(res.columns)}")
    if res.records < MIN_RECORDS:
        print(f"note: fewer than {MIN_RECORDS} records: fine for `grpo reward check` and local runs; a Bedrock job "
              f"needs {MIN_RECORDS} (`grpo data validate --allow-small` accepts it locally)")
    return 0


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
