#!/usr/bin/env bash
# The one GPU check: native kernel tests, then the low-rank table, the rSVD table and the sweep
# benchmark, each writing its JSON under OUT as soon as it finishes. Fits one 10-minute device
# call on an H200 (each stage has its own time bound; the sum is under 9 minutes). The paper's
# recall toy at full size (`--preset paper`) is the stage `paper`, outside the default list so
# that the kernel stages keep their budget: it is a second call of its own.
#
#   bash benchmarks/gpu_check.sh OUT                   # on a CUDA machine: tests,lowrank,svd,sweep
#   bash benchmarks/gpu_check.sh --stages paper OUT    # the recall toy's paper preset (420 s bound)
#   bash benchmarks/gpu_check.sh --dry-run [--stages LIST] OUT
#                                # the same script on the CPU: Triton's interpreter, tiny shapes
#                                # (tests/test_bench_gpu_check.py runs every stage this way)
#
# OUT/env.txt (commit, versions, device), OUT/tests.txt, OUT/lowrank.json + lowrank.txt (markdown
# table for benchmarks/RESULTS.md), OUT/calibration.json + calibration.txt (the planner's cost
# model fitted to the low-rank times), OUT/svd/results.json + svd.txt, OUT/sweep/results.json + sweep.txt,
# OUT/recall/results.json + recall.txt (stage paper), OUT/status.txt (one line per stage). Runs
# from the working tree; PYTHON overrides the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash benchmarks/gpu_check.sh [--dry-run] [--stages LIST] OUT (stages: tests,lowrank,svd,sweep,paper)"
dry=0
stages="tests,lowrank,svd,sweep"
while [ $# -gt 1 ]; do
    case "$1" in
        --dry-run) dry=1; shift ;;
        --stages) stages="${2:?$usage}"; shift 2 ;;
        *) echo "unknown option $1; $usage" >&2; exit 2 ;;
    esac
done
out="${1:?$usage}"
for s in ${stages//,/ }; do
    case "$s" in
        tests|lowrank|svd|sweep|paper) ;;
        *) echo "stage $s is not a stage; allowed: tests, lowrank, svd, sweep, paper" >&2; exit 2 ;;
    esac
done
wants() { [[ ",$stages," == *",$1,"* ]]; }
mkdir -p "$out"
py="${PYTHON:-python}"
status="$out/status.txt"
: >"$status"

# `import fasttrunc` succeeds from the repository root without an install; fasttrunc.kernels
# (package-dir mapping kernels/ -> fasttrunc.kernels) does not: check that one, install if needed.
if ! "$py" -c "import fasttrunc.kernels" 2>/dev/null; then
    "$py" -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed" | tee -a "$status"; exit 1; }
    "$py" -c "import fasttrunc.kernels" || { echo "fasttrunc.kernels not importable after install" | tee -a "$status"; exit 1; }
fi

if [ "$dry" = 1 ]; then
    export TRITON_INTERPRET=1 FASTTRUNC_TEST_NATIVE=0
    t_tests=120 t_lowrank=120 t_svd=180 t_sweep=60
    tests=(tests/test_lowrank_kernel.py -k "splitk_is_reusable or three_d")
    lowrank_flags=(--tiny)
    svd_flags=(--tiny --no-full-svd)
    sweep_flags=(--help)  # bench_sweep.py has no tiny model: the dry run checks that it starts
    t_paper=120
    paper_flags=(--preset paper-small --steps 3 --device cpu)  # the stage's plumbing, at toy size
else
    export FASTTRUNC_TEST_NATIVE=1
    unset TRITON_INTERPRET
    t_tests=150 t_lowrank=190 t_svd=110 t_sweep=70
    tests=(tests/test_lowrank_kernel.py tests/test_svd_kernel.py tests/test_cholqr_kernel.py -m "not aot")
    lowrank_flags=()
    svd_flags=()
    sweep_flags=(--layers 4 --out "$out/sweep")
    t_paper=420
    paper_flags=(--preset paper --device cuda)
fi

{
    git rev-parse HEAD 2>/dev/null || echo "commit unknown"
    date -u +%Y-%m-%dT%H:%M:%SZ
    "$py" - <<'PY'
import torch, triton
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (Triton interpreter)"
print("torch", torch.__version__, "triton", triton.__version__, "device", device)
PY
} | tee "$out/env.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time bound, record its exit status
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "$name exit $rc ($((SECONDS - start)) s of $limit)" >>"$status"
    return $rc
}

failed=0
if wants tests; then
    stage tests "$t_tests" "$py" -m pytest -q -x -p no:cacheprovider "${tests[@]}" >"$out/tests.txt" 2>&1 || failed=1
    tail -n 5 "$out/tests.txt"
fi
if wants lowrank; then
    stage lowrank "$t_lowrank" "$py" benchmarks/bench_lowrank.py "${lowrank_flags[@]}" --json "$out/lowrank.json.tmp" \
        >"$out/lowrank.txt" 2>"$out/lowrank.err" && mv "$out/lowrank.json.tmp" "$out/lowrank.json" || failed=1
    if [ -f "$out/lowrank.json" ]; then  # the planner's cost model fitted to these times (CPU, seconds)
        stage calibrate 60 "$py" benchmarks/calibrate_lowrank.py "$out/lowrank.json" --json "$out/calibration.json" \
            >"$out/calibration.txt" 2>"$out/calibration.err" || failed=1
    fi
fi
if wants svd; then
    COLUMNS=200 stage svd "$t_svd" "$py" benchmarks/bench_svd.py "${svd_flags[@]}" --out "$out/svd" \
        >"$out/svd.txt" 2>"$out/svd.err" || failed=1
fi
if wants sweep; then
    COLUMNS=200 stage sweep "$t_sweep" "$py" benchmarks/bench_sweep.py "${sweep_flags[@]}" \
        >"$out/sweep.txt" 2>"$out/sweep.err" || failed=1
fi
if wants paper; then
    COLUMNS=200 stage paper "$t_paper" "$py" -m fasttrunc.cli.main run recall "${paper_flags[@]}" --out "$out/recall" \
        >"$out/recall.txt" 2>"$out/recall.err" || failed=1
fi
cat "$status"
exit $failed
