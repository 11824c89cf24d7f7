"""Are two runs' per-step metrics the same? For refactors that must not change behaviour.

Reads two runs' metrics.jsonl (run directories or the files), pairs the rows by `step`, and compares every
metric the two runs share, bit for bit by default (`--tol` for an absolute tolerance). Wall-clock metrics
(timing_s_*, timing_per_token_ms_*, perf_*, reward_seconds) differ run to run even with the same seed and are
left out; keys only one run has (a metric added or removed) are listed, not compared. When both are run
directories, their samples.jsonl rows (the logged responses and scores) of the paired steps are compared too (the
fields both log; a field only one logs is listed).

    python scripts/compare_metrics.py /work/baseline/qs /tmp/batch/qs [--min-steps 30] [--tol 1e-6]

Exit 0 when at least --min-steps steps are paired and every compared value agrees, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

VOLATILE = ("timing_s_", "timing_per_token_ms_", "perf_", "reward_seconds")


def read_rows(path: Path) -> dict[int, dict]:
    path = path / "metrics.jsonl" if path.is_dir() else path
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return rows


def samples_of(run: Path, steps: set[int]) -> list[dict] | None:
    path = run / "samples.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("step") in steps]


def same(a, b, tol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b if tol == 0 else abs(a - b) <= tol
    return a == b


def compare(base: dict[int, dict], new: dict[int, dict], tol: float) -> dict:
    steps = sorted(set(base) & set(new))
    keys_base = {k for r in base.values() for k in r if not k.startswith(VOLATILE)}
    keys_new = {k for r in new.values() for k in r if not k.startswith(VOLATILE)}
    diffs: dict[str, dict] = {}
    compared = 0
    for s in steps:
        for k in sorted(keys_base & keys_new):
            if k not in base[s] and k not in new[s]:
                continue
            compared += 1
            a, b = base[s].get(k), new[s].get(k)
            if not same(a, b, tol):
                d = diffs.setdefault(k, {"steps": 0, "first_step": s, "max_abs_diff": 0.0})
                d["steps"] += 1
                if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                    d["max_abs_diff"] = max(d["max_abs_diff"], abs(a - b))
                else:
                    d["max_abs_diff"] = math.inf
    return {"steps_paired": len(steps), "values_compared": compared, "differing": diffs,
            "only_in_base": sorted(keys_base - keys_new), "only_in_new": sorted(keys_new - keys_base)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="the reference run (directory or metrics.jsonl)")
    p.add_argument("new", type=Path, help="the run to check")
    p.add_argument("--tol", type=float, default=0.0, help="absolute tolerance (default 0: bit for bit)")
    p.add_argument("--min-steps", type=int, default=30, help="fewest paired steps that make a verdict")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    base, new = read_rows(a.base), read_rows(a.new)
    report = compare(base, new, a.tol)
    steps = set(base) & set(new)
    sa, sb = samples_of(a.base, steps), samples_of(a.new, steps)
    report["samples_equal"], report["sample_fields_only_in_one"] = None, []
    if sa is not None and sb is not None:  # fields both runs log are compared; a field one adds is listed
        shared = {k for r in sa for k in r} & {k for r in sb for k in r}
        report["sample_fields_only_in_one"] = sorted(({k for r in sa for k in r} | {k for r in sb for k in r}) - shared)
        report["samples_equal"] = len(sa) == len(sb) and all(
            {k: v for k, v in x.items() if k in shared} == {k: v for k, v in y.items() if k in shared}
            for x, y in zip(sa, sb))
    ok = report["steps_paired"] >= a.min_steps and not report["differing"] and report["samples_equal"] is not False
    if a.json:
        print(json.dumps({**report, "ok": ok}, indent=2))
        return 0 if ok else 1
    print(f"steps paired: {report['steps_paired']} (need {a.min_steps}); values compared: {report['values_compared']} "
          f"({'bit for bit' if a.tol == 0 else f'tolerance {a.tol:g}'}; {', '.join(VOLATILE)} left out)")
    print(f"only in base: {', '.join(report['only_in_base']) or 'none'}")
    print(f"only in new: {', '.join(report['only_in_new']) or 'none'}")
    if report["samples_equal"] is not None:
        only = report["sample_fields_only_in_one"]
        print(f"samples.jsonl rows of the paired steps: {'identical' if report['samples_equal'] else 'DIFFER'}"
              + (f" (fields only one run logs, not compared: {', '.join(only)})" if only else ""))
    for k, d in sorted(report["differing"].items()):
        print(f"DIFFERS {k}: {d['steps']} step(s), first at step {d['first_step']}, max |diff| {d['max_abs_diff']:.3g}")
    print("SAME" if ok else "TOO FEW STEPS" if report["steps_paired"] < a.min_steps else "NOT THE SAME")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
