"""Smoke test of ``deepseek-rs bench quant --quick``: one seed, 3 epochs on UCI digits."""

import math

import pytest

pytest.importorskip("sklearn")


def test_quick_quant_benchmark_keeps_the_accuracy_in_int8(run_bench):
    proc, data = run_bench("quant")
    assert proc.stdout.startswith("machine: ") and "== latency" in proc.stdout, proc.stdout
    acc = data["accuracy"]
    # 3 epochs of this network reach about 94% on the 540 held-out digits (10 classes): below
    # 90% the training itself is broken.
    assert acc["fp32"] >= 0.90, acc
    # int8 weights and activations cost at most a few of the 540 test images: PTQ within 3%,
    # QAT within 1.5% of fp32 (the article: QAT keeps 99.2%); more is a broken quantized path.
    assert acc["ptq_of_fp32"] >= 0.97, acc
    assert acc["qat_of_fp32"] >= 0.985, acc
    mem = data["memory"]
    # int8 weights with per-row scales: about a quarter of the fp32 bytes (biases stay fp32).
    assert mem["network_int8"] / mem["network_fp32"] < 0.3, mem
    assert mem["layer_int8"] / mem["layer_fp32"] < 0.3, mem
    for row in data["latency"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
