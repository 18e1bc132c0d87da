#!/usr/bin/env bash
# Recall accuracy of a fact memory against training steps: every snapshot of the concat-recall-chunks runs
# (checkpoints/train_recall.sh chunks / chunks-fast) scored on 30 *validation* recall episodes at t = 1, 2, 4, 8
# facts in memory, no context and full attention beside them, then plotted (docs/ccm_recall_vs_steps.png).
#   scripts/ccm_recall_curve.sh [LR ...]      (default: 1e-3 3e-4)
set -eu
cd "$(dirname "$0")/.."
K=".venv/bin/kvcondense"
OUT=${OUT:-runs/ccm-chunks/curve}
common=(--data recall --split validation --episodes 30 --time-steps 1 2 4 8 --out-dir runs/ccm-chunks/evals)
lrs=("$@")
[ ${#lrs[@]} -gt 0 ] || lrs=(1e-3 3e-4)
for lr in "${lrs[@]}"; do
  for snap in runs/ccm-chunks/concat-recall-chunks-lr$lr-snaps/step*; do
    mkdir -p "$OUT/lr$lr"
    $K eval --checkpoint "$snap" "${common[@]}" --json "$OUT/lr$lr/$(basename "$snap").json"
  done
done
last=$(ls -d runs/ccm-chunks/concat-recall-chunks-lr*-snaps/step* | head -1)
$K eval --checkpoint "$last" "${common[@]}" --baselines no-context full --json "$OUT/baselines.json"
.venv/bin/python scripts/plot_memory_steps.py --curve "$OUT" --out "${PLOT:-docs/ccm_recall_vs_steps.png}"
