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
# the packaged kernel sources are what runs), then the GPU benchmark and DAR's latency table
# with its FlexAttention path. Logs go to $OUT too when
# it is set (the device tool returns the files under $OUT).
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

step "tests marked gpu"
status=0
"$PY" -m pytest tests -m gpu -q -p no:cacheprovider -x 2>&1 | tee "$LOG_DIR/gpu_tests.log" || status=$?

step "benchmark"
"$PY" benches/bench_gpu.py 2>&1 | tee "$LOG_DIR/bench_gpu.md" || status=$?

step "DAR latency: SDPA, gather path, FlexAttention path"
"$PY" benches/bench_attention.py --section latency --device cuda --backend flex 2>&1 \
  | tee "$LOG_DIR/bench_attention_flex.md" || status=$?
exit "$status"
