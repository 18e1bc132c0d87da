#!/usr/bin/env bash
# LM against KL-to-the-uncompressed-model training at equal steps and data (sentinel r=0.5, batch 4 x 256 tokens,
# lr 3e-4, 40 steps each, seed 0): the prefix task (the same 6 held-out wiki windows as scripts/press_table.sh)
# on the checkpoint saved every 10 steps. Trains into runs/distill/ (about 15 min LM, 25 min KL on 2 cores at
# once), snapshots every save into runs/distill/curve/, evaluates into runs/press/ and draws runs/press/report/.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
STEPS=${STEPS:-40}
for obj in lm kl; do
  out=runs/distill/sentinel-$obj-$STEPS
  [ -f "$out/kvcondense.json" ] && continue
  OMP_NUM_THREADS=1 $K train --method sentinel --ratio 0.5 --steps "$STEPS" --batch-size 4 --lr 3e-4 \
    --save-every 10 --objective "$obj" --out "$out" > "runs/distill-train-$obj.log" 2>&1 &
done
# copy each checkpoint as it is saved (a save replaces the previous one)
while pgrep -f "kvcondense train --method sentinel --ratio 0.5 --steps $STEPS" > /dev/null; do
  for obj in lm kl; do
    d=runs/distill/sentinel-$obj-$STEPS
    s=$(.venv/bin/python -c "import json;print(json.load(open('$d/kvcondense.json'))['training']['steps_done'])" \
      2>/dev/null) || continue
    t=runs/distill/curve/sentinel-$obj-step$s
    [ -d "$t" ] || { mkdir -p runs/distill/curve; cp -r "$d" "$t.tmp" && rm -rf "$t.tmp/resume" && mv "$t.tmp" "$t"; }
  done
  sleep 20
done
for ck in runs/distill/curve/*; do
  $K eval --checkpoint "$ck" --task prefix --prefix-tokens 1024 --new-tokens 128 --docs "${WINDOWS:-6}" \
    --out-dir runs/press
done
$K report runs/press
