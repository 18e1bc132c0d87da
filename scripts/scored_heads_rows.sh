#!/usr/bin/env bash
# The scored-heads rows of the recall, multi-query and needle tables: the training-free `--method scored-heads` and,
# if CHECKPOINT is set (e.g. runs/distill/scored-heads-replay-lora-kl-80, made by `REPLAY=0.5
# scripts/scored_heads_lora.sh`), its LoRA, at 50 / 25 / 12.5 % KV kept. The settings are those of
# scripts/recall_table.sh, scripts/multi_query_table.sh and scripts/needle_table.sh (same episodes, same token ids as
# kvpress); results into runs/recall, runs/multi and runs/needle. FORCE=1 re-runs cached rows (after a code change).
# FLAGS: more eval flags for the checkpoint's rows (e.g. FLAGS="--allocate layer": a checkpoint trained with equal
# counts per head run with budgets per layer).
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
source scripts/qa_settings.sh
force=()
if [ -n "${FORCE:-}" ]; then force=(--force); fi
for task in ${TASKS:-recall multi needle}; do
  declare -n flags=$task
  if [ -n "${CHECKPOINT:-}" ]; then
    # shellcheck disable=SC2086  # FLAGS are words
    $K eval --checkpoint "$CHECKPOINT" ${FLAGS:-} "${budgets[@]}" "${flags[@]}" "${force[@]}"
  else
    $K eval --method scored-heads "${budgets[@]}" "${flags[@]}" "${force[@]}"
  fi
done
