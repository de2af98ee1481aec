#!/usr/bin/env bash
# `make sanitize`: AddressSanitizer + UndefinedBehaviorSanitizer over the native code.
#
#  1. builds fusedres._C with FUSEDRES_SANITIZE=1 (setup.py: -fsanitize=address,undefined -fno-omit-frame-pointer
#     -g -O1, CPU kernels) into $OUT (default build/sanitize); the in-place fusedres/_C*.so is left alone;
#  2. makes a shadow package $OUT/pkg/fusedres (links to the Python sources + the sanitized _C) and runs the tests
#     with it first on PYTHONPATH (python -P: the checkout's own fusedres/ is not on sys.path);
#  3. preloads the sanitizer runtimes (Python itself is not instrumented, so libasan must come first):
#       LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
#       ASAN_OPTIONS=detect_leaks=0:...   (CPython keeps objects alive to exit by design: leak reports are noise)
#     An ASan report aborts the test process; UBSan reports are collected in $OUT/ubsan.* and fail the run;
#  4. builds the CUDA-emulator test libraries with the same flags (CXX=tools/sanitize_cxx.sh) and runs them, once per
#     CPU kernel build this machine can run (ATEN_CPU_CAPABILITY=default, then the machine's best).
#
# Environment: PY (python, default .venv/bin/python), OUT, SANITIZE_TESTS (test files), SANITIZE_K (a -k filter),
# SANITIZE_QUICK=1 (the pre-push subset: fewer files, one CPU capability), SANITIZE_REUSE=1 (run the tests against
# the sanitized module already built, e.g. other test files after a full run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
OUT=${OUT:-build/sanitize}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [[ "${SANITIZE_QUICK:-0}" == 1 ]]; then
    default_tests="tests/test_bn_act_blocks.py tests/test_dense.py tests/test_cuda_emulated_split.py"
    caps="default"
else
    default_tests="tests/test_bn_act.py tests/test_bn_act_blocks.py tests/test_dense.py tests/test_highway.py
        tests/test_block_end.py tests/test_nan_inf.py tests/test_large_mean.py tests/test_properties.py
        tests/test_cuda_emulated.py tests/test_cuda_emulated_highway.py tests/test_cuda_emulated_split.py
        tests/test_cuda_emulated_block_end.py"
    caps="default native"
fi
TESTS=${SANITIZE_TESTS:-$default_tests}
# Compiling (torch.compile / Inductor) is not native code of ours and is slow under the sanitizers.
FILTER=${SANITIZE_K:-"not compile and not opcheck"}

# Only the CPU kernel builds this machine can run: without AVX-512 its build is left out (a third less to compile).
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then no_avx512=0; else no_avx512=1; fi
if [[ "${SANITIZE_REUSE:-0}" == 1 && -n "$(compgen -G "$OUT/lib/fusedres/_C*.so")" ]]; then
    echo "== SANITIZE_REUSE=1: the sanitized module already in $OUT (not rebuilt: it may predate source changes)"
else
    echo "== sanitized build into $OUT (log: $OUT/build.log; FUSEDRES_NO_AVX512=$no_avx512)"
    if ! FUSEDRES_NO_AVX512=$no_avx512 FUSEDRES_SANITIZE=1 FUSEDRES_CUDA=0 \
            "$PY" setup.py build_ext --build-lib "$OUT/lib" --build-temp "$OUT/temp" \
            > "$OUT/build.log" 2>&1; then
        tail -n 60 "$OUT/build.log"
        exit 1
    fi
fi

pkg="$OUT/pkg/fusedres"
rm -rf "$OUT/pkg"
mkdir -p "$pkg"
for f in "$ROOT"/fusedres/*; do
    case "$f" in
        *.so | */__pycache__) ;;
        *) ln -s "$f" "$pkg/" ;;
    esac
done
cp "$OUT"/lib/fusedres/_C*.so "$pkg/"

CXX_BIN=${SANITIZE_REAL_CXX:-g++}
export LD_PRELOAD="$("$CXX_BIN" -print-file-name=libasan.so) $("$CXX_BIN" -print-file-name=libubsan.so)"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:symbolize=1:detect_stack_use_after_return=0}
rm -f "$OUT"/ubsan.*
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:log_path=$OUT/ubsan}
export PYTHONPATH="$OUT/pkg${PYTHONPATH:+:$PYTHONPATH}"
export CXX="$ROOT/tools/sanitize_cxx.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

"$PY" -P -c "
import fusedres, fusedres._C as c
assert c.__file__.startswith('$OUT/pkg/'), c.__file__
assert fusedres.info()['native_loaded']
print('sanitized module:', c.__file__)"

status=0
for cap in $caps; do
    if [[ "$cap" == default ]]; then export ATEN_CPU_CAPABILITY=default; else unset ATEN_CPU_CAPABILITY; fi
    echo "== tests, CPU kernels: $("$PY" -P -c 'import fusedres; print(fusedres.info()["cpu_capability"])')"
    # shellcheck disable=SC2086
    "$PY" -P -m pytest -q -p no:cacheprovider -k "$FILTER" $TESTS || status=$?
done

if compgen -G "$OUT/ubsan.*" > /dev/null; then
    echo "== UndefinedBehaviorSanitizer reports:"
    cat "$OUT"/ubsan.*
    status=1
fi
echo "== sanitize: $([[ $status == 0 ]] && echo clean || echo FAILED)"
exit $status
