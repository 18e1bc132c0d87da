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
snaps=()
for lr in "${lrs[@]}"; do
  run=runs/ccm-chunks/concat-recall-chunks-lr$lr-snaps
  [ -d "$run" ] || { echo "no $run: make it with checkpoints/train_recall.sh first; skipped"; continue; }
  mkdir -p "$OUT/lr$lr"
  for snap in $(ls -d "$run"/step* | sort -V); do
    $K eval --checkpoint "$snap" "${common[@]}" --json "$OUT/lr$lr/$(basename "$snap").json"
    snaps+=("$snap")
  done
done
[ ${#snaps[@]} -gt 0 ] || { echo "no snapshots to score"; exit 2; }
# the baselines (no context, full attention) do not depend on the adapter: scored once, beside the last snapshot
$K eval --checkpoint "${snaps[-1]}" "${common[@]}" --baselines no-context full --json "$OUT/baselines.json"
.venv/bin/python scripts/plot_memory_steps.py --curve "$OUT" --out "${PLOT:-docs/ccm_recall_vs_steps.png}"
