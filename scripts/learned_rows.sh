#!/usr/bin/env bash
# The other committed checkpoints on the tasks a user picks a compressor for, beside the rows of press_table.sh,
# needle_table.sh and recall_table.sh (same windows, contexts and episodes, same result folders):
# gist N=4 (--kv-budget sets its block lengths), local and scattered attention (trained at r = 0.5, run at each
# budget through their ratio) at 50 / 25 / 12.5 % KV, and CCM-concat (its KV follows from its <COMP> tokens per
# 64-token chunk: no budget to set) on the prefix task, the needle grid and fact recall; TASKS picks among them and
# multi (the four questions per context of scripts/multi_query_table.sh), e.g. TASKS=multi.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
budgets=(--kv-budget 0.5 0.25 0.125)
prefix=(--task prefix --prefix-tokens 1024 --new-tokens 128 --docs 6 --out-dir runs/press)
needle=(--task needle --needle-lengths 512 1024 --needle-depths 0 0.5 1 --docs 2 --out-dir runs/needle)
recall=(--task qa --data recall --episodes 30 --out-dir runs/recall)
multi=(--task qa --data recall --episodes 30 --questions 4 --out-dir runs/multi)
declare -A folder=([prefix]=runs/press [needle]=runs/needle [recall]=runs/recall [multi]=runs/multi)
tasks=(${TASKS:-prefix needle recall})
for ck in ${CHECKPOINTS:-checkpoints/gist4 checkpoints/local-r0.5 checkpoints/scattered-r0.5}; do
  if [ ! -f "$ck/adapter.safetensors" ]; then  # local and scattered: checkpoints/train_all.sh remakes them
    echo "skipping $ck: no adapter (the command in its kvcondense.json remakes it)"
    continue
  fi
  for task in "${tasks[@]}"; do
    declare -n flags=$task
    $K eval --checkpoint "$ck" "${flags[@]}" "${budgets[@]}"
  done
done
for ck in ${CCM:-checkpoints/concat-chitchat}; do
  for task in "${tasks[@]}"; do
    declare -n flags=$task
    $K eval --checkpoint "$ck" "${flags[@]}"
  done
done
for task in "${tasks[@]}"; do $K report "${folder[$task]}"; done
