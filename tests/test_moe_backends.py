"""The expert FFN's CPU backends, ISA tiers, tuner and batch invariance (issue 14).

Every (tier, backend) pair is checked end to end, through the op and through PEAMoE, against a
float64 reference, values and gradients; the tuner against candidates of known speed; batch
invariance bitwise.
"""

import contextlib
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from deepseek_rs import DeviceError, DTypeError, InvalidValueError, PEAMoE
from deepseek_rs.moe import backends, ops, pretune, tuning
from hypothesis import given
from hypothesis import strategies as st

TIERS = backends.cpu_isas()
BACKENDS = backends.BACKENDS


@contextlib.contextmanager
def settings_env(tier=None, backend=None):
    """The ISA cap and the forced backend set (None: unset) within the block, as a user would."""
    names = {backends.ISA_ENV: tier, backends.BACKEND_ENV: backend}
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name, value in names.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


@pytest.fixture
def env():
    """``env(tier=..., backend=...)``: ``settings_env`` for the rest of the test."""
    stack = contextlib.ExitStack()
    yield lambda tier=None, backend=None: stack.enter_context(settings_env(tier, backend))
    stack.close()


def _reference(buf, gate_up, down, offsets):
    f = down.shape[2]
    out, pre = [], []
    for k in range(gate_up.shape[0]):
        x = buf.double()[offsets[k] : offsets[k + 1]]
        hk = x @ gate_up.double()[k].T
        pre.append(hk)
        out.append((torch.nn.functional.silu(hk[:, :f]) * hk[:, f:]) @ down.double()[k].T)
    return torch.cat(out), torch.cat(pre)


