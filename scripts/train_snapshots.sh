#!/usr/bin/env bash
# Train with `kvcondense train ... --out OUT --resume` and copy every save aside to OUT-snaps/stepN (a save replaces
# the previous one), so that each snapshot can be evaluated afterwards; a run that already reached STEPS is skipped.
#   scripts/train_snapshots.sh OUT STEPS [kvcondense train flags, --steps and --save-every included]
# The training log goes to OUT.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
STEPS=$2
shift 2
steps_done() { .venv/bin/python -c "import json;print(json.load(open('$OUT/kvcondense.json'))['training']['steps_done'])"; }
snapshot() { mkdir -p "$OUT-snaps/step$1" && cp "$OUT"/{kvcondense.json,adapter.safetensors,train_log.jsonl} "$OUT-snaps/step$1/"; }
if [ -f "$OUT/kvcondense.json" ] && [ "$(steps_done)" = "$STEPS" ]; then
  exit 0
fi
mkdir -p "$(dirname "$OUT")"
.venv/bin/kvcondense train "$@" --out "$OUT" --resume > "$OUT.log" 2>&1 &
train=$!
last=""
while kill -0 "$train" 2> /dev/null; do
  s=$(steps_done 2> /dev/null) || { sleep 20; continue; }
  if [ "$s" != "$last" ]; then snapshot "$s" && last=$s; fi
  sleep 20
done
wait "$train"
if [ ! -d "$OUT-snaps/step$STEPS" ]; then snapshot "$STEPS"; fi   # the last save can land after the loop's last look
