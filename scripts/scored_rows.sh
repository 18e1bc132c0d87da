#!/usr/bin/env bash
# The scored rows of the recall, multi-query and needle tables: the training-free `scored` eviction (SnapKV's rule,
# once for every head, and with `--per-head` per layer and KV head) and, if CHECKPOINT is set, a checkpoint with its
# own settings (the sentinel of scripts/scored_distill.sh, or `train --method scored`), at 50 / 25 / 12.5 % KV kept.
# The settings are those of scripts/recall_table.sh, scripts/multi_query_table.sh and scripts/needle_table.sh, so
# the rows sit beside theirs (same episodes, same token ids as kvpress); results into runs/recall, runs/multi and
# runs/needle.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
source scripts/qa_settings.sh
for task in recall multi needle; do
  declare -n flags=$task
  $K eval --method scored "${budgets[@]}" "${flags[@]}"
  $K eval --method scored --per-head "${budgets[@]}" "${flags[@]}"
  if [ -n "${CHECKPOINT:-}" ]; then
    $K eval --checkpoint "$CHECKPOINT" "${budgets[@]}" "${flags[@]}"
  fi
done
