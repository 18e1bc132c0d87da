#!/usr/bin/env bash
# The README's gist table: held-out wiki perplexity on regular tokens, measured KV kept and stored KV bytes,
# at two context lengths (blocks of 256 and 1024 tokens), for full attention and the gist checkpoints.
# Results land in runs/gist/<deterministic name>/result.json (reruns skip them), then a report is written.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
TOKENS=${TOKENS:-4096}
for block in 256 1024; do
  common=(--block-tokens "$block" --max-tokens "$TOKENS" --batch-size 2 --out-dir runs/gist)
  $K eval --method full "${common[@]}"
  $K eval --method gist --gist-tokens 4 "${common[@]}"          # untrained gist rows: the ablation
  for ck in checkpoints/gist4 checkpoints/gist8 checkpoints/gist2 checkpoints/gist1; do
    if [ -f "$ck/adapter.safetensors" ]; then $K eval --checkpoint "$ck" "${common[@]}"; else echo "skipping $ck: no adapter (its kvcondense.json names the command that remakes it)"; fi
  done
done
$K report runs/gist
