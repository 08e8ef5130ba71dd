"""Smoke test of the data-filter benchmark (``python benches/bench_filter.py``) at its quick size."""

import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).with_name("bench_filter.py")


def test_quick_filter_benchmark_prints_every_section():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    for section in ("corpus:", "signals", "stage 1", "end to end:", "MB/s"):
        assert section in out, out
