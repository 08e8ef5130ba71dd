"""Smoke test of ``deepseek-rs bench batching --quick``: every request answered once with the
status it must get, and every 200 answer equal to the model's output for the request alone."""

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from deepseek_rs.bench import batching  # noqa: E402
from deepseek_rs.serving.server import DEFAULT_HIDDEN_SIZE, default_model  # noqa: E402

N = batching.QUICK_REQUESTS


def test_quick_batching_benchmark_answers_every_request_as_unbatched(run_bench):
    proc, data = run_bench("batching")
    out = proc.stdout
    assert out.startswith("machine: ") and "| closed c=8 |" in out and "| Poisson" in out, out
    http = [r for r in data["rows"] if "requests" in r]
    assert len(http) == 8  # closed c=1, c=8, Poisson (off and on), the failing point (off and on)
    for r in http:
        failing = "failing" in r["load"]
        # A quick point sends exactly N requests, ids 0..N-1: id % 100 == 99 is bad (N // 100 of
        # them), id % 100 == 49 is marked on the failing points; none may be lost or answered twice.
        assert r["requests"] == N, r
        assert r["lost"] == 0 and r["answered_twice"] == 0, r
        assert r["bad_400"] == N // 100, r
        assert r["failed_500"] == (N // 100 if failing else 0), r
        # At most 8 requests are in flight against a queue of 1024 (Poisson: N < 1024 in all): no 429.
        assert r["rejected_429"] == 0, r
        assert r["ok"] == N - r["bad_400"] - r["failed_500"], r
        # Quick runs compare every 200 answer with the model run on that request alone (unbatched).
        assert r["checked"] == r["ok"], r
        if not r["batching"]:
            assert r["mean_batch"] == 1.0, r  # batching off: one request per model call
    assert data["overhead"]["scheduler_us"] > 0


def test_the_failing_model_raises_on_a_marked_row_and_otherwise_is_the_served_model():
    model, plain = batching.peamoe_failing_on_mark(), default_model()
    x = torch.randn(3, DEFAULT_HIDDEN_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
        x[1, 0] = batching.FAIL_MARK
        with pytest.raises(ValueError, match="marked"):
            model(x)
