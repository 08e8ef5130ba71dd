#!/usr/bin/env bash
# The GPU checks of deepseek_rs.cuda in one command, run ON the device machine from the repo root:
#
#   bash scripts/gpu_check.sh [WHEEL_DIR]     (WHEEL_DIR defaults to wheels/)
#
# Before, on the build machine (the device machine cannot download anything):
#   python3 -m maturin build --release -o wheels      # the abi3 wheel, .cu sources inside
# and carry `wheels`. The device image already holds torch, CuPy (cupy-cuda13x), transformers,
# pytest, hypothesis and pytest-benchmark, so the wheel is installed without its dependencies.
#
# Steps: install the wheel, the gpu-marked tests against torch (from the installed package, so
# the packaged kernel sources are what runs; DAR's FlexAttention tests as a step of their own),
# then the GPU benchmark (`deepseek-rs bench gpu`) and DAR's latency table with its FlexAttention
# path. Logs go to $OUT too when it is set (the device tool returns the files under $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${1:-wheels}"
LOG_DIR="${OUT:-/tmp}"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" PYTHONUNBUFFERED=1

step() { printf '\n== %s\n' "$*"; }

step "device"
nvidia-smi -L || true
"$PY" -c 'import torch, cupy; print("torch", torch.__version__, "CUDA", torch.version.cuda, "| cupy", cupy.__version__)'

step "install $(ls "$WHEELS"/deepseek_rs-*.whl)"
"$PY" -m pip install --quiet --no-deps --no-index --force-reinstall "$WHEELS"/deepseek_rs-*.whl
# python/ is not on sys.path here, so `import deepseek_rs` is the installed wheel.
"$PY" -c 'import deepseek_rs.cuda as c; print("kernel sources:", c.kernel_dir()); print("unavailable:", c.unavailable_reason())'

step "tests marked gpu (CuPy kernels and the rest)"
status=0
"$PY" -m pytest tests -m gpu -q -p no:cacheprovider -x --ignore=tests/test_attention_flex.py 2>&1 \
  | tee "$LOG_DIR/gpu_tests.log" || status=$?

# its own step: a CuPy failure above (-x) must not skip the FlexAttention tests
step "tests marked gpu: DAR's FlexAttention path"
"$PY" -m pytest tests/test_attention_flex.py -m gpu -q -p no:cacheprovider 2>&1 \
  | tee "$LOG_DIR/gpu_tests_flex.log" || status=$?

# The benchmarks from the installed wheel (`deepseek-rs bench`); `bench gpu` exits with 77 when
# the CUDA path cannot run here, with the reason on stderr.
step "benchmark"
"$PY" -m deepseek_rs bench gpu --json "$LOG_DIR/bench_gpu.json" 2>&1 | tee "$LOG_DIR/bench_gpu.md" || status=$?

step "DAR latency: SDPA, gather path, FlexAttention path"
"$PY" -m deepseek_rs bench attention --section latency --device cuda --backend flex 2>&1 \
  | tee "$LOG_DIR/bench_attention_flex.md" || status=$?
exit "$status"
