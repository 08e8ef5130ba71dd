"""Smoke test of ``deepseek-rs bench uss --quick``: one seed, 20 steps on captioned UCI digits."""

import pytest

pytest.importorskip("sklearn")


def test_quick_uss_benchmark_retrieves_far_above_chance(run_bench):
    proc, data = run_bench("uss")
    assert proc.stdout.startswith("machine: ") and "== text-to-image recall" in proc.stdout, proc.stdout
    # The captions follow from the bundled data set alone (label + 3 tertile properties).
    assert data["images"] == 1797 and data["test_images"] == 540 and data["distinct_captions"] == 201
    chance = 10 / data["test_images"]  # R@10 of a random ranking
    assert len(data["rows"]) == 6  # 3 methods x (all pairs, 250 pairs)
    for r in data["rows"]:
        assert 0 <= r["recall_at_1"] <= r["recall_at_5"] <= r["recall_at_10"] <= 1, r
        # 20 contrastive steps already rank the caption's image in the top 10 for about half the
        # queries (0.45-0.64 seen); under 10x chance the loss or the encoder does not learn.
        assert r["recall_at_10"] >= 10 * chance, r
    # Captions shared by several images cap the recall: 0.957 at R@10 on this split.
    assert 0.9 < data["ceiling"]["recall_at_10"] <= 1.0