def _check_ffn(backend, sizes, h, f, seed, weight_grads=True):
    g = torch.Generator().manual_seed(seed)
    e = len(sizes)
    offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)
    buf = torch.randn(int(offsets[-1]), h, generator=g, requires_grad=True)
    gate_up = (torch.randn(e, 2 * f, h, generator=g) / h**0.5).requires_grad_(weight_grads)
    down = (torch.randn(e, h, f, generator=g) / f**0.5).requires_grad_(weight_grads)
    why = backends.why_not(backend, buf, gate_up, down) if backend != "auto" else ""
    if why:  # a forced backend that cannot run these shapes says why
        with pytest.raises(InvalidValueError, match=re.escape(why)):
            ops.expert_ffn(buf, gate_up, down, offsets, True, backend)
        return
    out, pre = ops.expert_ffn(buf, gate_up, down, offsets, True, backend)
    ref_out, ref_pre = _reference(buf, gate_up, down, offsets)
    torch.testing.assert_close(pre.double(), ref_pre, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    grad = torch.randn(out.shape, generator=g)
    wrt = (buf, gate_up, down) if weight_grads else (buf,)
    got = torch.autograd.grad(out, wrt, grad)
    want = torch.autograd.grad(ref_out, wrt, grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("backend", BACKENDS)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    h=st.integers(1, 40),
    f=st.integers(1, 24),
    seed=st.integers(0, 2**31 - 1),
    weight_grads=st.booleans(),
)
def test_every_tier_and_backend_matches_the_reference(tier, backend, sizes, h, f, seed, weight_grads):
    with settings_env(tier=tier):
        _check_ffn(backend, sizes, h, f, seed, weight_grads)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_tier_and_backend_through_the_layer(tier, backend):
    # Forced by the environment, as a user would: PEAMoE's values and gradients against float64
    # (computed outside, where the float64 twin is not forced onto a float32-only backend).
    torch.manual_seed(0)
    kw = dict(router="top_p", top_p=0.7, max_k=3, shared_intermediate_size=8)
    layer = PEAMoE(24, 16, 6, **kw)
    twin = PEAMoE(24, 16, 6, **kw).double()
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(37, 24, requires_grad=True)
    xd = x.detach().double().requires_grad_()
    yd = twin(xd)
    g = torch.randn_like(yd)
    (yd * g).sum().backward()
    with settings_env(tier=tier, backend=backend):
        y = layer(x)
        (y * g.float()).sum().backward()
    torch.testing.assert_close(y.double(), yd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-3, atol=1e-4)
    for p, q in zip(layer.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_experts_run_on_the_torch_backends(env, dtype):
    env()
    g = torch.Generator().manual_seed(1)
    offsets = torch.tensor([0, 5, 5, 12])
    buf = torch.randn(12, 16, generator=g).to(dtype)
    gate_up, down = (
        (torch.randn(3, 16, 16, generator=g) / 4).to(dtype),
        (torch.randn(3, 16, 8, generator=g) / 3).to(dtype),
    )
    ref, _ = _reference(buf, gate_up, down, offsets)
    for backend in ("auto", "torch", "grouped_mm"):
        out, _ = ops.expert_ffn(buf, gate_up, down, offsets, False, backend)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=5e-2)
    with pytest.raises(InvalidValueError, match="rust backend runs float32 only"):
        ops.expert_ffn(buf, gate_up, down, offsets, False, "rust")


def test_bad_settings_are_clear_errors(env):
    buf, gu, dn, offs = torch.randn(3, 4), torch.randn(2, 6, 4), torch.randn(2, 4, 3), torch.tensor([0, 1, 3])
    env(tier="sse9")
    with pytest.raises(InvalidValueError, match="DEEPSEEK_RS_CPU_ISA='sse9' is not one of"):
        ops.expert_ffn(buf, gu, dn, offs, False, "rust")
    env(backend="cuda")
    with pytest.raises(InvalidValueError, match="DEEPSEEK_RS_EXPERTS_BACKEND='cuda' is not one of auto"):
        ops.expert_ffn(buf, gu, dn, offs, False)
    env()
    with pytest.raises(InvalidValueError, match="backend='fast' is not one of"):
        ops.expert_ffn(buf, gu, dn, offs, False, "fast")
    with pytest.raises(InvalidValueError, match="float32 only"):
        ops.expert_ffn(buf.double(), gu.double(), dn.double(), offs, False, "rust")


def test_the_cap_picks_the_best_tier_at_or_below_it(env):
    env(tier="avx512")
    assert backends.cpu_isa() == TIERS[0]  # a cap above the CPU is no cap
    env(tier="generic")
    assert backends.cpu_isa() == "generic"
    env(tier=" AVX2 ")
    assert backends.cpu_isa() == ("avx2" if "avx2" in TIERS else "generic")
    assert TIERS[-1] == "generic"


# ---- the tuner ------------------------------------------------------------------------------


def _slow(seconds, value):
    def run():
        import time

        time.sleep(seconds)
        return value

    return run


def test_the_tuner_keeps_the_fastest_and_reuses_it_from_disk(tmp_path):
    path = tmp_path / "t.json"
    tuner = tuning.Tuner(path, budget_s=0.0)
    calls = []

    def fast():
        calls.append("fast")

    assert tuner.choose("forward", "k1", {"torch": _slow(0.03, None), "rust": fast}) == "rust"
    choice = tuner.lookup("k1")
    assert choice.backend == "rust" and choice.times_s["torch"] > choice.times_s["rust"]
    # The slow candidate was timed once (its warm-up), the close one again.
    assert calls == ["fast", "fast"] and tuner.spent_s >= 0.03
    assert tuner.last["forward"] == ("k1", "rust")
    # A new process (a new Tuner on the same file) takes the cached choice without timing.
    again = tuning.Tuner(path)
    assert again.choose("forward", "k1", {"torch": _slow(5, None), "rust": fast}) == "rust"
    assert again.spent_s == 0 and len(calls) == 2
    data = json.loads(path.read_text())
    assert list(data["machines"]) == [tuning.machine_key()]
    again.forget("k1")
    assert again.lookup("k1") is None and tuning.Tuner(path).lookup("k1") is None


def test_the_cache_is_keyed_by_machine_and_survives_bad_files(tmp_path, env, caplog):
    path = tmp_path / "t.json"
    tuner = tuning.Tuner(path, budget_s=0.0)
    assert tuner.choose("forward", "k", {"torch": lambda: 1, "rust": _slow(0.01, 2)}) == "torch"
    env(tier="generic")  # another ISA tier is another machine key: nothing cached there
    assert tuning.Tuner(path).lookup("k") is None
    env()
    assert tuning.Tuner(path).lookup("k").backend == "torch"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert tuning.Tuner(path).lookup("k") is None
    assert "unreadable tuning cache" in caplog.text


def test_an_unwritable_cache_keeps_choices_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    tuner = tuning.Tuner(blocker / "sub" / "t.json", budget_s=0.0)
    with caplog.at_level(logging.WARNING):
        assert tuner.choose("forward", "k", {"torch": lambda: 1}) == "torch"
    assert tuner.lookup("k").backend == "torch" and "choices stay in memory" in caplog.text


def test_the_tuner_times_a_prefix_of_the_experts(monkeypatch, tmp_path, env):
    env()
    seen = []
    real = backends.FORWARD["torch"]

    def spy(buf, gate_up, *rest):
        seen.append((buf.shape[0], gate_up.shape[0]))
        return real(buf, gate_up, *rest)

    monkeypatch.setitem(backends.FORWARD, "torch", spy)
    offsets = torch.arange(0, 41 * 3, 3)  # 40 experts of 3 rows
    buf, gu, dn = torch.randn(120, 16), torch.randn(40, 8, 16), torch.randn(40, 16, 4)
    for budget, timed in ((0.0, (3 * ops.TUNE_EXPERTS, ops.TUNE_EXPERTS)), (60.0, (120, 40))):
        seen.clear()
        with tuning.isolated(tmp_path / f"{budget}.json") as tuner:
            tuner.budget_s = budget
            out, _ = ops.expert_ffn(buf, gu, dn, offsets, False)
        torch.testing.assert_close(out.double(), _reference(buf, gu, dn, offsets)[0], rtol=1e-4, atol=1e-4)
        # First a whole call of torch gauges the cost; a costly call (over the budget) is then
        # timed on the first 8 experts, a cheap one whole.
        assert seen[0] == (120, 40) and seen[1] == timed
        assert seen[-1] in {(120, 40), timed}  # the call itself ran every expert (if torch won)


def test_the_ops_tune_per_shape_class_and_never_time_a_forced_backend(tmp_path, env):
    env()
    with tuning.isolated(tmp_path / "t.json") as tuner:
        _check_ffn("auto", [3, 0, 9], 16, 8, seed=1)
        assert {k.split()[0] for k in tuner.choices()} == {"forward-train", "backward"}
        assert all(c.backend in BACKENDS and "torch" in c.times_s for c in tuner.choices().values())
        spent = tuner.spent_s
        env(backend="torch")
        _check_ffn("auto", [300, 1], 16, 8, seed=2)
        assert tuner.spent_s == spent and len(tuner.choices()) == 2


def test_rows_bucket():
    assert tuning.rows_bucket(torch.tensor([0, 0])) == 0
    assert tuning.rows_bucket(torch.tensor([0, 1, 1])) == 1
    assert tuning.rows_bucket(torch.tensor([0, 300, 300, 600])) == 256
    assert tuning.rows_bucket(torch.tensor([0, 5000])) == 4096


# ---- batch invariance -----------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
@given(
    t=st.integers(2, 40),
    pos=st.integers(0, 39),
    rule=st.sampled_from(["top_k", "top_p"]),
    shared=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_invariant_layer_gives_a_token_the_same_bits_in_any_batch(tier, t, pos, rule, shared, seed):
    torch.manual_seed(seed % 1000)
    layer = PEAMoE(
        40, 24, 8, router=rule, top_k=2, top_p=0.6, max_k=4,
        shared_intermediate_size=16 if shared else 0, shared_expert_gate=shared, batch_invariant=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    batch = torch.randn(t, 40, generator=g)
    i = pos % t
    with torch.no_grad(), settings_env(tier=tier):
        alone = layer(batch[i : i + 1])
        together = layer(batch)[i : i + 1]
        reversed_ = layer(batch.flip(0))[t - 1 - i : t - i]
    assert torch.equal(alone, together) and torch.equal(alone, reversed_)


def test_batch_invariant_needs_float32_on_the_cpu():
    layer = PEAMoE(8, 4, 4, batch_invariant=True).double()
    with pytest.raises(DTypeError, match="batch_invariant=True needs float32"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    layer = PEAMoE(8, 4, 4)
    layer.batch_invariant = True
    assert layer.experts.backend == "rust" and layer.gate.batch_invariant
    layer.batch_invariant = False
    assert layer.experts.backend == "auto"
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        with pytest.raises(DeviceError):
            PEAMoE(8, 4, 4, batch_invariant=True).cuda()(torch.randn(2, 8, device="cuda"))


def test_linear_rows_matches_linear_and_its_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 37, generator=g, requires_grad=True)
    w = torch.randn(11, 37, generator=g, requires_grad=True)
    torch.testing.assert_close(ops.linear_rows(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.deepseek_rs.linear_rows.default, (x.detach(), w.detach()))
    gx, gw = torch.autograd.grad(ops.linear_rows(x, w).square().sum(), (x, w))
    rx, rw = torch.autograd.grad((x @ w.T).square().sum(), (x, w))
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


# ---- deepseek-rs tune -----------------------------------------------------------------------


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "deepseek_rs", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_tune_command_fills_shows_and_clears_the_cache(tmp_path):
    env = dict(os.environ, DEEPSEEK_RS_CACHE_DIR=str(tmp_path))
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"hidden_size": 32, "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2}
        )
    )
    out = _cli(
        "tune", "--model-config", str(config), "--tokens", "4,64", "--json", str(tmp_path / "r.json"), env=env
    )
    assert out.returncode == 0, out.stderr
    assert "shape: H=32, F=16, E=8, k=2" in out.stdout
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    passes = ("forward", "forward-train", "backward")
    assert [(r["pass"], r["tokens"]) for r in rows] == [(p, t) for t in (4, 64) for p in passes]
    assert all(r["backend"] in BACKENDS for r in rows)
    cached = json.loads((tmp_path / tuning.CACHE_FILE).read_text())["machines"]
    assert len(next(iter(cached.values()))) == 6
    shown = _cli("tune", "--show", env=env)
    assert shown.returncode == 0 and shown.stdout.count("H=32 F=16") == 6
    assert _cli("tune", "--clear", env=env).returncode == 0
    assert not (tmp_path / tuning.CACHE_FILE).exists()


def test_tune_rejects_bad_input(tmp_path):
    with pytest.raises(InvalidValueError, match="top_k <= num_experts"):
        pretune.pretune(8, 4, 2, 3)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(InvalidValueError, match="is it a MoE model's config"):
        pretune.shape_from_config(str(tmp_path))
    out = _cli("tune", "--tokens", "4,x", env=dict(os.environ, DEEPSEEK_RS_CACHE_DIR=str(tmp_path)))
    assert out.returncode == 1 and "--tokens must be integers" in out.stderr


def test_a_process_capped_at_generic_computes_the_same_layer():
    script = (
        "import torch, hashlib; from deepseek_rs import PEAMoE; from deepseek_rs.moe import backends\n"
        "torch.manual_seed(0); m = PEAMoE(64, 32, 8, router='top_k', top_k=2)\n"
        "x = torch.randn(50, 64)\n"
        "print(backends.cpu_isa(), repr(m(x).sum().item()))\n"
    )
    results = {}
    for tier in ("generic", TIERS[0]):
        env = dict(os.environ, DEEPSEEK_RS_CPU_ISA=tier, DEEPSEEK_RS_EXPERTS_BACKEND="rust")
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 0, out.stderr
        ran, total = out.stdout.split()
        results[ran] = float(total)
    assert set(results) == {"generic", TIERS[0]}
    a, b = results.values()
    assert abs(a - b) <= 1e-4 * max(1.0, abs(a))


def test_set_batch_invariant_switches_every_layer_and_names_the_rest():
    from deepseek_rs.moe import set_batch_invariant

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), PEAMoE(8, 4, 4), PEAMoE(8, 4, 4))
    with pytest.warns(UserWarning, match="PEAMoE layers only; 0 run on torch.s kernels"):  # "0": the Linear
        assert set_batch_invariant(model) == 2
    assert all(m.batch_invariant for m in model[1:])
    assert set_batch_invariant(model, False) == 2 and not model[1].batch_invariant
    with pytest.raises(InvalidValueError, match="has none"):
        set_batch_invariant(torch.nn.Linear(2, 2))


