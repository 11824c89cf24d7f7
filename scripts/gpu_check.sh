#!/usr/bin/env bash
# The GPU-only measurements, in one run on one lent GPU (an H200: ~141 GB), within 8 minutes of command time.
# Run from anywhere (it works from the repository root):
#
#   bash scripts/gpu_check.sh [OUT_DIR]               # on the GPU: writes OUT_DIR/gpu_check.json (default gpu_check/)
#   bash scripts/gpu_check.sh --rehearse [OUT_DIR]    # the same sequence on the CPU (or GPU_CHECK_REHEARSE=1)
#
# What it measures (each stage under `timeout`, so one slow stage cannot eat the others' time; the limits add up
# to 440 s, 470 s with each SIGKILL grace; the JSON says how long each stage took, its exit status and whether
# its limit killed it):
#   1. the device (nvidia-smi), torch/CUDA/transformers/peft versions;
#   2. GPT-OSS-20B at full width and depth (24 layers, MoE experts with LoRA, eager attention with sinks) and
#      Qwen3-32B at full width (16 of its 64 layers: the same per-layer shapes in a quarter of the time), random
#      bf16 weights built on the GPU (scripts/gpu_smoke.py: no hub, nothing written): bf16 LoRA steps through
#      the engine's own code, peak GPU memory, generation tokens/s for each rollout backend (transformers and
#      continuous) and their ratio, update tokens/s and MFU, and the continuous sampler's bf16 log-prob
#      mismatch against the trainer (rollout_kl_k3, mean TIS weight);
#   3. the dry-run's memory estimate for the same shapes (grpo.training.dry_run.estimate_memory, from the very
#      config the smoke run built: gpu_smoke.smoke_config), next to the measured peak, with their ratio; and the
#      time plan's GPU seconds for a smoke step (grpo.training.time_plan, its stated assumptions) to set beside
#      the measured ones.
# Not measurable on one GPU: FSDP2/ZeRO-3 over several GPUs, NCCL, multi-node (tests/test_fsdp.py and
# tests/test_multinode.py run those code paths on CPU over gloo).
#
# --rehearse runs every stage above, in the same order, under the same limits (unless GPU_CHECK_LIMIT_* raise
# them: a shared CPU can take 30 s to import torch), on the CPU: gpu_smoke.py --rehearse builds the same
# architectures divided in width by 16 (heads, experts, top-k and vocabulary kept), their first 2 layers, with
# 32-token prompts and 8 new tokens instead of 256 and 256 (the same 2 x 4 sequences and 3 steps), and the
# dry-run comparison estimates those shapes. tests/test_scale.py runs it (smaller still, through GPU_CHECK_SMOKE_ARGS) and checks the JSON, and
# once more with every limit at 1 s to check that a stage killed by its limit is reported and the JSON still
# written. docs/scale.md has a rehearsal's per-stage timings and the extrapolation to an H200.
#
# Environment: PYTHON (default python); GPU_CHECK_REHEARSE=1 (as --rehearse); GPU_CHECK_SMOKE_ARGS (more
# gpu_smoke.py arguments for both models, after the script's own: later ones win); GPU_CHECK_LIMIT_<STAGE>
# (seconds, in place of the default; stages DEVICE, VERSIONS, GPT_OSS, QWEN3, COMBINE, FINISH).
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=${GPU_CHECK_REHEARSE:-0}
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
OUT=${1:-gpu_check}
mkdir -p "$OUT"
rm -f "$OUT/stages.tsv" "$OUT/gpu_check.json" "$OUT/gpt_oss.json" "$OUT/qwen3.json"
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
START=$(date +%s%N)
secs() { local ns=$(( $(date +%s%N) - $1 )); printf "%d.%03d" $(( ns / 1000000000 )) $(( ns / 1000000 % 1000 )); }

