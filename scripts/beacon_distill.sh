#!/usr/bin/env bash
# One sentinel adapter for three KV budgets, distilled from the uncompressed model: Activation Beacon's layout
# (4 sinks + a raw recent window + all older text condensed into <CR>s), LoRA only on <CL>/<CR> (text runs the base
# model exactly, so nothing compressed = the base model), each 256-token block drawing its ratio from
# 0.5 / 0.75 / 0.875, KL to the frozen uncompressed model on every text prediction; batch 4 x 256 tokens, lr 5e-4
# cosine with 10 warm-up steps, STEPS steps (240: about 85 min on 2 idle CPU cores). SHARE (default 0.5) is the
# part of the kept slots given to the raw recent window during training, and the share the snapshots are scored at.
# Every save (each 40 steps) is copied to runs/distill/<name>-snaps/stepN; each snapshot is then evaluated on the
# prefix task (the 6 held-out wiki windows of scripts/press_table.sh) at 50 / 25 / 12.5 % KV kept, the final
# adapter also at the other window shares (0.5, 0.75, 0.9), on recall (30 episodes) and on the needle grid; all into runs/press,
# runs/recall and runs/needle beside the kvpress rows of scripts/press_table.sh, recall_table.sh, needle_table.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
STEPS=${STEPS:-240}
SHARE=${SHARE:-0.5}
NAME=sentinel-recent-special-kl-$STEPS
share_flags=()
if [ "$SHARE" != 0.5 ]; then NAME=$NAME-ws$SHARE; share_flags=(--window-share "$SHARE"); fi
OUT=runs/distill/$NAME
scripts/train_snapshots.sh "$OUT" "$STEPS" --method sentinel --placement recent --lora-scope special \
  --sample-ratios 0.5,0.75,0.875 "${share_flags[@]}" --objective kl --steps "$STEPS" --batch-size 4 --lr 5e-4 \
  --schedule cosine --warmup-steps 10 --save-every 40
prefix=(--task prefix --prefix-tokens 1024 --new-tokens 128 --docs 6 --kv-budget 0.5 0.25 0.125)
for ck in "$OUT"-snaps/step*; do
  $K eval --checkpoint "$ck" "${prefix[@]}" "${share_flags[@]}" --out-dir runs/press
done
for share in 0.5 0.75 0.9; do
  [ "$share" = "$SHARE" ] && continue
  $K eval --checkpoint "$OUT" "${prefix[@]}" --window-share "$share" --out-dir runs/press
done
$K eval --checkpoint "$OUT" --task qa --data recall --episodes 30 --kv-budget 0.5 0.25 0.125 --reference \
  --out-dir runs/recall
$K eval --checkpoint "$OUT" --task needle --needle-lengths 512 1024 --needle-depths 0 0.5 1 --docs 2 \
  --kv-budget 0.5 0.25 0.125 --out-dir runs/needle
for d in runs/press runs/recall runs/needle; do $K report "$d"; done
