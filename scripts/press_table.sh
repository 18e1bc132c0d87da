#!/usr/bin/env bash
# kvcondense against NVIDIA kvpress's training-free presses, in one harness: the prefix task on held-out wiki
# (a 1024-token context compressed, the next 128 tokens scored over what was kept; 6 windows), the same token ids
# for both (kvcondense exports them, benchmarks/peers/kvpress scores them), at 50 / 25 / 12.5 % KV kept.
# Needs the peer venv: `make peers`. Results in $OUT (default runs/press), report in $OUT/report.
# CHECKPOINTS: checkpoints run at the ratio they were trained for (default checkpoints/sentinel-r0.5); BUDGETED:
# checkpoints run at every budget (the README's plot: runs/distill/scored-heads-replay-lora-kl-80, made by
# `REPLAY=0.5 scripts/scored_heads_lora.sh`); BUDGETED_FLAGS: more eval flags for them (the README's plot:
# "--allocate layer", budgets per layer for a LoRA trained with equal counts per head).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/peers.sh
K=.venv/bin/kvcondense
OUT=${OUT:-runs/press}
common=(--task prefix --prefix-tokens 1024 --new-tokens 128 --docs "${WINDOWS:-6}" --out-dir "$OUT")
mkdir -p "$OUT/kvpress"
$K eval --method full "${common[@]}" --export-tasks "$OUT/prefix_tasks.json"
$K eval --method no-context "${common[@]}"   # every context token sees only itself: the lower bound
$K eval --method streaming --kv-budget 0.5 0.25 0.125 "${common[@]}"
$K eval --method scored-heads --kv-budget 0.5 0.25 0.125 "${common[@]}"   # training-free, per (layer, KV head)
for ck in ${CHECKPOINTS:-checkpoints/sentinel-r0.5}; do
  $K eval --checkpoint "$ck" "${common[@]}"           # at the ratio it was trained for (KV kept measured)
done
for ck in ${BUDGETED:-}; do
  # shellcheck disable=SC2086  # BUDGETED_FLAGS are words
  $K eval --checkpoint "$ck" ${BUDGETED_FLAGS:-} --kv-budget 0.5 0.25 0.125 "${common[@]}"
done
run_presses "$OUT/prefix_tasks.json" "$OUT/kvpress/result.json" "${PRESSES:-streaming_llm snapkv expected_attention kvzip tova knorm}" 0.5 0.25 0.125
$K report "$OUT"
