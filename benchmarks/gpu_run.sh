#!/usr/bin/env bash
# One lent-GPU session in one call: the kernel tests on CUDA, then benchmarks/kernels.py,
# benchmarks/layers.py and benchmarks/attention.py (and, when STEPS names it, benchmarks/tune.py).
# Runs from the repository root without installing (a PYTHONPATH shim maps rotq.* onto the
# source folders); logs and JSON go to $OUT (default ./gpu-out). Each step has its own time limit
# so that one slow step cannot eat the others' time; a failing kernel or configuration is
# reported in its row and the others still run. The defaults take about 3 minutes on an H200.
#   [STEPS="kernel_tests tune kernels_bench layers_bench attention_bench"] [TUNE_S=130] \
#     bash benchmarks/gpu_run.sh [TESTS_S KERNELS_S LAYERS_S ATTENTION_S]
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
shim=$(mktemp -d); mkdir "$shim/rotq"; touch "$shim/rotq/__init__.py"
for d in quant export kernels serving; do ln -s "$PWD/$d" "$shim/rotq/$d"; done
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=$(command -v python3)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}
want() { [[ " ${STEPS:-kernel_tests kernels_bench layers_bench attention_bench} " == *" $1 "* ]]; }
want kernel_tests && step kernel_tests "${1:-110}" $py -m pytest tests/kernels tests/serving/test_kv4_backend.py -q -n 8 \
  -p no:cacheprovider -k "not compiles_for" --tb=short -rfE
want tune && TAIL=60 step tune "${TUNE_S:-240}" $py benchmarks/tune.py --json "$OUT/tune.json"
want kernels_bench && step kernels_bench "${2:-130}" $py benchmarks/kernels.py --models llama3-8b square --json "$OUT/kernels.json"
want layers_bench && TAIL=40 step layers_bench "${3:-110}" $py benchmarks/layers.py --json "$OUT/layers.json"
want attention_bench && TAIL=40 step attention_bench "${4:-90}" $py benchmarks/attention.py --json "$OUT/attention.json"
