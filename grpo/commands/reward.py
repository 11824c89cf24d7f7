"""`grpo reward check`: the reward lab. Run a Lambda-contract handler over a data file and report.

    grpo reward check --handler H --data FILE [--responses FILE | --reference-as-response] [--json]
                      [--batch-size N] [--concurrency N] [--timeout S] [--allow-small]
                      [--env KEY=VALUE ...] [--max-score X] [--no-progress]

Responses to grade:
- ``--reference-as-response`` (the default when ``--responses`` is not given, and the output says so):
  each record's reference is the response (a string reference as it is; an object's ``text``, else its
  ``answer``, else the object as JSON). One trajectory per record.
- ``--responses FILE``: JSONL, one ``{"id": <record id>, "response": "<text>"}`` per line, with an
  optional ``"reasoning_content"``. A record may have several lines; they become samples 0, 1, 2... in
  file order (trajectory id ``<record id>#<n>``). Records without a line are not scored (counted).

A progress bar with an ETA counts the graded trajectories on stderr (a terminal only; --no-progress: none).

Report: score distribution (text histogram), mean of every ``metrics_list`` name, failures with the
first lines of the handler's own error, trajectories per second, and the section 7 checks that need
no model: the handler accepts every reference, and a ground-truth-aligned response (the reference
itself) gets the maximum score (``--max-score``, default 1.0, the top of the AWS samples' 0..1 scale).
With ``--responses`` the checks run as a second pass over the references. ``--json`` prints the
same as one JSON object. Exit status: 0, or 1 when the handler failed on any trajectory (failed
checks are reported as FAIL but do not change it); a user mistake exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

ERROR_LINES = 8  # lines of each failure's message shown in the text report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="reward_command", metavar="SUBCOMMAND")
    c = sub.add_parser("check", help="run a handler over a data file and report scores, metrics, errors",
                       description=__doc__.split("\n\n")[0])
    c.add_argument("--handler", required=True, metavar="H",
                   help="handler file (entry lambda_handler), FILE:FUNCTION, or a Lambda ARN")
    c.add_argument("--data", required=True, metavar="FILE", help="Bedrock RFT JSONL data file")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--responses", metavar="FILE",
                     help='JSONL of {"id": record id, "response": text} (several per record allowed)')
    src.add_argument("--reference-as-response", action="store_true",
                     help="grade each record's reference as its response (the default)")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.add_argument("--batch-size", type=int, default=64, metavar="N", help="trajectories per call (64)")
    c.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="calls at once = worker processes (default min(4, CPUs))")
    c.add_argument("--timeout", type=float, default=300.0, metavar="S", help="seconds per call, at most 900 as on Lambda (300)")
    c.add_argument("--allow-small", action="store_true",
                   help="kept for old scripts: a file under 100 records is only a warning here (checking a handler "
                        "on ten examples is what the lab is for); `grpo data validate` keeps Bedrock's minimum")
    c.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="environment variable for a local handler (its Lambda configuration): KEY=VALUE, or KEY to "
                   "pass this shell's value; repeatable. The handler gets only these, its Lambda variables and a "
                   "base (PATH, HOME, locale, AWS_REGION): a judge calling Bedrock needs its credentials named, "
                   "e.g. --env AWS_PROFILE, or --env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY "
                   "--env AWS_SESSION_TOKEN")
    c.add_argument("--max-score", type=float, default=1.0, metavar="X",
                   help="the score a ground-truth-aligned response must reach (1.0)")
    c.add_argument("--endpoint-url", default=None, help="Lambda endpoint URL (ARN handlers)")
    c.add_argument("--region", default=None, help="AWS region (ARN handlers; default: the ARN's)")
    from grpo.commands.progress import add_progress_argument

    add_progress_argument(c)
    parser.set_defaults(_reward_parser=parser)


def reference_text(reference: str | dict) -> str:
    """The response used by --reference-as-response (see the module docstring)."""
    if isinstance(reference, str):
        return reference
    for key in ("text", "answer"):
        value = reference.get(key)
        if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return str(value)
    return json.dumps(reference, ensure_ascii=False)


def read_responses(path: str, known_ids: set[str]) -> dict[str, list[tuple[str, str | None]]]:
    """record id -> [(response, reasoning_content)] in file order; UserError listing every problem as
    FILE:LINE: field: message. Lines are decoded and parsed as `grpo data validate` does (grpo.data):
    invalid UTF-8 is a problem, a byte order mark on line 1 a warning; blank lines are skipped."""
    from pathlib import Path

    from grpo.errors import UserError
    from grpo.jsonl import capped, json_kind, open_lines, parse_line

    out: dict[str, list[tuple[str, str | None]]] = {}
    problems: list[str] = []
    for n, raw in enumerate(open_lines(Path(path)), 1):
        if not raw.strip():
            continue
        row, err, had_bom = parse_line(raw, n)
        if had_bom and n == 1 and not err:
            print(f"warning: {path}:1: encoding: UTF-8 byte order mark at the start of the file; "
                  "accepted here", file=sys.stderr)
        if err:
            problems.append(f"{path}:{n}: {err[0]}: {err[1]}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{n}: record: expected a JSON object with id and response, got {json_kind(row)}")
            continue
        rid = row.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not rid:
            problems.append(f"{path}:{n}: id: missing or not a string")
        elif rid not in known_ids:
            problems.append(f"{path}:{n}: id: {rid!r} is not a record id of the data file")
        if not isinstance(row.get("response"), str):
            problems.append(f"{path}:{n}: response: missing or not a string")
        reasoning = row.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            problems.append(f"{path}:{n}: reasoning_content: not a string")
        if isinstance(rid, str) and rid in known_ids and isinstance(row.get("response"), str):
            out.setdefault(rid, []).append((row["response"], reasoning))
    if problems:
        raise UserError(f"{path} is not a valid responses file:\n" + "\n".join(capped(problems)))
    return out


def histogram(scores: list[float]) -> list[dict]:
    """One bin per distinct value when there are at most 10, else 10 equal bins from min to max."""
    if not scores:
        return []
    distinct = sorted(set(scores))
    if len(distinct) <= 10:
        counts = Counter(scores)
        return [{"lo": v, "hi": v, "count": counts[v]} for v in distinct]
    lo, hi = distinct[0], distinct[-1]
    width = (hi - lo) / 10
    counts = [0] * 10
    for s in scores:
        counts[min(9, int((s - lo) / width))] += 1
    return [{"lo": lo + i * width, "hi": lo + (i + 1) * width, "count": c} for i, c in enumerate(counts)]


def _failures(result) -> list[dict]:
    return [{"kind": f.kind, "n_trajectories": len(f.trajectory_ids), "trajectory_ids": f.trajectory_ids[:10],
             "message": f.message} for f in result.failures]


def _summary(result, n: int) -> dict:
    ok = [s for s in result.scores if s is not None]
    return {
        "n_trajectories": n, "n_scored": len(ok), "n_failed": result.n_failed,
        "score": {"mean": sum(ok) / len(ok), "min": min(ok), "max": max(ok)} if ok else None,
        "histogram": histogram(ok),
        "metrics": {name: {"type": result.metric_types[name], "mean": sum(v) / len(v), "n": len(v)}
                    for name, v in result.metrics.items() if v},
        "failures": _failures(result), "calls": result.n_calls, "seconds": result.seconds,
        "trajectories_per_second": n / result.seconds if result.seconds > 0 else None,
    }


def _checks(ref_result, ref_ids: list[str], max_score: float) -> list[dict]:
    n = len(ref_ids)
    scores = [s for s in ref_result.scores if s is not None]
    top = sum(1 for s in scores if s >= max_score - 1e-9)
    low = [tid for tid, s in zip(ref_ids, ref_result.scores) if s is not None and s < max_score - 1e-9]
    return [
        {"name": "every reference parses (the handler accepts each reference as a response)",
         "ok": ref_result.n_failed == 0,
         "detail": f"{n - ref_result.n_failed} of {n} accepted"},
        {"name": "a ground-truth-aligned response gets the maximum score",
         "ok": top == n, "detail": f"{top} of {n} reach {max_score:g}"
         + (f"; below: {', '.join(low[:5])}{' ...' if len(low) > 5 else ''}" if low else "")},
    ]


def _score(runner, trajectories, label: str, off: bool = False):
    from grpo.commands.progress import progress_bar

    with progress_bar(len(trajectories), label, "traj", off=off) as bar:
        return runner.score(trajectories, progress=bar.update)


def run(args: argparse.Namespace) -> int:
    from grpo.errors import UserError

    if args.reward_command != "check":
        args._reward_parser.print_help()
        return 0 if args.reward_command is None else 2
    from grpo.data import MIN_RECORDS, load_records
    from grpo.reward.environment import parse_env_options
    from grpo.reward.runner import RewardRunner, make_trajectory

    try:
        env, pass_env = parse_env_options(args.env)
    except ValueError as e:
        raise UserError(str(e)) from None
    records = load_records(args.data, min_records=1)  # the other rules hold; the count is only a warning here
    if len(records) < MIN_RECORDS:
        print(f"warning: {args.data}: {len(records)} record{'s' * (len(records) != 1)}; fine for checking a handler, "
              f"but a Bedrock job needs at least {MIN_RECORDS} (`grpo data validate` applies that rule)", file=sys.stderr)
    note = None
    if args.responses is None and not args.reference_as_response:
        note = ("no --responses given: grading each record's reference as its response "
                "(--reference-as-response)")
    by_id = {r.id: r for r in records}
    ref_trajs = [make_trajectory(r.id, 0, r.messages, reference_text(r.reference_answer), r.reference_answer,
                                 r.metadata) for r in records]
    trajectories, unanswered = ref_trajs, 0
    if args.responses is not None:
        responses = read_responses(args.responses, set(by_id))
        unanswered = sum(1 for r in records if r.id not in responses)
        trajectories = [make_trajectory(rid, i, by_id[rid].messages, text, by_id[rid].reference_answer,
                                        by_id[rid].metadata, reasoning)
                        for rid, rows in responses.items() for i, (text, reasoning) in enumerate(rows)]
    started = time.perf_counter()
    with RewardRunner(args.handler, batch_size=args.batch_size, max_concurrency=args.concurrency,
                      timeout_s=args.timeout, on_failure="skip", endpoint_url=args.endpoint_url,
                      region=args.region, env=env or None, pass_env=pass_env) as runner:
        startup = time.perf_counter() - started
        result = _score(runner, trajectories, "scoring", args.no_progress)
        ref_result = result if args.responses is None else _score(runner, ref_trajs, "checks", args.no_progress)
    report = {
        "handler": args.handler, "data": args.data, "n_records": len(records),
        "responses": args.responses or "reference", "note": note, "records_without_response": unanswered,
        "workers_or_concurrency": runner.max_concurrency, "batch_size": args.batch_size,
        "startup_seconds": startup, **_summary(result, len(trajectories)),
        "checks": _checks(ref_result, [t["id"] for t in ref_trajs], args.max_score),
    }
    failed = result.n_failed > 0 or ref_result.n_failed > 0
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 1 if failed else 0


def print_report(r: dict) -> None:
    """The text form of the report."""
    print(f"reward check: {r['handler']} on {r['data']} ({r['n_records']} records)")
    if r["note"]:
        print(f"note: {r['note']}")
    elif r["responses"] == "reference":
        print("responses: each record's reference (--reference-as-response)")
    else:
        print(f"responses: {r['responses']}" + (f" ({r['records_without_response']} records without a "
                                                 "response, not scored)" if r["records_without_response"] else ""))
    tps = r["trajectories_per_second"]
    print(f"trajectories: {r['n_scored']} scored, {r['n_failed']} failed, of {r['n_trajectories']}; "
          f"{r['seconds']:.3f} s in {r['calls']} calls" + (f" ({tps:,.0f} trajectories/s)" if tps else "")
          + f"; start-up {r['startup_seconds']:.2f} s, concurrency {r['workers_or_concurrency']}, "
          f"batch size {r['batch_size']}")
    if r["score"]:
        s = r["score"]
        print(f"scores: mean {s['mean']:.4f}  min {s['min']:.4g}  max {s['max']:.4g}")
        top = max(b["count"] for b in r["histogram"])
        labels = [f"{b['lo']:.4g}" if b["lo"] == b["hi"] else f"[{b['lo']:.3g}, {b['hi']:.3g})"
                  for b in r["histogram"]]
        width = max(len(label) for label in labels)
        for label, b in zip(labels, r["histogram"]):
            bar = "#" * max(1 if b["count"] else 0, round(40 * b["count"] / top))
            print(f"  {label:>{width}}  {bar:<40} {b['count']}")
    if r["metrics"]:
        print("metrics_list means:")
        width = max(len(n) for n in r["metrics"])
        for name, m in r["metrics"].items():
            print(f"  {name:<{width}}  {m['type']:<6}  {m['mean']:.4f}  (n={m['n']})")
    if r["failures"]:
        print(f"failures: {r['n_failed']} trajectories in {len(r['failures'])} failure(s)")
        for f in r["failures"][:10]:
            ids = ", ".join(f["trajectory_ids"][:3]) + (" ..." if f["n_trajectories"] > 3 else "")
            print(f"  [{f['kind']}] {f['n_trajectories']} trajectories ({ids}):")
            for line in f["message"].splitlines()[:ERROR_LINES]:
                print(f"      {line}")
        if len(r["failures"]) > 10:
            print(f"  ... and {len(r['failures']) - 10} more failures (--json lists them all)")
    else:
        print("failures: none")
    print("checks (BEDROCK_RFT.md section 7):")
    for c in r["checks"]:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}")
