#!/usr/bin/env bash
# Fact recall over a compressed context, kvcondense and kvpress on the same token ids: the first
# 30 held-out episodes of --data recall as one context each (16 facts compressed at once, question-agnostic, then one
# 4-option question about one of them),
# at 50, 25 and 12.5 % KV kept. Results in runs/recall/, report in runs/recall/report/. Needs `make peers`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/peers.sh
K=.venv/bin/kvcondense
OUT=runs/recall
common=(--task qa --data recall --episodes 30 --out-dir "$OUT")
mkdir -p "$OUT/kvpress"
$K eval --method full "${common[@]}" --export-tasks "$OUT/recall_tasks.json"
$K eval --method no-context "${common[@]}"   # every context token sees only itself: the lower bound
$K eval --method streaming --kv-budget 0.5 0.25 0.125 "${common[@]}"
for ck in ${CHECKPOINTS:-checkpoints/sentinel-r0.5}; do
  $K eval --checkpoint "$ck" "${common[@]}" --reference   # also its weights with nothing compressed
done
run_presses "$OUT/recall_tasks.json" "$OUT/kvpress/result.json" "${PRESSES:-streaming_llm snapkv expected_attention kvzip}" 0.5 0.25 0.125
$K report "$OUT"
