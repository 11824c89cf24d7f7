"""Benchmark the reward runner end to end with the GSM8K handler over the 5,276 example solutions.

Each trajectory is a real event entry (GSM8K question as the user message, a labelled model solution
as the assistant message, the ``#### <n>`` reference of the same question), scored through
``RewardRunner``: JSON encoding, batching, the worker processes' pipes, the handler, the answer checks.
The runner is started once (its start-up is printed separately, since the trainer pays it once per
run), then ``score()`` runs ``--repeats`` times; the figure is the median. It also checks the scores
against the ``is_correct`` labels (flexible mode), so a fast but wrong runner does not pass.

    .venv/bin/python scripts/bench_reward.py [--workers 2] [--batch-size 64] [--repeats 5]
    .venv/bin/python scripts/bench_reward.py --quick   # the first 50 questions (200 trajectories), once: the suite's check

The last line is ``trajectories_per_second: N``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo.gsm8k import gsm8k_to_records, read_gsm8k_file  # noqa: E402
from grpo.reward.runner import RewardRunner, make_trajectory  # noqa: E402

KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def find_shared() -> Path:
    for candidate in (ROOT / "shared", ROOT.parent / "shared"):
        if (candidate / "data" / "gsm8k" / "example_model_solutions.jsonl").is_file():
            return candidate / "data" / "gsm8k"
    raise SystemExit("shared/data/gsm8k/example_model_solutions.jsonl not found next to the repository")


def build(data: Path, limit: int | None = None) -> tuple[list[dict], list[bool]]:
    """The test split as the project's own converter makes it (`grpo data gsm8k`: prompt suffix and
    `#### <n>` reference), one trajectory per labelled solution of each question."""
    solutions = [json.loads(line) for line in (data / "example_model_solutions.jsonl").read_text().splitlines()]
    test = data / "test.jsonl"
    records = gsm8k_to_records(read_gsm8k_file(test), tag="test", source=str(test))
    if len(records) != len(solutions):
        raise SystemExit(f"{test}: {len(records)} questions but {len(solutions)} rows of example solutions")
    trajectories, labels = [], []
    for sol, rec in list(zip(solutions, records))[:limit]:
        for i, key in enumerate(KEYS):
            trajectories.append(make_trajectory(rec["id"], i, rec["messages"], sol[key]["solution"],
                                                rec["reference_answer"]))
            labels.append(bool(sol[key]["is_correct"]))
    return trajectories, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (the machine has 2 cores)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the first 50 questions, one repeat: the correctness "
                        "check on, the timing printed but not a figure (tests/test_bench_quick.py)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    from grpo.bench import LoadWatch

    LoadWatch(args.workers).at_exit()
    trajectories, labels = build(find_shared(), limit=50 if args.quick else None)
    start = time.perf_counter()  # handlers get an explicit environment: the Lambda's configuration goes in env
    with RewardRunner(str(ROOT / "rewards" / "gsm8k.py"), batch_size=args.batch_size, max_concurrency=args.workers,
                      env={"GSM8K_REWARD_MODE": "flexible"}) as runner:  # the labels are checked below
        startup = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            result = runner.score(trajectories)
            times.append(result.seconds)
    agree = sum((s == 1.0) == label for s, label in zip(result.scores, labels))
    median = statistics.median(times)
    print(f"trajectories: {len(trajectories)}  workers: {args.workers}  batch_size: {args.batch_size}  "
          f"calls per score(): {result.n_calls}")
    print(f"runner start-up (workers spawned, handler imported): {startup:.3f} s")
    print(f"score() seconds: {' '.join(f'{t:.3f}' for t in times)} (median {median:.3f})")
    print(f"first score() including start-up: {len(trajectories) / (startup + times[0]):,.0f} trajectories/s")
    print(f"scores agreeing with is_correct: {agree} / {len(labels)}; failures: {result.n_failed}")
    print(f"trajectories_per_second: {len(trajectories) / median:.0f}")
    return 0 if agree == len(labels) and not result.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
