"""Smoke test of the attention benchmark (``python benches/bench_attention.py``) at its quick sizes."""

import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).with_name("bench_attention.py")


def test_quick_attention_benchmark_prints_every_section():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    for section in (
        "== latency",
        "== quality",
        "| DAR |",
        "| dense (SDPA) |",
        "of the pairs",
        "products computed",
        "DAR / SDPA",
    ):
        assert section in out, out


@pytest.mark.slow
def test_quick_latency_with_the_flex_backend_times_the_gather_baseline():
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--section",
            "latency",
            "--backend",
            "flex",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    assert "backend='flex'" in out and "flex / gather" in out, out
    assert out.count("\n| 256 |") == 1 and out.count("\n| 512 |") == 1, out
