#!/bin/sh
# The learning runs of docs/algorithms.md's table, one at a time (the machine is small): each preset on the
# quickstart for 30 steps (validation at 0/10/20/30 on 100 held-out prompts, seed 0), then DAPO's dynamic sampling
# against plain GRPO, seeds 0 and 1. A run that finished (summary.json) is not redone. Then:
#   python scripts/algorithm_table.py runs/learn --out docs/algorithms.png
# The quickstart's data first: grpo quickstart writes data/arith/; this uses its first 480 training records.
set -u
cd "$(dirname "$0")/.."
GRPO=${GRPO:-.venv/bin/grpo}
OUT=${OUT:-runs/learn}
mkdir -p "$OUT" runs/data
[ -f runs/data/train480.jsonl ] || {
  .venv/bin/python -c "from grpo.models.tiny_data import write_quickstart_data as w; w('runs/data/train.jsonl', 'runs/data/validation.jsonl')"
  head -480 runs/data/train.jsonl > runs/data/train480.jsonl
}
# the quickstart's job without its explicit kl_coef, so that each preset's own KL setting applies
grep -v "kl_coef" configs/quickstart.yaml > runs/preset_base.yaml
learn() {  # NAME SEED --set ...
  name=$1; seed=$2; shift 2
  [ -f "$OUT/$name/summary.json" ] && return
  rm -rf "${OUT:?}/$name"
  echo "$(date -u +%H:%M:%S) start $name load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/learn.log"
  "$GRPO" train runs/preset_base.yaml --no-progress --output-dir "$OUT/$name" \
    --set training_file=runs/data/train480.jsonl --set validation_file=runs/data/validation.jsonl \
    --set method.reinforcement.hyperparameters.eval_interval=10 \
    --set method.reinforcement.hyperparameters.early_stopping=false \
    --set engine.eval_max_records=100 --set engine.seed="$seed" --set "engine.log_with=[none]" "$@" > "$OUT/$name.log" 2>&1
  echo "$(date -u +%H:%M:%S) end $name rc $? load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/learn.log"
}
learn grpo 0 --set engine.algorithm.preset=grpo
learn ds_seed0 0 --set engine.algorithm.filter_groups.enable=true
learn dapo 0 --set engine.algorithm.preset=dapo
learn grpo_seed1 1 --set engine.algorithm.preset=grpo
learn ds_seed1 1 --set engine.algorithm.filter_groups.enable=true
for p in dr_grpo gspo cispo rloo reinforce_pp gpg; do
  learn $p 0 --set engine.algorithm.preset=$p
done
