#!/usr/bin/env bash
# One-command GPU check (`make gpu-check`), for a machine with an NVIDIA GPU, nvcc and a Python that has torch:
#   1. builds the extension with the CUDA kernels for this GPU's compute capability (FUSEDRES_CUDA=1), offline;
#   2. checks the ptxas figures of that build (tools/ptxas_report.py: no spills, no local memory);
#   3. runs the needs_cuda tests (CUDA vs CPU parity);
#   4. runs the CUDA benchmarks (python -m fusedres bench --device cuda: one table, achieved GB/s against the
#      device's measured copy bandwidth);
#   5. prints the model of tools/gpu_model.py (`make gpu-model`) with the measured time of the same op calls beside
#      it (A100, H100 or H200 by the device name; another GPU is skipped). The measurement is kept simple: median
#      wall time of the functional call between two synchronisations (backward: forward + backward minus forward),
#      so it includes the Python and autograd overhead the model does not count. Not run yet: no GPU so far.
# Nothing is downloaded: pip runs with --no-index --no-build-isolation --no-deps.
#
# Knobs: PYTHON (default .venv/bin/python, else python3), TORCH_CUDA_ARCH_LIST (default: this GPU's capability),
# GPU_CHECK_BENCH_ARGS (default --quick; empty for the full benchmark), GPU_CHECK_LOG (default build-gpu.log).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
LOG=${GPU_CHECK_LOG:-build-gpu.log}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS---quick}

step() { printf '\n=== gpu-check: %s\n' "$*"; }
die() { printf 'gpu-check: %s\n' "$*" >&2; exit 1; }

step "environment"
"$PY" -c "import torch" 2>/dev/null || die "$PY cannot import torch (set PYTHON to an interpreter that has it)"
if [[ -z "${CUDA_HOME:-}" ]]; then
  NVCC=$(command -v nvcc || true)
  [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
  [[ -n "$NVCC" ]] || die "nvcc not found (put it on PATH or set CUDA_HOME)"
  # Ask nvcc for its toolkit root: the nvcc on PATH may be a wrapper script outside the toolkit.
  TOP=$("$NVCC" -v --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  CUDA_HOME=$(readlink -f "${TOP:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}")
fi
export CUDA_HOME
"$CUDA_HOME/bin/nvcc" --version | tail -n 2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
CAP=$("$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}")
EOF
) || die "no usable GPU"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
export FUSEDRES_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
echo "device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'), compute capability $CAP;" \
  "building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with CUDA_HOME=$CUDA_HOME, torch $("$PY" -c 'import torch; print(torch.__version__)')"

step "build (log: $LOG)"
if ! "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . >"$LOG" 2>&1; then
  tail -n 200 "$LOG"
  die "build failed (full log: $LOG)"
fi
grep -E "^fusedres build|warning" "$LOG" || true
"$PY" - <<'EOF'
import fusedres
info = fusedres.info()
assert info["native_loaded"], f"fusedres._C did not load: {info['native_error']}"
assert info["cuda_compiled"], "fusedres._C was built without the CUDA kernels"
print("fusedres._C loaded with CUDA kernels for", info.get("cuda_archs", "?"))
EOF

step "ptxas resources (no spills, no local memory)"
"$PY" tools/ptxas_report.py "$LOG"

step "needs_cuda tests"
"$PY" -m pytest -q -m needs_cuda tests

step "CUDA benchmarks ($PY -m fusedres bench --device cuda $BENCH_ARGS)"
# shellcheck disable=SC2086
"$PY" -m fusedres bench --device cuda $BENCH_ARGS

step "model vs measured (tools/gpu_model.py --measure)"
GPU_KEY=$("$PY" -c 'import torch; n = torch.cuda.get_device_name().upper()
print(next((k for k in ("A100", "H100", "H200") if k in n), "").lower())')
if [[ -n "$GPU_KEY" ]]; then
  "$PY" tools/gpu_model.py --gpu "$GPU_KEY" --measure --kernels
else
  echo "gpu-check: no model for $("$PY" -c 'import torch; print(torch.cuda.get_device_name())') (A100, H100, H200 only)"
fi

step "all passed"