# stage NAME DEFAULT_LIMIT_S COMMAND...: run it under `timeout` (SIGTERM at the limit, GPU_CHECK_LIMIT_<NAME> or
# the default; SIGKILL 5 s later), its output in OUT/NAME.log, and one line "NAME rc seconds limit default" in
# OUT/stages.tsv (rc 124 or 137: killed by the limit).
limit() { local var="GPU_CHECK_LIMIT_${1^^}"; echo "${!var:-$2}"; }
stage() {
    local name=$1 default=$2
    shift 2
    local t0 rc lim
    lim=$(limit "$name" "$default")
    t0=$(date +%s%N)
    timeout -k 5 "$lim" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(secs "$t0") $lim $default" >> "$OUT/stages.tsv"
    echo "gpu_check: $name rc=$rc ($(tail -n 1 "$OUT/stages.tsv" | cut -d' ' -f3) s, limit $lim s)"
}

if [ "$REHEARSE" = 1 ]; then
    # the first 2 layers of each model (GPT-OSS: one sliding-window and one full-attention layer), 32 + 8 tokens:
    # the full depth at width / 16 ran past 20 minutes on the 2 shared cores (docs/scale.md)
    DEVICE_ARGS=(--rehearse --width-scale 16 --layers 2)
    SIZES=(--prompt-tokens 32 --new-tokens 8)
else
    DEVICE_ARGS=()
    SIZES=(--prompt-tokens 256 --new-tokens 256)
fi
read -r -a EXTRA <<< "${GPU_CHECK_SMOKE_ARGS:-}"
# 2 prompts x 4 samples, 3 steps (the first is warm-up); GPT-OSS-20B all 24 layers, Qwen3-32B 16 of 64
GPT_OSS=(--model gpt_oss --steps 3 --prompts 2 --group 4 "${SIZES[@]}" --backend both "${DEVICE_ARGS[@]}" "${EXTRA[@]}")
QWEN3=(--model qwen3 --layers 16 --steps 3 --prompts 2 --group 4 "${SIZES[@]}" --backend both "${DEVICE_ARGS[@]}"
       "${EXTRA[@]}")

stage device 10 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>/dev/null || echo "no nvidia-smi"'
stage versions 30 "$PY" -c "import torch, transformers, peft; print(torch.__version__, \
torch.version.cuda, transformers.__version__, peft.__version__)"
stage gpt_oss 200 "$PY" scripts/gpu_smoke.py "${GPT_OSS[@]}" --json "$OUT/gpt_oss.json"
stage qwen3 150 "$PY" scripts/gpu_smoke.py "${QWEN3[@]}" --json "$OUT/qwen3.json"

# The dry-run's estimate for the configs the smoke runs built (their own argument lists, parsed by gpu_smoke.py),
# next to what they measured, into OUT/gpu_check.json.
stage combine 40 "$PY" - "$OUT" "$REHEARSE" "${GPT_OSS[*]}" "${QWEN3[*]}" <<'EOF'
import json
import sys
from pathlib import Path

