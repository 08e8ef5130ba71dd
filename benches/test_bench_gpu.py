"""Smoke test of the GPU benchmark (``python benches/bench_gpu.py``): the quick sizes on a CUDA
device, and without one the clear refusal (exit status 1, nothing measured)."""

import pathlib
import subprocess
import sys

from deepseek_rs import cuda as ds_cuda

BENCH = pathlib.Path(__file__).with_name("bench_gpu.py")


def test_quick_gpu_benchmark():
    run = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=600)
    if not ds_cuda.is_available():
        assert run.returncode == 1, run.stdout + run.stderr
        assert "nothing measured" in run.stderr and ds_cuda.unavailable_reason() in run.stderr
        return
    assert run.returncode == 0, run.stdout + run.stderr
    for section in ("device:", "== GEMM", "== grouped GEMM", "== MoE layer forward", "torch.matmul"):
        assert section in run.stdout, run.stdout
