#!/usr/bin/env bash
# The exact commands that made the recall checkpoints (CPU, 2 cores, SmolLM2-135M, recall train split): CCM-concat
# trained as a memory of arbitrary facts. Each example is one episode: 16 facts "The code word for X is y.", each
# compressed into 4 <COMP> tokens as it comes, then "The code word for X is" with the loss on the answer only.
#  - concat-recall: the answer is the one asked value (" y"): one or two supervised tokens per example.
#  - concat-quiz: --data recall-quiz, the same episodes with four facts stated in the answer, the asked one first
#    (" y.\nThe code word for Z is z.\n..."): four values to recall per example.
# LoRA rank 8 (alpha 16, the CCM paper's smaller setting) keeps each adapter at 1.9 MB.
set -u
cd "$(dirname "$0")/.."
run() {  # name, data, block tokens, steps
  local name=$1 data=$2 block=$3 steps=$4
  .venv/bin/kvcondense train --method ccm-concat --comp-tokens 4 --data "$data" --block-tokens "$block" \
    --batch-size 4 --lr 3e-4 --schedule cosine --steps "$steps" --warmup-steps $((steps * 3 / 100)) \
    --save-every $((steps / 10)) --lora-rank 8 --out "checkpoints/$name" > "checkpoints/$name.console.log" 2>&1 \
    || echo "training failed for $name"
}
case "${1:-all}" in
  recall) run concat-recall recall 192 "${STEPS:-600}" ;;
  quiz) run concat-quiz recall-quiz 224 "${STEPS:-400}" ;;
  all) run concat-recall recall 192 "${STEPS:-600}"; run concat-quiz recall-quiz 224 "${STEPS:-400}" ;;
esac
