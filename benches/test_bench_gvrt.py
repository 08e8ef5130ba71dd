"""Smoke test of ``deepseek-rs bench gvrt --quick``: 40 steps, 1 seed, 10% corrupted batches."""

import importlib.util
import math

import pytest
from deepseek_rs.bench import common, gvrt


def test_quick_gvrt_benchmark_clips_every_spike_and_beats_no_clipping(run_bench, tmp_path):
    plot = [] if importlib.util.find_spec("matplotlib") else ["--no-plot"]
    proc, data = run_bench("gvrt", "--out", str(tmp_path / "plots"), *plot)
    assert proc.stdout.startswith("machine: ") and "== held-out loss" in proc.stdout, proc.stdout
    # The corrupted steps are drawn from a seeded generator: 5 of the 40.
    (corrupted,) = data["corrupted_steps"]
    assert corrupted == 5
    rows = {r["method"]: r for r in data["rows"]}
    for name, r in rows.items():
        # Finite and better than a uniform guess over 256 bytes (8 bits per byte).
        assert math.isfinite(r["final_mean"]) and r["final_mean"] < 8.0, (name, r)
    for name in ("GVRT", "GVRT, clip only", 'GVRT, "zscore"'):
        # A corrupted step's gradient norm is ~25x a clean one's: GVRT must clip every one of them,
        # and few clean steps besides (1 seen).
        assert rows[name]["clipped_corrupted_steps"] == [corrupted], rows[name]
        assert rows[name]["clipped_steps"][0] <= corrupted + 3, rows[name]
        # Unclipped, the spikes cost 1.7 bits/byte (6.01 against 4.29 clean); GVRT recovers most.
        assert rows[name]["final_mean"] <= rows["no clipping"]["final_mean"] - 0.5, rows
    assert rows["fixed clip 1.0"]["clipped_corrupted_steps"] == [corrupted]
    assert rows["no clipping"]["clipped_steps"] == [0]
    assert rows["clean data"]["final_mean"] < rows["no clipping"]["final_mean"]
    if not plot:
        png = tmp_path / "plots" / "gvrt_loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and data["plot"] == str(png)
    assert not list(tmp_path.glob("*.png"))  # nothing written outside --out


def test_gvrt_without_matplotlib_names_the_extra_before_training(monkeypatch):
    monkeypatch.setattr(common, "has_module", lambda name: name != "matplotlib")
    with pytest.raises(common.MissingExtra, match=r"pip install 'deepseek-rs\[bench\]', or pass --no-plot"):
        gvrt.main(["--quick"])
