"""The filter's stages one by one: density thresholds, domain screens, hard-example mining, config."""

import numpy as np
import pytest
from deepseek_rs import InvalidValueError, ShapeError
from deepseek_rs.datafilter import (
    KEEP,
    SIGNAL_NAMES,
    DensityFilter,
    DSIRDomainFilter,
    FilterConfig,
    HashedEmbedder,
    LDADomainFilter,
    Threshold,
    compute_signals,
    mine_hard_examples,
)
from deepseek_rs.datafilter.density import DEFAULT_THRESHOLDS
from hypothesis import given
from hypothesis import strategies as st

PROSE = (
    "The committee met on Tuesday to review the budget for the coming year. Members raised questions "
    "about spending on roads, schools and the new library. After a long discussion they agreed to "
    "publish a revised plan next month, with more detail on how each department will use its funds. "
    "Residents may send comments by mail or attend the public hearing in the town hall."
)
COOKING = [
    f"Whisk {n} eggs with sugar, fold in the flour and butter, then bake the cake in a hot oven for {m} "
    "minutes until golden. Let the dough rest, season the sauce with salt and pepper, and simmer the soup. "
    "Serve the bread warm with fresh herbs, olive oil and a pinch of garlic."
    for n, m in zip(range(2, 30), range(20, 48))
]
FINANCE = [
    f"The central bank raised interest rates by {n} basis points as inflation in bond markets rose. "
    "Investors sold equities, the currency strengthened, and analysts cut their earnings forecasts for "
    "banks and insurers while credit spreads widened."
    for n in range(10, 38)
]


def reference_decision(signals_row, thresholds):
    cjk = signals_row[SIGNAL_NAMES.index("cjk_char_frac")] >= 0.3
    for t in thresholds:
        v = signals_row[SIGNAL_NAMES.index(t.signal)]
        if not t.applies_to_cjk and cjk:
            continue
        if t.min is not None and v < t.min:
            return f"{t.signal}<{t.min:g}"
        if t.max is not None and v > t.max:
            return f"{t.signal}>{t.max:g}"
    return None


@given(
    st.lists(
        st.sampled_from(
            [
                PROSE,
                PROSE + "\n" + PROSE,
                "short text.",
                "buy now " * 80,
                "模型" * 60 + "。",
                COOKING[0],
                "# # # ... " * 20,
                "",
            ]
        ),
        max_size=8,
    )
)
def test_density_filter_drops_by_the_first_failing_threshold(docs):
    f = DensityFilter()
    signals, codes = f(docs)
    for row, code in zip(signals, codes):
        want = reference_decision(row, DEFAULT_THRESHOLDS)
        assert (None if code == KEEP else f.reasons[code]) == want


def test_density_defaults_keep_prose_and_drop_spam():
    f = DensityFilter()
    _, codes = f([PROSE, "buy now " * 80, "x"])
    assert codes[0] == KEEP
    assert f.reasons[codes[1]].startswith(("dup_", "top_", "word_entropy", "compression"))
    assert f.reasons[codes[2]] == "n_words<50"


def test_cjk_documents_skip_the_word_length_rule():
    zh = "信息熵可以衡量文本的语义密度，低密度的文本会被过滤。" * 3 + "\n这是一个关于数据清洗的例子。"
    f = DensityFilter([Threshold("mean_word_length", 3, 10, applies_to_cjk=False)])
    assert f([zh])[1][0] == KEEP
    assert DensityFilter([Threshold("mean_word_length", 3, 10)])([zh])[1][0] != KEEP


def test_bad_thresholds_and_signals_are_rejected():
    with pytest.raises(InvalidValueError, match="unknown signal"):
        Threshold("no_such_signal", 1)
    with pytest.raises(InvalidValueError, match="min or a max"):
        Threshold("n_words")
    with pytest.raises(InvalidValueError, match="finite"):
        Threshold("n_words", float("nan"))
    with pytest.raises(InvalidValueError):
        DensityFilter().decide(np.zeros((3, 2)))


