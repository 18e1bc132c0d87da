# Sourced by the *_table.sh scripts: score kvpress presses on tasks kvcondense exported, in the peer venv
# (`make peers`), on the embedded default model.
#   run_presses TASKS OUT "PRESS ..." KEPT...
run_presses() {
  local tasks=$1 out=$2 presses=$3
  shift 3
  local model
  model=$(.venv/bin/python -c 'from kvcondense.models import resolve_model; print(resolve_model("smollm2-135m"))')
  # shellcheck disable=SC2086  # the presses are words
  benchmarks/peers/kvpress/.venv/bin/python benchmarks/peers/kvpress/run_presses.py \
    --tasks "$tasks" --model "$model" --presses $presses --kept "$@" --out "$out"
}
