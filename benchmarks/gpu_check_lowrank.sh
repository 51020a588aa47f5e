#!/usr/bin/env bash
# One command on a CUDA machine: the fused low-rank linear's tests natively on the GPU (every test
# of tests/test_lowrank_kernel.py, bf16 and CUDA graphs included), then the benchmark table.
#
#   bash benchmarks/gpu_check_lowrank.sh [OUT_DIR] [--quick]
#
# Writes OUT_DIR/env.txt, pytest.txt, table.txt (markdown table for RESULTS.md, last) and
# lowrank.json (OUT_DIR defaults to $OUT, else benchmarks/out-lowrank). Runs from the working
# tree: installs it editable without dependencies when `import fasttrunc` fails (no network).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/out-lowrank}}"
quick="${2:-}"
mkdir -p "$out"
python -c "import fasttrunc" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e . || exit 1
{ git rev-parse HEAD 2>/dev/null || echo "commit unknown"; python - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name(0))
PY
} | tee "$out/env.txt"
# Native kernels (the interpreter off): the whole file, so the CPU tests also run compiled.
FASTTRUNC_TEST_NATIVE=1 timeout 180 python -m pytest -q -x -p no:cacheprovider \
    tests/test_lowrank_kernel.py 2>&1 | tail -n 40 | tee "$out/pytest.txt"
tests_rc=${PIPESTATUS[0]}
timeout 380 python benchmarks/bench_lowrank.py $quick --json "$out/lowrank.json" \
    2>"$out/bench_stderr.txt" | tee "$out/table.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, bench exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