out, rehearse = Path(sys.argv[1]), sys.argv[2] == "1"
result = {"rehearsal": rehearse}
try:
    sys.path.insert(0, "scripts")
    from gpu_smoke import parse_args, smoke_config

    from grpo.config import LoraConfig, load_config
    from grpo.training.dry_run import GIB, estimate_memory, inspect_model, setup_for
    from grpo.training.time_plan import Lengths, predict_gpu, step_work

    for name, argv, config in (("gpt_oss", sys.argv[3], "configs/gsm8k_gpt_oss_20b.yaml"),
                               ("qwen3", sys.argv[4], "configs/gsm8k_qwen3_32b.yaml")):
        args = parse_args(argv.split())
        args.width_scale = args.width_scale or (16 if args.rehearse else 1)
        path = out / f"{name}.json"
        measured = json.loads(path.read_text()) if path.exists() else None
        h = "method.reinforcement.hyperparameters"
        job = load_config(Path(config), [f"{h}.batch_size={args.prompts}", f"{h}.training_sample_per_prompt={args.group}",
                                         f"{h}.max_prompt_length={args.prompt_tokens}",
                                         f"{h}.inference_max_tokens={args.new_tokens}",
                                         f"engine.algorithm.micro_batch_size={args.micro_batch}",
                                         f"engine.dtype={args.dtype}",
                                         f"engine.gradient_checkpointing={not args.no_gradient_checkpointing}"])
        info = inspect_model(smoke_config(name, args.layers, args.width_scale, args.vocab_size),
                             LoraConfig(rank=args.lora_rank, alpha=2 * args.lora_rank))
        setup = setup_for(job, info)
        est = estimate_memory(info, job, setup)
        entry = {"smoke_args": argv, "estimate_gib": {k: v / GIB for k, v in est.items()}, "measured": measured}
        run = ((measured or {}).get("results") or [{}])[0]
        # the time plan's GPU figures for these shapes (its stated assumptions; an H200 unless the device is
        # another known one): a smoke step samples with both backends and runs two log-prob passes (the
        # continuous sampler's check and the reference) and the update
        lengths = Lengths([run.get("prompt_tokens", args.prompt_tokens)], [args.new_tokens], "smoke", "smoke")
        work = step_work(info, job, lengths, setup)
        device = (out / "device.log").read_text().lower() if (out / "device.log").exists() else ""
        gpu = next((g for g in ("h100", "a100", "l40s") if g in device), "h200")
        secs = {k: predict_gpu(ph, info, gpu) for k, ph in work.phases.items()}
        entry["time_plan"] = {"gpu": gpu, "gen_s": secs["gen"], "ref_s": secs["ref"], "update_s": secs["update_actor"],
                              "smoke_step_s": 2 * secs["gen"] + 2 * secs["ref"] + secs["update_actor"]}
        if run.get("peak_gpu_memory_gib"):
            entry["measured_over_estimate"] = run["peak_gpu_memory_gib"] / (est["peak"] / GIB)
        elif run.get("peak_cpu_rss_gib"):  # rehearsal: the RSS grown from building the model on (libraries excluded)
            grown = run["peak_cpu_rss_gib"] - run["cpu_rss_before_build_gib"]
            entry["measured_over_estimate"] = grown / (est["peak"] / GIB)
        result[name] = entry
except Exception as e:  # the measurements above are still worth having
    result["combine_error"] = repr(e)
(out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
EOF

# Last, with nothing but json: the device, versions and every stage's status and time, into the JSON (written
# even when the combine stage failed or was killed), and a summary on stdout.
timeout -k 5 "$(limit finish 10)" "$PY" - "$OUT" "$(secs "$START")" "$(limit finish 10)" 10 <<'EOF'
import json
import sys
from pathlib import Path

out, total, finish_limit, finish_default = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
path = out / "gpu_check.json"
try:
    result = json.loads(path.read_text())
except (OSError, ValueError) as e:
    result = {"combine_error": f"no JSON from the combine stage ({e.__class__.__name__})"}
stages = {}
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, seconds, limit, default = line.split()
    stages[name] = {"rc": int(rc), "seconds": round(float(seconds), 2), "limit_s": int(limit),
                    "default_limit_s": int(default), "killed_by_limit": int(rc) in (124, 137)}
# the last line: the versions stage's log may start with import warnings
text = {n: ((out / f"{n}.log").read_text().strip().splitlines() or [""])[-1] if (out / f"{n}.log").exists() else ""
        for n in ("device", "versions")}
result = {"device": text["device"], "versions": text["versions"], "stages": stages, "total_s": round(total, 2),
          "limits_total_s": sum(s["limit_s"] for s in stages.values()) + finish_limit,
          # what the GPU run gets: the default limits, and 5 s of SIGKILL grace after each (the 8 minutes)
          "default_limits_total_s": sum(s["default_limit_s"] for s in stages.values()) + finish_default,
          "worst_case_s": sum(s["default_limit_s"] + 5 for s in stages.values()) + finish_default + 5, **result}
path.write_text(json.dumps(result, indent=2, default=str))
print(json.dumps({k: v for k, v in result.items() if k not in ("gpt_oss", "qwen3")}, indent=2))
EOF
echo "gpu_check: $(secs "$START") s in all; $OUT/gpu_check.json"