@pytest.mark.parametrize("score", ["likelihood", "mixture"])
def test_lda_screen_prefers_the_reference_domain(score):
    lda = LDADomainFilter(topics=4, buckets=4096, keep_quantile=0.1, score=score).fit(COOKING)
    cook, fin = lda.score(COOKING[:5]), lda.score(FINANCE[:5])
    assert cook.min() > fin.max()
    assert lda.keep(COOKING[:5]).all() and not lda.keep(FINANCE[:5]).any()
    if score == "mixture":
        assert ((0 <= cook) & (cook <= 1)).all()
    else:  # mean log2-probability of a feature
        assert (cook < 0).all() and lda.score([""])[0] == -np.inf


def test_lda_likelihood_is_the_mean_log_probability_of_the_features():
    from deepseek_rs.datafilter.domain import hashed_matrix

    lda = LDADomainFilter(topics=3, buckets=512).fit(COOKING)
    docs = COOKING[:2] + FINANCE[:2]
    x = hashed_matrix(docs, 512).toarray()
    p = lda.lda.transform(hashed_matrix(docs, 512)) @ lda.topic_words
    want = (x * np.log2(p)).sum(axis=1) / x.sum(axis=1)
    np.testing.assert_allclose(lda.score(docs), want, rtol=1e-10)


def test_dsir_screen_prefers_the_reference_domain():
    dsir = DSIRDomainFilter(buckets=1 << 12, keep_quantile=0.1).fit(COOKING, COOKING[:10] + FINANCE)
    assert dsir.score(COOKING[10:15]).min() > dsir.score(FINANCE[:5]).max()
    assert dsir.keep(COOKING[10:15]).all() and not dsir.keep(FINANCE[:5]).any()
    assert dsir.score([""]).tolist() == [0.0]


def test_unfit_screens_and_bad_arguments_raise():
    with pytest.raises(InvalidValueError, match="not fit"):
        LDADomainFilter().score(["a"])
    with pytest.raises(InvalidValueError, match="not fit"):
        DSIRDomainFilter().keep(["a"])
    with pytest.raises(InvalidValueError):
        LDADomainFilter(keep_quantile=1.5)
    with pytest.raises(InvalidValueError, match="likelihood"):
        LDADomainFilter(score="cosine")
    with pytest.raises(ValueError):
        _ = __import__("deepseek_rs")._core.hashed_features(["a"], 0)


def test_semdedup_removes_near_duplicates_and_keeps_the_hardest():
    emb = HashedEmbedder(dim=64, buckets=1 << 12)
    docs = COOKING[:10] + [COOKING[0]] * 3 + FINANCE[:10]
    r = mine_hard_examples(emb(docs), clusters=2, dedup_threshold=0.99, keep_fraction=0.5)
    assert (r.decision[[0, 10, 11, 12]] == 1).sum() == 3  # one of the four copies stays
    kept = r.decision == 0
    assert kept.sum() == np.ceil(0.5 * 10) * 2
    for c in np.unique(r.cluster):
        inside = (r.cluster == c) & (r.decision != 1)
        # every kept document is at least as far from the prototype as every pruned one
        assert r.difficulty[inside & kept].min() >= r.difficulty[inside & ~kept].max()


def test_semdedup_reference_on_random_embeddings():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    r = mine_hard_examples(x, clusters=3, dedup_threshold=0.9, keep_fraction=1.0)
    for c in range(3):
        idx = np.flatnonzero(r.cluster == c)
        order = idx[np.argsort(-r.difficulty[idx], kind="stable")]
        for pos, i in enumerate(order):
            earlier = order[:pos]
            want = bool(len(earlier)) and float((x[earlier] @ x[i]).max()) > 0.9
            assert (r.decision[i] == 1) == want


def test_hard_example_arguments_are_checked():
    with pytest.raises(ShapeError):
        mine_hard_examples(np.zeros(3))
    with pytest.raises(InvalidValueError):
        mine_hard_examples(np.zeros((3, 2)), keep_fraction=0.0)
    assert len(mine_hard_examples(np.zeros((0, 4))).decision) == 0


