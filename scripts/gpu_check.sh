#!/usr/bin/env bash
# The GPU-only measurements, in one run on one lent GPU (an H200: ~141 GB), within ~8 minutes of command time.
# Not run yet: no session of this project has been lent a GPU. Run from the repository root:
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # writes OUT_DIR/gpu_check.json (default: gpu_check/)
#
# What it measures (each part bounded by `timeout`, so one slow part cannot eat the others' time):
#   1. the device (nvidia-smi), torch/CUDA versions;
#   2. GPT-OSS-20B at full width and depth (24 layers, MoE experts with LoRA, eager attention with sinks) and
#      Qwen3-32B at full width (16 of its 64 layers: the same per-layer shapes in a third of the time), random
#      bf16 weights built on the GPU (scripts/gpu_smoke.py: no hub, nothing written): bf16 LoRA steps through
#      the engine's own code, peak GPU memory, generation tokens/s for each rollout backend (transformers and
#      continuous) and their ratio, update tokens/s and MFU, and the continuous sampler's bf16 log-prob
#      mismatch against the trainer (rollout_kl_k3, mean TIS weight);
#   3. the dry-run's memory estimate for the same shapes (grpo.training.dry_run.estimate_memory), next to the
#      measured peak, with their ratio (the estimate is corrected where it is more than 20% off).
# Not measurable on one GPU: FSDP2/ZeRO-3 over several GPUs, NCCL, multi-node (tests/test_fsdp.py and
# tests/test_multinode.py run those code paths on CPU over gloo).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
START=$(date +%s)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } > "$OUT/device.txt" 2>&1
$PY -c "import torch, transformers, peft; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__)" \
    > "$OUT/versions.txt" 2>&1

# GPT-OSS-20B: all 24 layers. 2 prompts x 4 samples, 256 prompt + 256 new tokens, 3 steps (the first is warm-up).
timeout 200 $PY scripts/gpu_smoke.py --model gpt_oss --steps 3 --prompts 2 --group 4 --prompt-tokens 256 \
    --new-tokens 256 --backend both --json "$OUT/gpt_oss.json" > "$OUT/gpt_oss.log" 2>&1
echo "gpt_oss rc=$?" >> "$OUT/rc.txt"

# Qwen3-32B: full width, 16 of 64 layers (memory and time scale per layer; the JSON says how many ran).
timeout 170 $PY scripts/gpu_smoke.py --model qwen3 --layers 16 --steps 3 --prompts 2 --group 4 --prompt-tokens 256 \
    --new-tokens 256 --backend both --json "$OUT/qwen3.json" > "$OUT/qwen3.log" 2>&1
echo "qwen3 rc=$?" >> "$OUT/rc.txt"

# The dry-run's estimate for the same shapes, and one JSON with everything.
timeout 60 $PY - "$OUT" <<'EOF' > "$OUT/combine.log" 2>&1
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
result = {"device": (out / "device.txt").read_text().strip(), "versions": (out / "versions.txt").read_text().strip(),
          "rc": (out / "rc.txt").read_text().split() if (out / "rc.txt").exists() else []}
try:
    from grpo.config import load_config
    from grpo.training.dry_run import GIB, estimate_memory, inspect_model, model_config, setup_for

    shapes = {"gpt_oss": ("configs/gsm8k_gpt_oss_20b.yaml", None), "qwen3": ("configs/gsm8k_qwen3_32b.yaml", 16)}
    for name, (config, layers) in shapes.items():
        measured = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else None
        job = load_config(Path(config), ["method.reinforcement.hyperparameters.batch_size=2",
                                         "method.reinforcement.hyperparameters.training_sample_per_prompt=4",
                                         "method.reinforcement.hyperparameters.max_prompt_length=256",
                                         "method.reinforcement.hyperparameters.inference_max_tokens=256",
                                         "engine.algorithm.micro_batch_size=4"])
        hf_config, _ = model_config(job.local_model)
        if layers:
            hf_config.num_hidden_layers = layers
            if getattr(hf_config, "layer_types", None):
                hf_config.layer_types = hf_config.layer_types[:layers]
        info = inspect_model(hf_config, job.engine.lora)
        est = estimate_memory(info, job, setup_for(job, info))
        entry = {"estimate_gib": {k: v / GIB for k, v in est.items()}, "measured": measured}
        runs = (measured or {}).get("results") or [{}]
        peak = runs[0].get("peak_gpu_memory_gib")
        if peak:
            entry["measured_over_estimate"] = peak / (est["peak"] / GIB)
        result[name] = entry
except Exception as e:  # the measurements above are still worth having
    result["combine_error"] = repr(e)
(out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
print(json.dumps({k: v for k, v in result.items() if k not in ("gpt_oss", "qwen3")}, indent=2))
EOF
echo "combine rc=$?" >> "$OUT/rc.txt"
echo "gpu_check: $(( $(date +%s) - START )) s; $OUT/gpu_check.json"
cat "$OUT/rc.txt"
