"""Smoke test of the GVRT benchmark (``python benches/bench_gvrt.py``) at its quick sizes."""

import importlib.util
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).with_name("bench_gvrt.py")


def test_quick_gvrt_benchmark_prints_every_method(tmp_path):
    png = tmp_path / "curves.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *plot],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    for section in ("== held-out loss", "no clipping", "fixed clip 1.0", "GVRT, clip only", "gradient norm"):
        assert section in out, out
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
