#!/usr/bin/env bash
# The committed sentinel and gist checkpoints retrained with the training issue's best objective: KL to the frozen
# uncompressed model (the same base model, adapters off, full causal attention over the raw text) instead of the
# next-token loss. Everything else is the LM recipe that made checkpoints/sentinel-r0.5 and checkpoints/gist4
# (checkpoints/train_all.sh, checkpoints/train_gist.sh): the same data, seed, steps, batch and learning rate, so
# each pair compares the two objectives at equal steps. Every save is copied aside to runs/kl-retrain/<name>-snaps.
#   checkpoints/train_kl.sh sentinel   # sentinel r = 0.5, 150 x 4 x 256, lr 3e-4 linear decay -> sentinel-r0.5-kl
#   checkpoints/train_kl.sh gist       # gist N = 4 stage 2 (LoRA + rows) from gist4-stage1, 150 x 4 x 256 -> gist4-kl
#   checkpoints/train_kl.sh gist-lmkl  # the gist run with --objective lm+kl (runs/kl-retrain/gist4-lmkl; not copied)
#   checkpoints/train_kl.sh sentinel-lm  # the LM run again (checkpoints/train_all.sh's sentinel command), its saves
#                                        # kept for the curve (runs/kl-retrain/sentinel-r0.5-lm-snaps); not copied
set -euo pipefail
cd "$(dirname "$0")/.."
keep() {  # copy a finished run into checkpoints/<name>
  mkdir -p "checkpoints/$2" && cp "runs/kl-retrain/$2"/{kvcondense.json,adapter.safetensors,train_log.jsonl} \
    "checkpoints/$2/"
}
case "${1:-}" in
  sentinel)
    scripts/train_snapshots.sh runs/kl-retrain/sentinel-r0.5-kl 150 --method sentinel --ratio 0.5 --steps 150 \
      --batch-size 4 --lr 3e-4 --save-every 25 --objective kl
    keep sentinel sentinel-r0.5-kl ;;
  gist)
    scripts/train_snapshots.sh runs/kl-retrain/gist4-kl 150 --method gist --gist-tokens 4 --data wiki --stage lora \
      --init-from checkpoints/gist4-stage1 --steps 150 --batch-size 4 --lr 3e-4 --save-every 25 --objective kl
    keep gist gist4-kl ;;
  gist-lmkl)  # the LM loss and the KL summed (--objective lm+kl): does the LM term keep the uncompressed recall?
    scripts/train_snapshots.sh runs/kl-retrain/gist4-lmkl 150 --method gist --gist-tokens 4 --data wiki \
      --stage lora --init-from checkpoints/gist4-stage1 --steps 150 --batch-size 4 --lr 3e-4 --save-every 25 \
      --objective lm+kl ;;
  sentinel-lm)
    scripts/train_snapshots.sh runs/kl-retrain/sentinel-r0.5-lm 150 --method sentinel --ratio 0.5 --steps 150 \
      --batch-size 4 --lr 3e-4 --save-every 25 ;;
  *) echo "usage: checkpoints/train_kl.sh {sentinel|gist|gist-lmkl|sentinel-lm}" >&2; exit 2 ;;
esac
