"""How much of a data set can teach GRPO anything: statistics of sampled groups, before training.

GRPO's advantage of a sample is (score - group mean) / (group std + eps) (verl's GRPO outcome advantage),
so a prompt whose G samples all score the same gives every one of them advantage 0: no gradient at all
(verl logs the share of such groups as `critic/frac_reward_zero_std`; DAPO's dynamic sampling drops them).
Sampling G responses per prompt from the base model at the job's temperature, as `grpo eval --samples G`
does, measures this before any money is spent; `grpo data filter` then keeps the prompts in a pass-rate
range. Pure functions of (trajectory id, score) pairs, no I/O and no model.

Definitions (one prompt's group: its graded samples; a failed grading, score None, is left out as the
trainer leaves it out of the update):
- a sample *passes* when its score >= `pass_score` (1.0: the top of AWS's 0..1 scale);
  pass rate = passing samples / graded samples.
- the group *ties* when all its graded scores are equal (max - min <= TIE_TOL): GRPO's advantages are 0.
  A tie is `solved` when every sample passes, `too_hard` when the tied score is <= 0 (nothing earned),
  `other` otherwise (e.g. a constant partial credit).
- a sample *carries an advantage* when its score differs from its group's mean by more than TIE_TOL. In a
  tied group none does; with 0/1 rewards every sample of an untied group does; with graded rewards a sample
  exactly at the mean does not.
- `frac_samples_with_advantage` = mean over prompts of (samples carrying an advantage / graded samples). A
  training step draws its prompts uniformly from the file and G fresh samples for each, so this is an
  unbiased estimate of the share of each early step's samples that carry an advantage (while the policy is
  still the model that was sampled, at the same temperature and group size).
- `frac_zero_std` = tied prompts / prompts with at least 2 graded samples (verl's critic/frac_reward_zero_std
  at the first step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TIE_TOL = 1e-9


@dataclass(frozen=True)
class GroupStats:
    id: str                  # the record id
    samples: int             # samples drawn (graded + failed)
    graded: int              # samples with a score
    passed: int              # graded samples with score >= pass_score
    pass_rate: float | None  # passed / graded (None: nothing graded)
    mean: float | None       # mean graded score
    tie: str | None          # None (the group has spread, or < 2 graded) | "solved" | "too_hard" | "other"
    with_advantage: int      # graded samples whose score differs from the group mean

    def as_dict(self) -> dict:
        return asdict(self)


def record_id(trajectory_id: str) -> str:
    """The record id of a trajectory id `<record id>#<sample index>` (the text before the last '#')."""
    head, sep, _ = trajectory_id.rpartition("#")
    return head if sep else trajectory_id


def group_by_record(ids: list[str], scores: list[float | None]) -> dict[str, list[float | None]]:
    """record id -> its samples' scores, records in first-seen order, samples in the given order."""
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
    out: dict[str, list[float | None]] = {}
    for tid, s in zip(ids, scores):
        out.setdefault(record_id(tid), []).append(s)
    return out


def group_stats(rid: str, scores: list[float | None], pass_score: float = 1.0) -> GroupStats:
    """The statistics of one prompt's group (see the module docstring)."""
    graded = [float(s) for s in scores if s is not None]
    if not graded:
        return GroupStats(rid, len(scores), 0, 0, None, None, None, 0)
    passed = sum(1 for s in graded if s >= pass_score)
    mean = sum(graded) / len(graded)
    tie = None
    if len(graded) >= 2 and max(graded) - min(graded) <= TIE_TOL:
        tie = "solved" if passed == len(graded) else "too_hard" if graded[0] <= 0 else "other"
    with_adv = 0 if tie else sum(1 for s in graded if abs(s - mean) > TIE_TOL)
    if len(graded) < 2:
        with_adv = 0  # one sample is its own mean
    return GroupStats(rid, len(scores), len(graded), passed, passed / len(graded), mean, tie, with_adv)


def histogram(pass_rates: list[float], group_size: int) -> list[dict]:
    """Counts of prompts per pass rate k/G, k = 0..G (a group with failed samples goes to the nearest k/G)."""
    counts = [0] * (group_size + 1)
    for p in pass_rates:
        counts[min(group_size, max(0, round(p * group_size)))] += 1
    return [{"passed": k, "of": group_size, "pass_rate": k / group_size, "prompts": c} for k, c in enumerate(counts)]


