"""Smoke test of the USS benchmark (``python benches/bench_uss.py``) at its quick sizes."""

import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).with_name("bench_uss.py")


def test_quick_uss_benchmark_prints_every_method():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    for section in ("== text-to-image recall", "two-tower", "USS, no consistency", "250 pairs", "ceiling"):
        assert section in out, out
