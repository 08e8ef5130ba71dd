"""The filter inside Ray Data (``map_batches``) on a local Ray instance, against the same filter run
directly. Ray is an optional extra (``deepseek-rs[ray]``); without it this test is skipped."""

import numpy as np
import pytest
from deepseek_rs.datafilter import SIGNAL_NAMES, DensityFilter, LDADomainFilter, RayFilter, compute_signals

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'deepseek-rs[ray]')")
# Ray warns about its own deprecated settings while it starts; that is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*", "ignore::FutureWarning:ray.*")

_rng = np.random.default_rng(0)
_VOCAB = [a + b for a in ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi") for b in ("bar", "den", "fis")]
DOCS = [
    "\n".join(" ".join(_rng.choice(_VOCAB, 12)).capitalize() + "." for _ in range(8)) for _ in range(30)
] + ["short", "spam spam spam " * 50, "信息熵衡量文本的语义密度。低密度的文本会被过滤掉。" * 3, ""]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_map_batches_matches_the_direct_filter(local_ray):
    domain = LDADomainFilter(topics=3, buckets=1024).fit(DOCS[:20])
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(DOCS)])
    rows = ds.map_batches(RayFilter(domain=domain), batch_format="numpy", batch_size=8).take_all()
    rows.sort(key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(len(DOCS)))

    signals = compute_signals(DOCS)
    density = DensityFilter()
    codes = density.decide(signals)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal([r[name] for name in SIGNAL_NAMES], signals[i])
        if codes[i] >= 0:
            assert not r["keep"] and r["reason"] == "density:" + density.reasons[codes[i]]
        else:
            ok = bool(domain.keep([DOCS[i]])[0])
            assert r["keep"] == ok and r["reason"] == ("" if ok else "domain:off_domain_lda")
    assert any(r["keep"] for r in rows) and not all(r["keep"] for r in rows)


def test_bad_rows_and_unsupported_stages(local_ray):
    from deepseek_rs import InvalidValueError
    from deepseek_rs.datafilter import FilterConfig

    out = RayFilter()({"text": np.array([DOCS[0], None, 12345, b"bytes"], dtype=object)})
    assert out["keep"].tolist()[1:] == [False, False, False]
    assert set(out["reason"][1:]) == {"malformed:text is not a string"}
    with pytest.raises(InvalidValueError, match="hard-example"):
        RayFilter(FilterConfig.from_mapping({"hard_examples": {"enabled": True}}))
    with pytest.raises(InvalidValueError, match="domain="):
        RayFilter(FilterConfig.from_mapping({"domain": {"enabled": True, "reference": "r.jsonl"}}))
