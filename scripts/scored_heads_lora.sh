#!/usr/bin/env bash
# The best scored recipe with a LoRA that learns to read its cache: per-(layer, KV head) eviction (`--per-head`,
# each head keeping as many tokens) chosen by the mean attention of every prompt token (`--score-window 0
# --score-mean`), unpooled (`--score-pool 1`) and weighed by each token's value norm (`--value-norm`), with 4 sinks
# and the 32 most recent tokens always kept (`--recent 32`). Training as scripts/scored_lora.sh: a ratio drawn per
# block from 0.5 / 0.75 / 0.875, LoRA r = 16 on the attention of every token, the loss (OBJECTIVE: kl, the frozen
# uncompressed model as teacher, or lm) on a 64-token continuation that reads the pruned 192-token prompt; batch
# 4 x 256 tokens, lr 3e-4 cosine, 10 warm-up steps, STEPS steps (80: about 25 min on one thread). Every save is
# kept in runs/distill/<name>-snaps/stepN and scored on the prefix task at 50 / 25 / 12.5 % KV kept into
# runs/press; the final adapter also on recall uncompressed (--reference) and on the recall, multi-query and needle
# tables (scripts/scored_rows.sh).
# REPLAY=0.5: the same recipe with KVzip's replay score mixed in half and half (`--method scored-heads --replay 0.5
# --allocate head`: the preset before budgets per layer), in runs/distill/scored-heads-replay-lora-<objective>-<steps>
# (about 30 min on one thread: the replay reads each prompt a second time).
# PRESET=1: `--method scored-heads` as it stands (replay 0.75, budgets per layer), in
# runs/distill/scored-heads-layer-lora-<objective>-<steps>.
# DATA=recall-quiz: train on the recall task's training episodes instead of wiki (each episode's 16 facts the
# prompt, pruned once read; its question and an answer stating four facts the continuation), into
# runs/distill/scored-heads-replay-lora-<objective>-<steps>-recall-quiz; the evaluations are the same, on held-out
# episodes and wiki.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
STEPS=${STEPS:-80}
OBJECTIVE=${OBJECTIVE:-kl}
REPLAY=${REPLAY:-0}
DATA=${DATA:-}
if [ -n "${PRESET:-}" ]; then
  recipe=(--method scored-heads)
  OUT=runs/distill/scored-heads-layer-lora-$OBJECTIVE-$STEPS
elif [ "$REPLAY" = 0 ]; then
  recipe=(--method scored --per-head --score-window 0 --score-mean --score-pool 1 --value-norm --recent 32)
  OUT=runs/distill/scored-heads-mean-lora-$OBJECTIVE-$STEPS
else
  recipe=(--method scored-heads --replay "$REPLAY" --allocate head)
  OUT=runs/distill/scored-heads-replay-lora-$OBJECTIVE-$STEPS
fi
data=(--continuation-tokens 64)
if [ -n "$DATA" ]; then
  data=(--data "$DATA")
  OUT=$OUT-$DATA
fi
scripts/train_snapshots.sh "$OUT" "$STEPS" "${recipe[@]}" --sample-ratios 0.5,0.75,0.875 \
  "${data[@]}" --objective "$OBJECTIVE" --steps "$STEPS" --batch-size 4 --lr 3e-4 --schedule cosine \
  --warmup-steps 10 --save-every 40
prefix=(--task prefix --prefix-tokens 1024 --new-tokens 128 --docs 6 --kv-budget 0.5 0.25 0.125)
$K eval "${recipe[@]}" "${prefix[@]}" --out-dir runs/press   # the same recipe, training-free
for ck in "$OUT"-snaps/step*; do
  $K eval --checkpoint "$ck" "${prefix[@]}" --out-dir runs/press
done
$K eval --checkpoint "$OUT" --task qa --data recall --episodes 30 --kv-budget 0.5 --reference --out-dir runs/recall
CHECKPOINT=$OUT scripts/scored_rows.sh
