#!/usr/bin/env bash
# Scored eviction with a LoRA that learns to read the pruned cache: the training-free `scored` layout (sinks, a
# recent window and the best-scored older tokens of each 192-token prompt kept, the rest dropped when the prompt
# ends), a ratio drawn per block from 0.5 / 0.75 / 0.875, a LoRA r = 16 on the attention of every token, and the
# loss on a 64-token continuation that reads the pruned prompt (OBJECTIVE: kl, the frozen uncompressed model as
# teacher, or lm); batch 4 x 256 tokens, lr 3e-4 cosine, 10 warm-up steps, STEPS steps (80: about 20 min on one
# thread). Every save (each 40 steps) is kept in runs/distill/<name>-snaps/stepN and scored on the prefix task at
# 50 / 25 / 12.5 % KV kept into runs/press; the final adapter also on recall with the same weights uncompressed
# (--reference) and, through scripts/scored_rows.sh, on the recall, multi-query and needle tables.
# PER_HEAD=1: the older tokens are chosen per (layer, KV head) (`--per-head`, SnapKV's own rule), in
# runs/distill/scored-heads-lora-<objective>-<steps>.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
STEPS=${STEPS:-80}
OBJECTIVE=${OBJECTIVE:-kl}
heads=()
NAME=scored-lora
if [ "${PER_HEAD:-0}" = 1 ]; then heads=(--per-head); NAME=scored-heads-lora; fi
OUT=runs/distill/$NAME-$OBJECTIVE-$STEPS
scripts/train_snapshots.sh "$OUT" "$STEPS" --method scored "${heads[@]}" --sample-ratios 0.5,0.75,0.875 --continuation-tokens 64 \
  --objective "$OBJECTIVE" --steps "$STEPS" --batch-size 4 --lr 3e-4 --schedule cosine --warmup-steps 10 \
  --save-every 40
prefix=(--task prefix --prefix-tokens 1024 --new-tokens 128 --docs 6 --kv-budget 0.5 0.25 0.125)
for ck in "$OUT"-snaps/step*; do
  $K eval --checkpoint "$ck" "${prefix[@]}" --out-dir runs/press
done
$K eval --checkpoint "$OUT" --task qa --data recall --episodes 30 --kv-budget 0.5 --reference --out-dir runs/recall
CHECKPOINT=$OUT scripts/scored_rows.sh
