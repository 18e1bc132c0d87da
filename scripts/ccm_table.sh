#!/usr/bin/env bash
# The online-memory tables of the README (CCM, issue #4): chitchat perplexity of the last turn, and accuracy on
# the built-in analogy and recall tasks, against the number of compressed turns t, with the baselines at the same
# KV budget. Results land in runs/ccm/<deterministic name>/result.json; `kvcondense report runs/ccm` tabulates.
set -eu
cd "$(dirname "$0")/.."
K=".venv/bin/kvcondense"
EP=${CCM_EPISODES:-30}
common=(--episodes "$EP" --time-steps 1 2 4 8 16 --out-dir runs/ccm)
$K eval --checkpoint checkpoints/concat-chitchat --data chitchat --baselines no-context full window --verify "${common[@]}"
$K eval --checkpoint checkpoints/merge-chitchat --data chitchat --baselines window --verify "${common[@]}"
for ck in concat merge; do  # the control: each conversation's last turn after another conversation's memory
  $K eval --checkpoint "checkpoints/$ck-chitchat" --data chitchat --baselines other-memory "${common[@]}"
done
if [ -f checkpoints/concat-online-chitchat/adapter.safetensors ]; then
  $K eval --checkpoint checkpoints/concat-online-chitchat --data chitchat --baselines other-memory "${common[@]}"
fi
for task in recall analogy; do
  $K eval --checkpoint checkpoints/concat-chitchat --data "$task" --baselines "${common[@]}"
  $K eval --checkpoint checkpoints/merge-chitchat --data "$task" --baselines window "${common[@]}"
done
# memories trained on facts (checkpoints/train_recall.sh makes them)
for ck in concat-recall concat-quiz concat-recall-chunks; do
  if [ -f "checkpoints/$ck/adapter.safetensors" ]; then
    $K eval --checkpoint "checkpoints/$ck" --data recall --baselines window other-memory --verify "${common[@]}"
  fi
done
merge=runs/ccm-chunks/merge-recall-chunks-lr3e-4  # checkpoints/train_recall.sh merge-chunks (adapter not committed)
if [ -f "$merge/adapter.safetensors" ]; then
  $K eval --checkpoint "$merge" --data recall --baselines window other-memory --verify "${common[@]}"
fi
$K report runs/ccm --out runs/ccm/report
