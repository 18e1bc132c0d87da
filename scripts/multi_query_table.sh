#!/usr/bin/env bash
# Multi-query recall (the setting of KVzip and SCBench): the first 30 held-out recall episodes, 16 facts each,
# compressed once before any question, then 4 four-option questions about 4 different facts, all reading the one
# compressed context (120 questions). kvcondense and kvpress on the same token ids, at 50, 25 and 12.5 % KV kept.
# Results in runs/multi/, report in runs/multi/report/. Needs the peer venv: `make peers`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/peers.sh
K=.venv/bin/kvcondense
OUT=runs/multi
common=(--task qa --data recall --episodes 30 --questions 4 --out-dir "$OUT")
mkdir -p "$OUT/kvpress"
$K eval --method full "${common[@]}" --export-tasks "$OUT/multi_tasks.json"
$K eval --method no-context "${common[@]}"   # every context token sees only itself: the lower bound
$K eval --method streaming --kv-budget 0.5 0.25 0.125 "${common[@]}"
for ck in ${CHECKPOINTS:-runs/distill/sentinel-recent-special-kl-240}; do
  $K eval --checkpoint "$ck" --kv-budget 0.5 0.25 0.125 "${common[@]}"
done
run_presses "$OUT/multi_tasks.json" "$OUT/kvpress/result.json" "${PRESSES:-streaming_llm snapkv expected_attention kvzip}" 0.5 0.25 0.125
$K report "$OUT"
