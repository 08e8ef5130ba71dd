"""Smoke test of the dynamic batching benchmark (``python benches/bench_batching.py``) at its quick sizes."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

BENCH = pathlib.Path(__file__).with_name("bench_batching.py")


def test_quick_batching_benchmark_checks_every_answer_and_prints_the_table():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    for section in (
        "| closed c=1 |",
        "| closed c=8 |",
        "| Poisson",
        "none lost or answered twice",
        "made the model raise got 500",
        "bare",
        "us per request",
    ):
        assert section in out, out
