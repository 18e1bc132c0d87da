#!/usr/bin/env bash
# The committed LM checkpoints (sentinel-r0.5, gist4) against their KL retrains (checkpoints/train_kl.sh: the same
# recipe, data, seed and steps, KL to the frozen uncompressed model as the loss) on every table they appear in,
# the same windows, contexts and episodes as the other rows (results cached in the same folders):
#  - the prefix task (scripts/press_table.sh's windows) with --reference: KL to the checkpoint's own full attention
#    and to the base model's; sentinel at its ratio 0.5, gist at --kv-budget 0.5 0.25 0.125;
#  - the needle grid and fact recall (with --reference: the weights with nothing compressed, the damage check);
#  - wiki perplexity as the demo table measures it (4096 tokens in blocks of 256) and, for gist, the gist table's
#    two block lengths;
#  - the curves: every saved step (runs/kl-retrain/<name>-snaps/stepN) of the KL retrains and of the LM sentinel
#    rerun on the prefix task (scripts/plot_objectives.py draws the sentinel pair).
# PAIRS picks what runs (default: "sentinel gist").
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvcondense
prefix=(--task prefix --prefix-tokens 1024 --new-tokens 128 --docs 6 --reference)
needle=(--task needle --needle-lengths 512 1024 --needle-depths 0 0.5 1 --docs 2 --out-dir runs/needle)
recall=(--task qa --data recall --episodes 30 --out-dir runs/recall --reference)
for pair in ${PAIRS:-sentinel gist}; do
  case $pair in
    sentinel) cks=(checkpoints/sentinel-r0.5 checkpoints/sentinel-r0.5-kl) budgets=() snaps="sentinel-r0.5-kl sentinel-r0.5-lm" ;;
    gist) cks=(checkpoints/gist4 checkpoints/gist4-kl) budgets=(--kv-budget 0.5 0.25 0.125) snaps=gist4-kl ;;
    *) echo "unknown pair $pair (sentinel or gist)" >&2; exit 2 ;;
  esac
  for ck in "${cks[@]}"; do
    $K eval --checkpoint "$ck" "${prefix[@]}" "${budgets[@]}" --out-dir runs/press
    $K eval --checkpoint "$ck" "${needle[@]}" "${budgets[@]}"
    $K eval --checkpoint "$ck" "${recall[@]}" "${budgets[@]}"
    $K eval --checkpoint "$ck" --max-tokens 4096 --verify --out-dir runs/kl-retrain/perplexity
    if [ "$pair" = gist ]; then
      for block in 256 1024; do
        $K eval --checkpoint "$ck" --block-tokens "$block" --max-tokens 4096 --batch-size 2 --out-dir runs/gist
      done
    fi
  done
  for run in $snaps; do  # the LM run's saves exist after `checkpoints/train_kl.sh sentinel-lm`
    for s in runs/kl-retrain/"$run"-snaps/step*; do
      [ -d "$s" ] || continue
      $K eval --checkpoint "$s" "${prefix[@]}" "${budgets[@]}" --out-dir runs/kl-retrain/curve
    done
  done
done
