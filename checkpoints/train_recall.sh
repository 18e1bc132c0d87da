#!/usr/bin/env bash
# The exact commands that made the recall checkpoints (CPU, 2 cores, SmolLM2-135M, recall train split): CCM-concat
# trained as a memory of arbitrary facts. Each example is one episode: 16 facts "The code word for X is y.", each
# compressed into 4 <COMP> tokens as it comes, then "The code word for X is" with the loss on the answer only.
#  - concat-recall: the answer is the one asked value (" y"): one or two supervised tokens per example.
#  - concat-quiz: --data recall-quiz, the same episodes with four facts stated in the answer, the asked one first
#    (" y.\nThe code word for Z is z.\n..."): four values to recall per example.
#  - concat-recall-chunks: as concat-recall, but each example cut to its last T facts (the asked one kept), T drawn
#    from 1, 2, 4, 8 per example (--sample-chunks), 8 episodes a step: a memory that first learns to keep a few facts
#    apart (400 steps, 38 min on one thread). lr 3e-4, chosen over 1e-3 on 60 validation episodes at t = 4 (the
#    training issue's target): 0.733 vs 0.650 (t = 8: 0.433 vs 0.600; scripts/ccm_recall_curve.sh).
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
chunks() {  # method (concat, merge), lr[, counts]; every save copied aside (runs/ccm-chunks/...-snaps/stepN)
  local counts=${3:-1,2,4,8} steps=${STEPS:-400} out=runs/ccm-chunks/$1-recall-chunks-lr$2
  [ "$counts" = 1,2,4,8 ] || out=$out-t${counts//,/-}
  scripts/train_snapshots.sh "$out" "$steps" --method "ccm-$1" --comp-tokens 4 --data recall --block-tokens 192 \
    --batch-size 8 --lr "$2" --schedule cosine --steps "$steps" --warmup-steps 12 --save-every 100 --lora-rank 8 \
    --sample-chunks "$counts" || { echo "training failed for $out"; return 1; }
}
case "${1:-all}" in
  chunks)  # the committed checkpoint (lr 3e-4); `chunks-fast` is the other rate tried
    chunks concat 3e-4 && mkdir -p checkpoints/concat-recall-chunks \
      && cp runs/ccm-chunks/concat-recall-chunks-lr3e-4/{kvcondense.json,adapter.safetensors,train_log.jsonl} \
        checkpoints/concat-recall-chunks/ ;;
  chunks-fast) chunks concat 1e-3 ;;
  merge-chunks) chunks merge 3e-4 ;;  # the same recipe for a memory of 4 slots in all
  chunks16) chunks concat 3e-4 1,2,4,8,16 ;;  # whole episodes (16 facts) in the draw too
  recall) run concat-recall recall 192 "${STEPS:-600}" ;;
  quiz) run concat-quiz recall-quiz 224 "${STEPS:-400}" ;;
  all) run concat-recall recall 192 "${STEPS:-600}"; run concat-quiz recall-quiz 224 "${STEPS:-400}" ;;
esac
