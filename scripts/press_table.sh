#!/usr/bin/env bash
# kvcondense against NVIDIA kvpress's training-free presses, in one harness: the prefix task on held-out wiki
# (a 1024-token context compressed, the next 128 tokens scored over what was kept; 6 windows), the same token ids
# for both (kvcondense exports them, benchmarks/peers/kvpress scores them), at 50 / 25 / 12.5 % KV kept.
# Needs the peer venv: `make peers`. Results in runs/press/, report in runs/press/report/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/peers.sh
K=.venv/bin/kvcondense
OUT=runs/press
common=(--task prefix --prefix-tokens 1024 --new-tokens 128 --docs "${WINDOWS:-6}" --out-dir "$OUT")
mkdir -p "$OUT/kvpress"
$K eval --method full "${common[@]}" --export-tasks "$OUT/prefix_tasks.json"
$K eval --method no-context "${common[@]}"   # every context token sees only itself: the lower bound
$K eval --method streaming --kv-budget 0.5 0.25 0.125 "${common[@]}"
for ck in ${CHECKPOINTS:-checkpoints/sentinel-r0.5}; do
  $K eval --checkpoint "$ck" "${common[@]}"           # at the ratio it was trained for (KV kept measured)
done
run_presses "$OUT/prefix_tasks.json" "$OUT/kvpress/result.json" "${PRESSES:-streaming_llm snapkv expected_attention kvzip tova knorm}" 0.5 0.25 0.125
$K report "$OUT"