def test_malformed_cache_entries_are_dropped_with_a_warning(tmp_path, caplog, env):
    env()
    path = tmp_path / "t.json"
    key = tuning.machine_key()
    for machines in ({key: [1, 2]}, {key: {"k": {"backend": "rust", "times_s": "x", "tuning_s": 1.0}}}):
        path.write_text(json.dumps({"format": 1, "machines": machines}))
        with caplog.at_level(logging.WARNING):
            assert tuning.Tuner(path).lookup("k") is None
        assert "malformed" in caplog.text
        caplog.clear()
    with tuning.isolated(path):  # the layer still runs, and tunes over the bad entry
        _check_ffn("auto", [3, 5], 16, 8, seed=4)


def test_processes_sharing_the_cache_keep_each_others_choices(tmp_path):
    path = tmp_path / "t.json"
    a, b = tuning.Tuner(path, budget_s=0.0), tuning.Tuner(path, budget_s=0.0)
    assert a.lookup("ka") is None and b.lookup("kb") is None  # both loaded the empty file
    a.choose("forward", "ka", {"torch": lambda: 1})
    b.choose("forward", "kb", {"torch": lambda: 1})
    fresh = tuning.Tuner(path)
    assert fresh.lookup("ka") is not None and fresh.lookup("kb") is not None
    b.forget("kb")
    assert tuning.Tuner(path).lookup("ka") is not None and tuning.Tuner(path).lookup("kb") is None


