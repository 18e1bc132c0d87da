#!/usr/bin/env bash
# Passkey retrieval over a compressed context, kvcondense and kvpress on the same token ids: held-out wiki
# haystacks of 512 and 1024 tokens, the passkey at depth 0 / 0.5 / 1, 2 contexts per cell (12 contexts, each
# asked by 4 options and by generation), at 50, 25 and 12.5 % KV kept. Results in runs/needle/, report in
# runs/needle/report/ (a heat map per row). Needs the peer venv: `make peers`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/peers.sh
K=.venv/bin/kvcondense
OUT=runs/needle
common=(--task needle --needle-lengths 512 1024 --needle-depths 0 0.5 1 --docs 2 --out-dir "$OUT")
mkdir -p "$OUT/kvpress"
$K eval --method full "${common[@]}" --export-tasks "$OUT/needle_tasks.json"
$K eval --method streaming --kv-budget 0.5 0.25 0.125 "${common[@]}"
for ck in ${CHECKPOINTS:-checkpoints/sentinel-r0.5}; do
  $K eval --checkpoint "$ck" "${common[@]}"
done
run_presses "$OUT/needle_tasks.json" "$OUT/kvpress/result.json" "${PRESSES:-streaming_llm snapkv expected_attention kvzip}" 0.5 0.25 0.125
$K report "$OUT"
