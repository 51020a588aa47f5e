#!/usr/bin/env bash
# One command on a CUDA machine: the SVD tests natively on the GPU, then the benchmark table.
#
#   bash benchmarks/gpu_check_svd.sh [OUT_DIR]
#
# Writes OUT_DIR/pytest.txt, OUT_DIR/results.json and OUT_DIR/table.txt (OUT_DIR defaults to $OUT,
# else benchmarks/out-svd). Runs from the working tree: installs it editable without dependencies
# when `import fasttrunc` fails (the GPU machine has no network). The timeouts (200 s tests, 360 s
# bench) keep the whole script inside one 10-minute device call.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/out-svd}}"
mkdir -p "$out"
python -c "import fasttrunc" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e . || exit 1
python - <<'PY' | tee "$out/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name(0))
PY
# Native kernels (the interpreter off), the gpu-marked tests only: the CPU ones ran in CI.
FASTTRUNC_TEST_NATIVE=1 timeout 200 python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_svd_kernel.py tests/test_svd_accuracy.py 2>&1 | tee "$out/pytest.txt"
tests_rc=${PIPESTATUS[0]}
COLUMNS=200 timeout 360 python benchmarks/bench_svd.py --out "$out" 2>"$out/bench_stderr.txt" | tee "$out/table.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, bench exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
