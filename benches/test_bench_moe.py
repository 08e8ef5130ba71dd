"""pytest-benchmark suite of the MoE components at small sizes, and smoke tests of the benchmark.

``pytest benches`` times each case (compare ours against the plain-torch baselines in the same
group); ``pytest benches --benchmark-disable`` runs each once as a smoke test (CI). The full
benchmark table is ``deepseek-rs bench moe``.
"""

import json
import math
import subprocess
import sys

import deepseek_rs
import pytest
import torch
from deepseek_rs.bench import moe as benchmarks
from deepseek_rs.cli import main

S = benchmarks.QUICK


@pytest.fixture(scope="module")
def logits():
    return torch.randn(S.router_t, S.router_e, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def routed():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(S.dc_t, S.dc_h, generator=g)
    r = deepseek_rs.route(torch.randn(S.dc_t, S.dc_e, generator=g), "top_k", top_k=S.dc_k)
    return x, r


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    return deepseek_rs.PEAMoE(S.h, S.f, S.e, router="top_k", top_k=S.k, renormalize=True).eval()


# ---------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="router top-k")
def test_router_top_k_ours(benchmark, logits):
    r = benchmark(deepseek_rs.route, logits, "top_k", top_k=S.router_k)
    assert r.expert_ids.numel() == S.router_t * S.router_k


@pytest.mark.benchmark(group="router top-k")
def test_router_top_k_torch(benchmark, logits):
    w, ids = benchmark(benchmarks.torch_top_k, logits, S.router_k)
    r = deepseek_rs.route(logits, "top_k", top_k=S.router_k)
    torch.testing.assert_close(r.weights.view_as(w), w)


@pytest.mark.benchmark(group="router top-p")
def test_router_top_p_ours(benchmark, logits):
    r = benchmark(deepseek_rs.route, logits, "top_p", top_p=S.top_p, max_k=S.max_k)
    n = r.experts_per_token
    assert n.min() >= 1 and n.max() <= S.max_k


@pytest.mark.benchmark(group="router top-p")
def test_router_top_p_torch(benchmark, logits):
    offsets, ids, w = benchmark(benchmarks.torch_top_p, logits, S.top_p, 1, S.max_k)
    r = deepseek_rs.route(logits, "top_p", top_p=S.top_p, max_k=S.max_k)
    # float32 cumulative sums may round the other way where a token's mass lands right at p
    assert (offsets.diff() != r.experts_per_token).float().mean() <= 0.01
    if torch.equal(offsets, r.token_offsets):
        assert torch.equal(ids, r.expert_ids)
        torch.testing.assert_close(w, r.weights)


# ---------------------------------------------------------------------------------------------
# Dispatch + combine
# ---------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="dispatch + combine")
def test_dispatch_combine_ours(benchmark, routed):
    x, r = routed
    y = benchmark(benchmarks.ours_dispatch_combine, x, r.token_offsets, r.expert_ids, r.weights, S.dc_e)
    torch.testing.assert_close(y, benchmarks.torch_dispatch_combine(x, r.expert_ids, r.weights, S.dc_k))


@pytest.mark.benchmark(group="dispatch + combine")
def test_dispatch_combine_torch(benchmark, routed):
    x, r = routed
    y = benchmark(benchmarks.torch_dispatch_combine, x, r.expert_ids, r.weights, S.dc_k)
    assert y.shape == x.shape


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="layer forward")
def test_layer_forward_ours(benchmark, layer):
    x = torch.randn(S.t_forward, S.h)
    with torch.no_grad():
        y = benchmark(layer, x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.benchmark(group="layer forward")
def test_layer_forward_dense_article(benchmark, layer):
    x = torch.randn(S.t_forward, S.h)
    w = (layer.gate.weight, layer.experts.gate_up_proj, layer.experts.down_proj)
    with torch.no_grad():
        y = benchmark(benchmarks.article_dense_forward, x, *w, S.k)
        torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.benchmark(group="layer forward + backward")
def test_layer_forward_backward_ours(benchmark, layer):
    x = torch.randn(S.t_train, S.h, requires_grad=True)
    grad = torch.randn(S.t_train, S.h)
    params = list(layer.parameters())
    benchmark(benchmarks._train_step, layer, x, grad, params)
    assert x.grad is not None and all(p.grad is not None for p in params)


# ---------------------------------------------------------------------------------------------
# The benchmark itself
# ---------------------------------------------------------------------------------------------

# Row count of a quick run: router 2, dispatch 2, forward 4, forward + backward 3, 2 small T x 3,
# the experts interface 4.
QUICK_ROWS = 2 + 2 + 4 + 3 + 3 * len(S.t_small) + 4


def _finite_positive(v):
    return v is not None and math.isfinite(v) and v > 0


def test_run_moe_quick_rows_are_complete_and_finite():
    rows = benchmarks.run_moe(quick=True)
    assert len(rows) == QUICK_ROWS
    for r in rows:
        note = r["note"] or ""
        if note.startswith("fails on CPU"):  # an HF implementation that does not run here
            continue
        assert _finite_positive(r["time_s"]), r
        assert _finite_positive(r["baseline_s"]), r
        assert _finite_positive(r["ratio"]), r
        assert r["met"] is None or isinstance(r["met"], bool)
    assert sum(r["target"] is not None for r in rows) >= 8
    table = benchmarks.format_table(rows, benchmarks.machine_info())
    assert table.startswith("machine: ") and "release build" in table
    assert len(table.splitlines()) > QUICK_ROWS


def test_cli_bench_moe_quick_exits_0(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "deepseek_rs", "bench", "moe", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # Whether a quick (tiny) row meets its target depends on the machine's load; that it is
    # judged does not.
    assert "machine: " in proc.stdout and ("| met" in proc.stdout or "| NOT MET" in proc.stdout)
    data = json.loads(out.read_text())
    assert data["quick"] is True and len(data["rows"]) == QUICK_ROWS
    assert data["machine"]["cpus"] == benchmarks.machine_info()["cpus"]


def test_cli_without_a_command_prints_usage(capsys):
    assert main([]) == 2
    assert main(["bench"]) == 2
    assert "usage" in capsys.readouterr().err


def test_a_failing_hf_implementation_is_reported_not_raised(monkeypatch):
    forward = benchmarks.hf_forward

    def grouped_mm_fails_in_training(hf, implementation, x):
        if implementation == "grouped_mm" and torch.is_grad_enabled():
            raise RuntimeError("weight gradient not supported on CPU")
        return forward(hf, implementation, x)

    monkeypatch.setattr(benchmarks, "hf_forward", grouped_mm_fails_in_training)
    ours, hf, hf_error = benchmarks.build_layers(S.h, S.f, S.e, S.k)
    rows = benchmarks.bench_layer_train(ours, hf, hf_error, S, benchmarks.QUICK_TIMER)
    fastest, eager, grouped = rows
    assert fastest["baseline"] == "the faster HF (eager)" and _finite_positive(fastest["ratio"])
    assert "grouped_mm fails on CPU: RuntimeError" in fastest["note"]
    assert _finite_positive(eager["ratio"])
    assert grouped["ratio"] is None and grouped["met"] is None
    assert grouped["note"] == "fails on CPU: RuntimeError"
    assert "fails on CPU: RuntimeError" in benchmarks.format_table(rows, benchmarks.machine_info())


def test_experts_interface_rows_time_deepseek_rs_against_grouped_mm():
    """The model-level rows: experts_implementation='deepseek_rs' against 'grouped_mm' and
    'eager' through transformers' ExpertsInterface, forward and forward + backward, after
    checking that they agree (a BenchmarkMismatch would raise)."""
    pytest.importorskip("transformers")
    rows = benchmarks.bench_experts_interface(S, benchmarks.QUICK_TIMER)
    assert [(r["workload"].split(",")[0], r["baseline"]) for r in rows] == [
        ("model forward", "experts_implementation='grouped_mm'"),
        ("model forward", "experts_implementation='eager'"),
        ("model forward + backward", "experts_implementation='grouped_mm'"),
        ("model forward + backward", "experts_implementation='eager'"),
    ]
    for r in rows:
        assert r["subject"] == "experts_implementation='deepseek_rs'" and _finite_positive(r["time_s"]), r
        if (r["note"] or "").startswith("fails on CPU"):  # grouped_mm where torch has no CPU kernel
            assert r["baseline_s"] is None and r["ratio"] is None, r
        else:
            assert _finite_positive(r["baseline_s"]) and _finite_positive(r["ratio"]), r
    assert not (rows[0]["note"] or rows[1]["note"])  # every implementation runs a forward
