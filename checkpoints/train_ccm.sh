#!/usr/bin/env bash
# The exact commands that made the committed CCM checkpoints (CPU, 2 cores, SmolLM2-135M, chitchat train split).
# Each example is one conversation: its earlier turns (at most 192 text tokens with the answer) are compressed turn
# by turn into 4 <COMP> tokens; the loss is on the last turn only. Conditional LoRA: active on <COMP>/<SUM> only.
# concat-online-chitchat is the Gisting-online baseline: concat trained without recurrence (--no-recurrent).
set -u
cd "$(dirname "$0")/.."
# Steps per checkpoint (warm-up 3 % of them): concat and merge were retrained at 600 steps in session 3 (at 200
# merge's memory was worse than no context); the runs wrote to /tmp/kv/{concat,merge}-600, as their
# kvcondense.json say, and were moved here. Gisting-online (concat-online-chitchat) was retrained at 600 steps in
# session 4 with the line below (its adapter is not committed: the 30 MB budget; its config and log are).
common=(--comp-tokens 4 --data chitchat --block-tokens 192 --batch-size 4 --lr 3e-4 --schedule cosine)
run() {  # name, steps, then method flags
  local name=$1 steps=$2; shift 2
  .venv/bin/kvcondense train "$@" "${common[@]}" --steps "$steps" --warmup-steps $((steps * 3 / 100)) \
    --save-every $((steps / 10)) --out "checkpoints/$name" > "checkpoints/$name.console.log" 2>&1 \
    || echo "training failed for $name"
}
run concat-chitchat "${CONCAT_STEPS:-600}" --method ccm-concat
run merge-chitchat "${MERGE_STEPS:-600}" --method ccm-merge
run concat-online-chitchat "${ONLINE_STEPS:-600}" --method ccm-concat --no-recurrent
