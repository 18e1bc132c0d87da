#!/usr/bin/env bash
# kvcondense against NVIDIA kvpress's training-free presses, in one harness: the prefix task on held-out wiki
# (a 1024-token context compressed, the next 128 tokens scored over what was kept; 6 windows), the same token ids
# for both (kvcondense exports them, benchmarks/peers/kvpress scores them), at 50 / 25 / 12.5 % KV kept.
# Needs the peer venv: `make peers`. Results in runs/press/, report in runs/press/report/.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
OUT=runs/press
common=(--task prefix --prefix-tokens 1024 --new-tokens 128 --docs "${WINDOWS:-6}" --out-dir "$OUT")
mkdir -p "$OUT/kvpress"
$K eval --method full "${common[@]}" --export-tasks "$OUT/prefix_tasks.json"
$K eval --method streaming --kv-budget 0.5 0.25 0.125 "${common[@]}"
for ck in ${CHECKPOINTS:-checkpoints/sentinel-r0.5}; do
  $K eval --checkpoint "$ck" "${common[@]}"           # at the ratio it was trained for (KV kept measured)
done
benchmarks/peers/kvpress/.venv/bin/python benchmarks/peers/kvpress/run_presses.py \
  --tasks "$OUT/prefix_tasks.json" --model "$(.venv/bin/python -c \
  'from kvcondense.models import resolve_model; print(resolve_model("smollm2-135m"))')" \
  --presses ${PRESSES:-streaming_llm snapkv expected_attention kvzip tova knorm} --kept 0.5 0.25 0.125 \
  --out "$OUT/kvpress/result.json"
$K report "$OUT"
