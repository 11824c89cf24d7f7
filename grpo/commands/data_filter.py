"""`grpo data filter --scores EVAL_OUT.jsonl --pass-rate LOW:HIGH --out FILE [--data FILE]`: difficulty
filtering before training.

The scores are `grpo eval --samples G --out EVAL_OUT.jsonl`'s rows (one per sample: `id` = `<record id>#<k>`,
`score`, and `data`, the data file that was sampled). A record is kept when the pass rate of its group (the
share of its graded samples scoring >= --pass-score) lies in [LOW, HIGH]; the others are dropped and
counted by reason: below LOW (too hard: GRPO gets no gradient from all-0 groups), above HIGH (already
solved), not scored, or no graded sample (every grading failed). The kept records are written as they
were, in file order (Bedrock RFT JSONL), and the output is validated with Bedrock's rules.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_parser(sub) -> None:
    f = sub.add_parser("filter", help="keep the prompts whose measured pass rate lies in a range",
                       description="Difficulty filtering before training. " + __doc__.split("\n\n")[1])
    f.add_argument("--scores", required=True, type=Path, metavar="EVAL_OUT",
                   help="`grpo eval --samples G --out` JSONL (one row per sample: id, score, data)")
    f.add_argument("--pass-rate", required=True, metavar="LOW:HIGH",
                   help="keep records whose pass rate is in [LOW, HIGH], e.g. 0.1:0.9 (an empty side is 0 or 1)")
    f.add_argument("--out", required=True, type=Path, metavar="FILE", help="output JSONL (written atomically)")
    f.add_argument("--data", type=Path, default=None, metavar="FILE",
                   help="the data file the scores are for (default: the `data` path the eval rows name)")
    f.add_argument("--pass-score", type=float, default=1.0, metavar="X",
                   help="a sample passes when its score >= X (1.0, as grpo eval's default)")
    f.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _finite(x: int | float) -> bool:
    """A score a float can hold (an integer of 400 digits cannot: float() overflows)."""
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def read_scores(path: Path) -> tuple[list[str], list[float | None], set[str]]:
    """(trajectory ids, scores, the `data` paths named) of an eval --out file; UserError listing every problem
    as FILE:LINE: field: message."""
    from grpo.jsonl import capped, json_kind, open_lines, parse_line
    from grpo.errors import UserError

    ids, scores, datas, problems, seen = [], [], set(), [], set()
    for n, raw in enumerate(open_lines(path), 1):
        if not raw.strip():
            continue
        row, err, _ = parse_line(raw, n)
        if err:
            problems.append(f"{path}:{n}: {err[0]}: {err[1]}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{n}: row: expected a JSON object (a `grpo eval --out` row), got {json_kind(row)}")
            continue
        tid, score = row.get("id"), row.get("score")
        if not isinstance(tid, str) or "#" not in tid:
            problems.append(f"{path}:{n}: id: expected a trajectory id '<record id>#<sample>', got {tid!r}")
        elif tid in seen:
            problems.append(f"{path}:{n}: id: {tid!r} appears twice")
        bad_score = score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                           or not _finite(score))
        if bad_score:
            shown = repr(score) if len(repr(score)) <= 40 else repr(score)[:40] + "..."
            problems.append(f"{path}:{n}: score: expected a number or null (grading failed; finite, within a float's range), got {shown}")
        if isinstance(row.get("data"), str):
            datas.add(row["data"])
        if isinstance(tid, str) and not bad_score:
            seen.add(tid)
            ids.append(tid)
            scores.append(None if score is None else float(score))
    if problems:
        raise UserError(f"{path} is not a `grpo eval --out` file:\n" + "\n".join(capped(problems)))
    if not ids:
        raise UserError(f"{path}: no scored samples (run `grpo eval --samples G --out {path}` first)")
    return ids, scores, datas


def _data_path(args, datas: set[str]) -> Path:
    from grpo.errors import UserError

    if args.data is not None:
        return args.data
    if len(datas) == 1:
        return Path(next(iter(datas)))
    if not datas:
        raise UserError(f"{args.scores}: its rows do not say which data file was sampled; give it with --data FILE")
    raise UserError(f"{args.scores}: its rows name {len(datas)} data files ({', '.join(sorted(datas)[:3])}); "
                    "give the one to filter with --data FILE")


def run(args: argparse.Namespace) -> int:
    from grpo.data import MIN_RECORDS, load_records, validate_file, write_jsonl
    from grpo.errors import UserError
    from grpo.training.learnability import group_by_record, group_stats, parse_range

    try:
        lo, hi = parse_range(args.pass_rate)
    except ValueError as exc:
        raise UserError(f"--pass-rate: {exc}") from None
    if not math.isfinite(args.pass_score):
        raise UserError(f"--pass-score {args.pass_score}: expected a finite number")
    ids, scores, datas = read_scores(args.scores)
    data = _data_path(args, datas)
    if args.out.resolve() == data.resolve():
        raise UserError(f"--out {args.out} is the data file itself; write the filtered records to another file")
    records = load_records(data, allow_small=True)
    groups = {rid: group_stats(rid, s, args.pass_score) for rid, s in group_by_record(ids, scores).items()}
    unknown = [rid for rid in groups if rid not in {r.id for r in records}]
    if unknown:
        raise UserError(f"{args.scores}: {len(unknown)} scored record ids are not in {data} (first: "
                        f"{', '.join(map(repr, unknown[:3]))}); give the data file that was sampled with --data")
    kept, why = [], {"below": [], "above": [], "not_scored": [], "no_graded_sample": []}
    for r in records:
        g = groups.get(r.id)
        reason = ("not_scored" if g is None else "no_graded_sample" if g.pass_rate is None
                  else "below" if g.pass_rate < lo else "above" if g.pass_rate > hi else None)
        (why[reason] if reason else kept).append(r if reason is None else r.id)
    if not kept:
        raise UserError(f"no record of {data} has a pass rate in [{lo:g}, {hi:g}]; nothing written "
                        f"({len(why['below'])} below, {len(why['above'])} above)")
    write_jsonl(args.out, kept)
    check = validate_file(args.out, allow_small=True, keep_records=False)
    rep = {"data": str(data), "scores": str(args.scores), "out": str(args.out), "pass_rate": [lo, hi],
           "pass_score": args.pass_score, "group_size": max(g.samples for g in groups.values()),
           "records": len(records), "kept": len(kept),
           "dropped": {k: len(v) for k, v in why.items()},
           "dropped_at_0": sum(1 for rid in why["below"] if groups[rid].pass_rate == 0),
           "dropped_at_1": sum(1 for rid in why["above"] if groups[rid].pass_rate == 1),
           "examples": {k: v[:5] for k, v in why.items() if v},
           "valid": check.ok, "problems": check.problem_lines() if check.problems else [],
           "bedrock_minimum": len(kept) >= MIN_RECORDS}
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0 if check.ok else 2
    d = rep["dropped"]
    print(f"{data}: {len(records)} records, pass rates from {args.scores} ({rep['group_size']} samples each, "
          f"a sample passes at score >= {args.pass_score:g})")
    print(f"kept {len(kept)} with a pass rate in [{lo:g}, {hi:g}] -> {args.out}")
    print(f"dropped {sum(d.values())}: {d['below']} below {lo:g} ({rep['dropped_at_0']} at 0: too hard), "
          f"{d['above']} above {hi:g} ({rep['dropped_at_1']} at 1: solved), {d['not_scored']} not scored, "
          f"{d['no_graded_sample']} with no graded sample")
    for reason, examples in rep["examples"].items():
        print(f"  {reason.replace('_', ' ')}: {', '.join(examples)}{' ...' if d[reason] > len(examples) else ''}")
    if check.problems:
        print("\n".join(check.problem_lines()))
        return 2
    print(f"{args.out}: valid Bedrock RFT data" + ("" if rep["bedrock_minimum"] else
          f" for a local run; {len(kept)} records is under Bedrock's minimum of {MIN_RECORDS}"))
    return 0
