"""Smoke test of the INT8 benchmark (``python benches/bench_quant.py``) at its quick sizes."""

import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).with_name("bench_quant.py")


def test_quick_quant_benchmark_prints_every_section():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    for section in ("== accuracy", "== memory", "== latency", "PTQ int8", "QAT int8", "of fp32"):
        assert section in out, out