def test_config_validates_every_field(tmp_path):
    c = FilterConfig.from_mapping(
        {
            "density": {"thresholds": {"n_words": {"min": 10}, "dup_line_frac": None}},
            "domain": {"enabled": True, "method": "dsir", "reference": "ref.jsonl"},
            "hard_examples": {"enabled": True, "clusters": 5},
        },
        base_dir=tmp_path,
    )
    names = [t.signal for t in c.thresholds]
    assert "dup_line_frac" not in names and c.thresholds[names.index("n_words")].min == 10
    assert c.domain == "dsir" and c.reference == [str(tmp_path / "ref.jsonl")] and c.clusters == 5
    for bad in (
        {"nope": 1},
        {"output": {"compression": "bz2"}},
        {"density": {"thresholds": {"x": {"min": 1}}}},
        {"hard_examples": {"enabled": True, "keep_fraction": 2}},
        {"domain": {"enabled": True}},
        {"batch_docs": 0},
        {"density": {"thresholds": {"n_words": 5}}},
    ):
        with pytest.raises(InvalidValueError):
            FilterConfig.from_mapping(bad)


def test_signals_of_an_empty_batch():
    assert compute_signals([]).shape == (0, len(SIGNAL_NAMES))


@given(st.lists(st.text(max_size=80), max_size=6), st.integers(1, 50))
def test_dsir_weights_are_the_hashed_counts_times_the_log_ratio(texts, buckets):
    from deepseek_rs import _core

    log_ratio = np.random.default_rng(buckets).normal(size=buckets)
    indptr, idx, counts = _core.hashed_features(texts, buckets)
    want = np.array([(counts[a:b] * log_ratio[idx[a:b]]).sum() for a, b in zip(indptr[:-1], indptr[1:])])
    n = np.array([counts[a:b].sum() for a, b in zip(indptr[:-1], indptr[1:])])
    np.testing.assert_allclose(_core.dsir_log_importance(texts, log_ratio), want, rtol=1e-12, atol=1e-12)
    per = _core.dsir_log_importance(texts, log_ratio, per_feature=True)
    want_per = np.divide(want, n, out=np.zeros_like(want), where=n > 0)
    np.testing.assert_allclose(per, want_per, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="finite"):
        _core.dsir_log_importance(texts, np.full(buckets, np.nan))


def test_config_types_are_checked_one_line_each(tmp_path):
    assert FilterConfig.from_mapping({"density": False}).density is False
    assert FilterConfig.from_mapping({"density": {"enabled": False}}).density is False
    for bad in (
        {"output": {"write_dropped": "no"}},
        {"density": {"thresholds": {"n_words": {"min": 100, "max": 10}}}},
        {"density": {"thresholds": {"n_words": {"min": "5"}}}},
        {"density": "yes"},
    ):
        with pytest.raises(InvalidValueError):
            FilterConfig.from_mapping(bad)
    with pytest.raises(InvalidValueError, match="no such file"):
        FilterConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("density: [unclosed\n")
    with pytest.raises(InvalidValueError, match="YAML"):
        FilterConfig.from_yaml(tmp_path / "bad.yaml")


def test_screens_keep_unseen_documents_of_the_domain():
    # fit on 20 cooking documents, score 8 others never seen: the threshold comes from held-out
    # reference documents, so unseen in-domain text passes and off-domain text does not
    for screen in (
        LDADomainFilter(topics=4, buckets=4096, keep_quantile=0.05).fit(COOKING[:20]),
        DSIRDomainFilter(buckets=1 << 12, keep_quantile=0.05).fit(COOKING[:20], COOKING[:10] + FINANCE[:10]),
    ):
        assert screen.keep(COOKING[20:]).all(), type(screen).__name__
        assert not screen.keep(FINANCE[10:]).any(), type(screen).__name__
