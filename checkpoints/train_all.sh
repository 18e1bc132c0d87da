#!/usr/bin/env bash
# The exact commands that made the committed checkpoints (CPU, 2 cores, SmolLM2-135M, wiki train split).
set -u
cd "$(dirname "$0")/.."
for m in sentinel local scattered; do
  .venv/bin/kvcondense train --method "$m" --ratio 0.5 --steps 150 --batch-size 4 --lr 3e-4 \
    --save-every 25 --out "checkpoints/$m-r0.5" > "checkpoints/$m-r0.5.console.log" 2>&1 \
    || echo "training $m failed, see checkpoints/$m-r0.5.console.log"
done
