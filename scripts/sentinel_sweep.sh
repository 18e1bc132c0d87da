#!/usr/bin/env bash
# Perplexity against the compression ratio (the sentinel paper's main figure, on held-out wiki): the trained
# sentinel model and the trained local-attention model (both trained at r=0.5, evaluated at every r) against
# StreamingLLM and full attention. Results in runs/sweep/, report and plot in runs/sweep/report/.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
common=(--ratio 0.3 0.5 0.7 0.9 --max-tokens "${TOKENS:-4096}" --out-dir runs/sweep)
$K eval --method full --out-dir runs/sweep --max-tokens "${TOKENS:-4096}"
$K eval --checkpoint checkpoints/sentinel-r0.5 "${common[@]}"
if [ -f checkpoints/local-r0.5/adapter.safetensors ]; then  # not committed since session 14: train_all.sh remakes it
  $K eval --checkpoint checkpoints/local-r0.5 "${common[@]}"
else
  echo "skipping checkpoints/local-r0.5: no adapter (checkpoints/train_all.sh remakes it)"
fi
$K eval --method streaming "${common[@]}"
$K report runs/sweep