def learnability(ids: list[str], scores: list[float | None], *, group_size: int, pass_score: float = 1.0) -> dict:
    """The learnability report of sampled groups: `ids` are trajectory ids `<record id>#<k>`, `scores` their
    scores (None: grading failed). Shares are over prompts with >= 2 graded samples ("judged" prompts)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    groups = [group_stats(rid, s, pass_score) for rid, s in group_by_record(ids, scores).items()]
    judged = [g for g in groups if g.graded >= 2]
    n = len(judged)

    def share(count: int) -> float | None:
        return count / n if n else None

    ties = {k: sum(1 for g in judged if g.tie == k) for k in ("too_hard", "solved", "other")}
    tied = sum(ties.values())
    return {
        "group_size": group_size, "pass_score": pass_score,
        "prompts": len(groups), "judged_prompts": n,
        "prompts_without_grades": sum(1 for g in groups if g.graded == 0),
        "pass_rate_mean": share(sum(g.pass_rate for g in judged)) if n else None,
        "frac_zero_std": share(tied),
        "frac_too_hard": share(ties["too_hard"]), "frac_solved": share(ties["solved"]),
        "frac_other_ties": share(ties["other"]),
        "frac_samples_with_advantage": share(sum(g.with_advantage / g.graded for g in judged)) if n else None,
        "histogram": histogram([g.pass_rate for g in judged], group_size),
        "per_prompt": [g.as_dict() for g in groups],
    }


def parse_range(text: str) -> tuple[float, float]:
    """'LOW:HIGH' (either side may be empty: 0 and 1) -> (low, high), 0 <= low <= high <= 1; ValueError
    saying what is wrong."""
    lo_text, sep, hi_text = text.partition(":")
    if not sep:
        raise ValueError(f"expected LOW:HIGH, e.g. 0.1:0.9, got {text!r}")
    try:
        lo = float(lo_text) if lo_text.strip() else 0.0
        hi = float(hi_text) if hi_text.strip() else 1.0
    except ValueError:
        raise ValueError(f"expected two numbers LOW:HIGH, e.g. 0.1:0.9, got {text!r}") from None
    if not (0 <= lo <= hi <= 1):
        raise ValueError(f"need 0 <= LOW <= HIGH <= 1, got {text!r}")
    return lo, hi


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report_lines(rep: dict, *, temperature: float | None = None) -> list[str]:
    """The text form of a learnability report (`grpo eval --samples G`)."""
    G, n = rep["group_size"], rep["judged_prompts"]
    head = f"learnability: {G} samples per prompt, a sample passes at score >= {rep['pass_score']:g}"
    if temperature is not None:
        head += f", temperature {temperature:g} (sample at your job's engine.temperature, 1.0 by default)"
    lines = [head, f"  prompts judged               {n} of {rep['prompts']}"
             + (f" ({rep['prompts_without_grades']} with no graded sample)" if rep["prompts_without_grades"] else "")]
    if not n:
        return lines + ["  (no prompt has 2 graded samples: nothing to judge)"]
    lines += [f"  pass rate, mean over prompts {rep['pass_rate_mean']:.3f}",
              f"  groups that tie (no gradient) {_pct(rep['frac_zero_std'])}: {_pct(rep['frac_too_hard'])} all fail "
              f"(too hard), {_pct(rep['frac_solved'])} all pass (solved), {_pct(rep['frac_other_ties'])} other ties",
              f"  samples carrying an advantage {_pct(rep['frac_samples_with_advantage'])} (the expected share of each "
              "early step's samples that teach anything)",
              "  pass rate histogram (prompts):"]
    top = max(b["prompts"] for b in rep["histogram"]) or 1
    width = len(f"{G}/{G}")
    for b in rep["histogram"]:
        bar = "#" * max(1 if b["prompts"] else 0, round(40 * b["prompts"] / top))
        label = f"{b['passed']}/{G}"
        lines.append(f"    {label:>{width}}  {bar:<40} {b['prompts']}")
    if rep["frac_zero_std"] >= 0.5:
        lines.append(f"  advice: {_pct(rep['frac_zero_std'])} of prompts give GRPO no gradient at this group size; keep "
                     "the informative ones with `grpo data filter --scores <this --out> --pass-rate 0.1:0.9`, or raise "
                     "the group size (training_sample_per_prompt)")
    return lines
