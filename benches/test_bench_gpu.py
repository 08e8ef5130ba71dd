"""Smoke test of ``deepseek-rs bench gpu --quick``: the quick sizes on a CUDA device, and without
one the clear refusal (exit status 77, a reason, no traceback, nothing measured)."""

import math

from deepseek_rs import cuda as ds_cuda
from deepseek_rs.bench.gpu import NO_DEVICE


def test_quick_gpu_benchmark(run_bench):
    proc, data = run_bench("gpu", timeout=600, check=False)
    if not ds_cuda.is_available():
        assert proc.returncode == NO_DEVICE == 77, proc.stdout + proc.stderr
        assert "nothing measured" in proc.stderr and ds_cuda.unavailable_reason() in proc.stderr
        assert "Traceback" not in proc.stderr and "== GEMM" not in proc.stdout
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for section in ("device:", "== GEMM", "== grouped GEMM", "== MoE layer forward", "torch.matmul"):
        assert section in proc.stdout, proc.stdout
    assert data["machine"]["gpu"]  # the device name beside the numbers
    # Each pair of results was checked to agree before it was timed; our side always runs.
    for row in data["rows"]:
        assert row["time_s"] is not None and math.isfinite(row["time_s"]) and row["time_s"] > 0, row
    assert any(r["ratio"] for r in data["rows"] if r["section"] == "GEMM")
