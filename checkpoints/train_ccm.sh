#!/usr/bin/env bash
# The exact commands that made the committed CCM checkpoints (CPU, 2 cores, SmolLM2-135M, chitchat train split).
# Each example is one conversation: its earlier turns (at most 192 text tokens with the answer) are compressed turn
# by turn into 4 <COMP> tokens; the loss is on the last turn only. Conditional LoRA: active on <COMP>/<SUM> only.
# concat-online-chitchat is the Gisting-online baseline: concat trained without recurrence (--no-recurrent).
set -u
cd "$(dirname "$0")/.."
common=(--comp-tokens 4 --data chitchat --block-tokens 192 --steps "${CCM_STEPS:-200}" --batch-size 4 --lr 3e-4
  --schedule cosine --warmup-steps 6 --save-every 20)
run() {  # name, then method flags
  local name=$1; shift
  .venv/bin/kvcondense train "$@" "${common[@]}" --out "checkpoints/$name" > "checkpoints/$name.console.log" 2>&1 \
    || echo "training failed for $name"
}
run concat-chitchat --method ccm-concat
run merge-chitchat --method ccm-merge
run concat-online-chitchat --method ccm-concat --no-recurrent
