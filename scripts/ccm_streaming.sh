#!/usr/bin/env bash
# CCM streaming on long text (README "Streaming"): sinks + a recent window + the compressed older chunks, against
# StreamingLLM at exactly the same KV budget (4 sinks + 132 recent = 136 slots = 4 sinks + 128 window + n = 4 merged
# slots), and full attention; wiki test split, 4 blocks of 1024 tokens, chunks of 64.
set -eu
cd "$(dirname "$0")/.."
K=".venv/bin/kvcondense"
common=(--data wiki --block-tokens 1024 --max-tokens 4096 --batch-size 1)
$K eval --checkpoint checkpoints/merge-chitchat --window 128 --sinks 4 --verify "${common[@]}"
$K eval --method streaming --sinks 4 --slots 136 "${common[@]}"
$K eval --checkpoint checkpoints/concat-chitchat --window 128 --sinks 4 "${common[@]}"
$K eval --method full "${common[@]}"
