#!/usr/bin/env bash
# Learned tokens on top of a scoring pass, trained in the prefix task's shape. Sentinel with the scored placement
# (sinks, a recent window and the older tokens the end of the prompt attends to most stay raw; every run of the
# others, up to SPAN tokens, is condensed into one <CR>), evict=end (the prompt is read whole, then compressed, as a
# KV press does), the LoRA only on <CL>/<CR>; each 256-token block is a 192-token prompt compressed at a ratio
# drawn from 0.5 / 0.75 / 0.875 and a 64-token continuation that reads it (--continuation-tokens), KL to the frozen
# uncompressed model on every text prediction; batch 4, lr 5e-4 cosine, 10 warm-up steps, STEPS steps, from a fresh
# LoRA (or from the adapter of another run: INIT=DIR, e.g. the one scripts/beacon_distill.sh makes).
# Snapshots every 40 steps go to runs/distill/<name>-snaps/stepN; each is scored on the prefix task (the 6 held-out
# wiki windows of scripts/press_table.sh: 1024 + 128 tokens) at 50 / 25 / 12.5 % KV into runs/press, beside the
# training-free `scored` ablation (the same scoring pass, the rest dropped instead of condensed); the final adapter
# also on recall (30 episodes) into runs/recall.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
STEPS=${STEPS:-120}
SPAN=${SPAN:-128}
INIT=${INIT:-}
init=()
if [ -n "$INIT" ]; then init=(--init-from "$INIT"); fi
NAME=sentinel-scored-end-kl-$STEPS
OUT=runs/distill/$NAME
scripts/train_snapshots.sh "$OUT" "$STEPS" --method sentinel --placement scored --evict end --score-window 16 \
  --span-tokens "$SPAN" --lora-scope special --sample-ratios 0.5,0.75,0.875 --continuation-tokens 64 "${init[@]}" \
  --objective kl --steps "$STEPS" --batch-size 4 --lr 5e-4 --schedule cosine --warmup-steps 10 --save-every 40
prefix=(--task prefix --prefix-tokens 1024 --new-tokens 128 --docs 6 --kv-budget 0.5 0.25 0.125)
$K eval --method scored "${prefix[@]}" --out-dir runs/press
if [ -n "$INIT" ]; then
  $K eval --checkpoint "$INIT" "${prefix[@]}" --placement scored --evict end --span-tokens "$SPAN" --out-dir runs/press
fi
for ck in "$OUT"-snaps/step*; do
  $K eval --checkpoint "$ck" "${prefix[@]}" --score-window 32 --out-dir runs/press
done
$K eval --checkpoint "$OUT" --task qa --data recall --episodes 30 --kv-budget 0.5 0.25 0.125 --score-window 32 \
  --reference --out-dir runs/recall
for d in runs/press runs/recall; do $K report "$d"; done
