#!/usr/bin/env bash
# The GPU check (issue 16), for a lent GPU machine that reaches no package registry and already
# has torch, triton, numba, transformers and pytest: install Nexus without dependencies, run the
# CUDA tests and benchmarks/gpu.py, and write everything under $OUT (default gpu-results/).
# About 5 minutes; each part has its own time limit, so one that hangs cannot take the others.
#   device tool: run(command="bash benchmarks/gpu_check.sh", timeout_s=420)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} >"$OUT/machine.txt" 2>&1
# Wheels carried along beside the checkout (e.g. mambapy for the scan comparison), if any.
for wheel in gpu-wheels/*.whl; do
    [ -e "$wheel" ] && pip install --no-deps --quiet "$wheel" >>"$OUT/install.log" 2>&1
done
pip install --no-deps --quiet -e . >>"$OUT/install.log" 2>&1 || echo "install failed" >>"$OUT/install.log"

timeout 180 python -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_triton_scan.py \
    >"$OUT/tests.log" 2>&1
echo "tests exit $?" >>"$OUT/tests.log"
timeout 200 python benchmarks/gpu.py --quick --out "$OUT/gpu.json" >"$OUT/benchmark.log" 2>&1
echo "benchmark exit $?" >>"$OUT/benchmark.log"
tail -n 3 "$OUT/tests.log" "$OUT/benchmark.log"