@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_backward(backend, dtype):
    g = torch.Generator().manual_seed(5)
    offsets = torch.tensor([0, 6, 6, 13])
    buf = torch.randn(13, 16, generator=g).to(dtype).requires_grad_()
    gu = (torch.randn(3, 16, 16, generator=g) / 4).to(dtype).requires_grad_()
    dn = (torch.randn(3, 16, 8, generator=g) / 3).to(dtype).requires_grad_()
    out, _ = ops.expert_ffn(buf, gu, dn, offsets, True, backend)
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (buf, gu, dn), grad.to(dtype))
    ref, _ = _reference(buf, gu, dn, offsets)
    want = torch.autograd.grad(ref, (buf, gu, dn), grad.double())
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=5e-2, atol=5e-2)


def test_an_empty_batch_runs_on_any_backend():
    buf = torch.zeros(0, 16, requires_grad=True)
    gu, dn = torch.randn(2, 16, 16, requires_grad=True), torch.randn(2, 16, 8, requires_grad=True)
    for backend in ("auto", *BACKENDS):
        out, _ = ops.expert_ffn(buf, gu, dn, torch.tensor([0, 0, 0]), True, backend)
        out.sum().backward()  # an expanded zero-size gradient
        assert out.shape == (0, 16) and not gu.grad.any()


def test_batch_invariance_holds_with_gradients_enabled():
    torch.manual_seed(1)
    layer = PEAMoE(40, 24, 8, top_k=2, shared_intermediate_size=16, shared_expert_gate=True)
    layer.batch_invariant = True
    batch = torch.randn(37, 40)
    rows = [layer(batch[i : i + 1]) for i in range(0, 37, 6)]  # gradients on, as in eval code
    together = layer(batch)
    assert all(torch.equal(r, together[i : i + 1]) for r, i in zip(rows, range(0, 37, 6)))
    together.sum().backward()  # and it trains
    assert layer.shared_expert_gate.weight.grad is not None


def test_batch_invariance_refuses_swapped_in_modules():
    layer = PEAMoE(8, 4, 4, shared_intermediate_size=4)
    layer.shared_experts.up_proj = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    with pytest.raises(InvalidValueError, match="shared_experts.up_proj is a Sequential, not a Linear"):
        layer.batch_invariant = True
