# The README's two commands: `make bench` (the main job) and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# CUDA_HOME: setup.py asks nvcc for its toolkit root when CUDA_HOME is unset (torch's PATH guess can be wrong).
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: install build test bench bench-onednn bench-pytest gpu-check gpu-model sass-report sass-check fuzz sanitize \
	hooks test-models clean

$(VENV)/.stamp-deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_PINS) ninja pybind11 pytest pytest-benchmark hypothesis numpy expecttest tqdm scikit-learn matplotlib timm==1.0.31
	touch $@

# The extension is rebuilt whenever a source changes (in place, for the editable install).
$(VENV)/.stamp-build: $(VENV)/.stamp-deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -v -e . > build.log 2>&1 || (tail -n 200 build.log; exit 1)
	grep -E "fusedres build:|warning" build.log || true
	if grep -q "fusedres build: cuda=yes" build.log; then $(PY) tools/ptxas_report.py build.log; fi
	$(PY) -c "import fusedres._C"
	touch $@

install: $(VENV)/.stamp-build

build: install

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m fusedres bench

# fusedres.batch_norm_act vs oneDNN's batch normalization with fused ReLU (NHWC, training, same run); downloads
# oneDNN into build/onednn (benchmarks/onednn/build.sh), not a dependency of the package.
bench-onednn: install
	PY=$(PY) benchmarks/onednn/build.sh
	MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 $(PY) benchmarks/onednn/compare.py

# Same allocator setting as `fusedres bench` (docs/design.md section 6: no page faults in the timings).
bench-pytest: install
	MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 $(PY) -m pytest benchmarks --benchmark-only

# Property-based tests with many examples (tests/test_properties.py, `make test` runs a few hundred): FUZZ_EXAMPLES
# per test (5 tests); random examples unless FUZZ_SEED is given; a failure prints its seed and a @reproduce_failure blob.
FUZZ_EXAMPLES ?= 5000
fuzz: install
	FUSEDRES_HYPOTHESIS_PROFILE=fuzz FUSEDRES_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_properties.py \
		--hypothesis-show-statistics $(if $(FUZZ_SEED),--hypothesis-seed=$(FUZZ_SEED))

# AddressSanitizer + UndefinedBehaviorSanitizer build of the native code into build/sanitize (the in-place module is
# untouched) and the CPU and CUDA-emulator tests against it; see tools/sanitize.sh. SANITIZE_QUICK=1: the CI subset.
sanitize: $(VENV)/.stamp-deps
	PY=$(PY) nice -n 19 tools/sanitize.sh

# The repository's git hooks (.githooks/pre-push: the quick sanitizer run before a push that changes csrc/).
hooks:
	git config core.hooksPath .githooks

# Every model under autocast and torch.compile, and the deep ImageNet models (tests marked exhaustive: too slow for
# `make test` on 2 CPU cores).
test-models: install
	FUSEDRES_EXHAUSTIVE=1 $(PY) -m pytest -q tests/test_every_model.py

# On a machine with an NVIDIA GPU and nvcc: build for that GPU, run the needs_cuda tests and the CUDA benchmarks.
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tools/gpu_check.sh

# Hot-loop instructions per element and load widths of every CUDA kernel from its sm_90 SASS (no GPU needed: nvcc
# -cubin per .cu, cached in build/sass_cache; a minute or two the first time); sass-check fails when a kernel's
# instructions per element grew more than 10 % over tools/sass_baseline.json (tools/sass_report.py).
sass-report: $(VENV)/.stamp-deps
	nice -n 19 $(PY) tools/sass_report.py

sass-check: $(VENV)/.stamp-deps
	nice -n 19 $(PY) tools/sass_report.py --check

# Modelled A100 / H100 time and bandwidth share of the CUDA ops per shape, layout and dtype (tools/gpu_model.py;
# launch counts from the emulator, instructions per element from tools/sass_baseline.json).
gpu-model: $(VENV)/.stamp-deps
	$(PY) tools/gpu_model.py $(GPU_MODEL_ARGS)

clean:
	rm -rf build *.egg-info fusedres/*.so $(VENV)/.stamp-build
