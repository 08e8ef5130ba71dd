"""The CUDA path (deepseek_rs.cuda).

Without a device: the kernel sources are found, every kernel compiles with NVRTC for sm_80
and sm_90 and defines the names the host launches, and the host-side math (the router's
backward, the group-limited argument checks, the grouped-GEMM launch bound) matches the CPU
path. Tests marked ``gpu`` run the kernels against torch on a CUDA device and skip with the
reason where there is none.
"""

import fnmatch
import math
import pathlib
import re

import numpy as np
import pytest
import torch
from deepseek_rs import DeviceError, DTypeError, InvalidValueError, PEAMoE, ShapeError, _core, route
from deepseek_rs import cuda as ds_cuda
from deepseek_rs.cuda import _nvrtc, _runtime, kernels
from deepseek_rs.moe import ops
from deepseek_rs.moe import ops_cuda as cuda_moe
from deepseek_rs.moe.routing import RoutingConfig
from hypothesis import given
from hypothesis import strategies as st

DTYPES = ("f16", "bf16")
LAUNCHED = {
    "gemm.cu": [
        f"{k}_{d}"
        for d in DTYPES
        for k in ("gemm", "gemm_bt", "grouped_gemm", "grouped_gemm_bt", "grouped_swiglu", "grouped_wgrad")
    ]
    + ["grouped_tiles"],
    "router.cu": ["route_softmax", "route_sigmoid_grouped"],
    "permute.cu": ["pair_tokens", "expert_histogram", "expert_scan", "expert_scatter"]
    + [
        f"{k}_{d}"
        for d in DTYPES
        for k in ("gather_rows", "combine_rows", "combine_weight_grad", "swiglu_backward")
    ],
}


# --------------------------------------------------------------------------------------------
# No device needed
# --------------------------------------------------------------------------------------------


def test_sources_are_found_with_every_launched_kernel():
    d = ds_cuda.kernel_dir()
    for name, launched in LAUNCHED.items():
        assert (d / name).is_file()
        assert set(launched) <= set(_runtime.kernel_names(name)), name
    # The header is pasted in, so no source depends on an include path.
    assert all('#include "common.cuh"' not in _runtime.source(n) for n in _runtime.SOURCES)


def test_wheel_and_sdist_include_the_kernel_sources():
    tomllib = pytest.importorskip("tomllib")
    root = pathlib.Path(__file__).resolve().parents[1]
    includes = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["maturin"]["include"]
    for fmt in ("wheel", "sdist"):
        globs = [
            i["path"]
            for i in includes
            if fmt in ([i["format"]] if isinstance(i["format"], str) else i["format"])
        ]
        for name in (*_runtime.SOURCES, _runtime.HEADER):
            path = f"python/deepseek_rs/cuda/sources/{name}"
            assert any(fnmatch.fnmatch(path, g) for g in globs), f"{name} is not in the {fmt}"
            assert (root / path).is_file()
    # Packaged inside deepseek_rs, never as a top-level `cuda` (NVIDIA's bindings own that name).
    assert all(not i["path"].startswith("cuda/") for i in includes)


@pytest.mark.skipif(_nvrtc.library() is None, reason="NVRTC (pip: nvidia-cuda-nvrtc) is not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("name", _runtime.SOURCES)
def test_every_kernel_compiles_with_nvrtc(name, arch):
    # The options CuPy's RawModule compiles with (it adds -ftz=true to ours).
    ok, log, cubin = _nvrtc.compile_cubin(_runtime.source(name), name, arch, ("-std=c++17", "-ftz=true"))
    assert ok, log
    for kernel in LAUNCHED[name]:
        assert kernel.encode() + b"\0" in cubin, f"{kernel} missing from the sm_{arch} binary of {name}"


def kernel_signatures(name):
    """``{kernel: [C parameter types]}`` of source ``name``, macro-stamped kernels included."""
    text = _runtime.source(name).replace("\\\n", " ")
    stamped = re.findall(r"^\w+_KERNELS\((\w+), \w+\)$", text, re.MULTILINE)  # NAME of each instantiation
    out = {}
    decl = r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?([\w#]+)\(([^)]*)\)'
    for kernel, params in re.findall(decl, text):
        types = [" ".join(p.split()[:-1]) + ("*" if "*" in p.split()[-1] else "") for p in params.split(",")]
        if kernel.endswith("_##NAME"):
            for suffix in stamped:
                out[kernel.replace("##NAME", suffix)] = types
        else:
            out[kernel] = types
    return out


POINTEE = {"u16": (torch.int16,), "i64": (torch.int64,), "int": (torch.int32,), "float": (torch.float32,)}
SCALAR = {"int": np.int32, "i64": np.int64, "float": np.float32, "double": np.float64}


def _check_launch(module, name, grid, block, args, shared_mem):
    sig = kernel_signatures(module)
    assert name in sig, f"{name} is not a kernel of {module}"
    types = sig[name]
    assert len(args) == len(types), f"{name}: {len(args)} arguments for {len(types)} parameters"
    for i, (a, c_type) in enumerate(zip(args, types)):
        if c_type.endswith("*"):
            base = c_type.replace("const", "").replace("*", "").strip()
            if isinstance(a, _runtime.Null):
                continue
            assert isinstance(a, torch.Tensor), f"{name} parameter {i} ({c_type}) got {type(a).__name__}"
            dtype = torch.int16 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
            assert dtype in POINTEE[base], f"{name} parameter {i} ({c_type}) got a {a.dtype} tensor"
            assert a.is_contiguous()
        else:
            assert type(a) is SCALAR[c_type], f"{name} parameter {i} ({c_type}) got {type(a).__name__}"
    assert all(isinstance(g, int) and 1 <= g < 2**31 for g in grid) and grid[1] <= 65535 and grid[2] <= 65535
    assert 32 <= block[0] * block[1] * block[2] <= 1024 or block == (1, 1, 1)
    assert 0 <= shared_mem <= 227 * 1024


def test_every_launch_matches_its_kernel_signature(monkeypatch):
    # Meta tensors run the wrappers' shape logic without a device; launches are checked against
    # the parameter lists parsed from the sources: count, C types, pointee dtypes, grid limits.
    launches = []

    def record(device, module, name, grid, block, args, shared_mem=0):
        _check_launch(module, name, grid, block, args, shared_mem)
        launches.append(name)

    monkeypatch.setattr(_runtime, "launch", record)
    monkeypatch.setattr(kernels, "check_device", lambda what, *ts: ts[0].device)
    meta = dict(device="meta")
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.empty(300, 64, dtype=dtype, **meta)
        offs = torch.empty(5, dtype=torch.int64, **meta)
        kernels.gemm(x, torch.empty(64, 48, dtype=dtype, **meta))
        kernels.gemm(x, torch.empty(48, 64, dtype=dtype, **meta), b_transposed=True)
        kernels.grouped_gemm(x, torch.empty(4, 48, 64, dtype=dtype, **meta), offs)
        kernels.grouped_gemm(x, torch.empty(4, 64, 48, dtype=dtype, **meta), offs, w_transposed=False)
        for save_h in (True, False):
            act, h = kernels.grouped_swiglu(
                x, torch.empty(4, 96, 64, dtype=dtype, **meta), offs, save_h=save_h
            )
            assert act.shape == (300, 48) and h.shape == (300 if save_h else 0, 96)
        assert kernels.grouped_wgrad(x, torch.empty(300, 48, dtype=dtype, **meta), offs).shape == (4, 64, 48)
        idx = torch.empty(300, dtype=torch.int64, **meta)
        w = torch.empty(300, dtype=torch.float32, **meta)
        kernels.gather_rows(x, idx)
        kernels.gather_rows(x, idx, w, idx)
        tok = torch.empty(101, dtype=torch.int64, **meta)
        assert kernels.combine_rows(x, idx, tok).shape == (100, 64)
        kernels.combine_rows(x, idx, tok, w)
        kernels.combine_weight_grad(torch.empty(100, 64, dtype=dtype, **meta), x, idx, idx)
        grad_h, act = kernels.swiglu_backward(torch.empty(300, 96, dtype=dtype, **meta), act)
        assert grad_h.shape == (300, 96)
    logits = torch.empty(100, 16, dtype=torch.float32, **meta)
    kernels.route_padded(logits, "top_k", width=4)
    kernels.route_padded(logits, "top_p", width=6, top_p=0.5, min_k=2)
    bias = torch.empty(16, dtype=torch.float32, **meta)
    kernels.route_padded(logits, "group_limited", width=4, bias=bias, n_group=4, topk_group=2)
    ids = torch.empty(400, dtype=torch.int64, **meta)
    kernels.pair_tokens(torch.empty(101, dtype=torch.int64, **meta), 400)
    kernels.sort_by_expert(ids, ids, 16)
    every = {k for name in _runtime.SOURCES for k in LAUNCHED[name]}
    assert set(launches) == every


LEAF_OPS = [
    "route",
    "route_backward",
    "sort_by_expert",
    "gather_rows",
    "combine_rows",
    "combine_weight_grad",
    "expert_ffn",
    "expert_ffn_backward",
]


@pytest.mark.parametrize("op", LEAF_OPS)
def test_cuda_kernels_are_registered_on_the_same_ops_as_the_cpu_ones(op):
    # One API: the dispatcher picks the kernel by device, so the layers have no device branches.
    name = f"deepseek_rs::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")  # the fake, for torch.compile


@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_composite_ops_run_on_either_device(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deepseek_rs::{op}", "CompositeExplicitAutograd")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a CUDA device")
def test_cuda_input_without_a_device_says_why():
    assert not ds_cuda.is_available()
    assert "CUDA" in ds_cuda.unavailable_reason()
    with pytest.raises(DeviceError, match="CUDA path of deepseek_rs cannot run"):
        _runtime.require(torch.device("cuda", 0))


@st.composite
def routing_case(draw):
    """Logits and the arguments of one routing rule."""
    t = draw(st.integers(0, 12))
    rule = draw(st.sampled_from(["top_k", "top_p", "group_limited"]))
    n_group = draw(st.sampled_from([1, 2, 4])) if rule == "group_limited" else 1
    e = n_group * draw(st.integers(1, 4))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, topk_group * (e // n_group) if rule == "group_limited" else e))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64)
    kw = dict(
        top_k=top_k,
        top_p=draw(st.floats(0.05, 1.0)),
        renormalize=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
    )
    if rule == "group_limited":
        kw.update(
            n_group=n_group, topk_group=topk_group, bias=torch.randn(e, generator=g, dtype=torch.float64)
        )
    return logits, rule, kw, g


@given(routing_case())
def test_route_weights_backward_matches_the_rust_backward(case):
    logits, rule, kw, g = case
    r = route(logits, rule, **kw)
    t = logits.shape[0]
    grad_w = torch.randn(r.expert_ids.shape[0], generator=g, dtype=torch.float64)
    pair_token = torch.repeat_interleave(torch.arange(t), r.token_offsets.diff())
    scoring, renormalize = RoutingConfig(rule).scoring, kw["renormalize"]
    scale = kw["routed_scaling_factor"]
    got = cuda_moe.route_weights_backward(
        r.logits, pair_token, r.expert_ids, grad_w, scoring, renormalize, scale
    )
    want = ops.route_backward(r.logits, r.token_offsets, r.expert_ids, grad_w, scoring, renormalize, scale)
    torch.testing.assert_close(got, want)


@given(
    st.sampled_from([*range(1, 13), 256, 512]),
    st.sampled_from([*range(1, 13), 256, 512]),
    st.integers(1, 30),
    st.integers(1, 20),
)
def test_group_limited_checks_agree_with_the_rust_router(e, n_group, topk_group, top_k):
    """RoutingConfig (which the CUDA path relies on) refuses exactly what the Rust router refuses."""
    try:
        _core.route_group_limited(np.zeros((1, e), np.float32), None, top_k, n_group, topk_group, False)
        rust_ok = True
    except InvalidValueError:
        rust_ok = False
    try:
        RoutingConfig("group_limited", top_k=top_k, n_group=n_group, topk_group=topk_group).check(e)
        ours_ok = True
    except InvalidValueError:
        ours_ok = False
    assert ours_ok == rust_ok


@given(st.lists(st.integers(0, 700), min_size=1, max_size=80))
def test_grouped_launch_covers_every_tile(rows_per_expert):
    tiles = sum(math.ceil(r / kernels.BM) for r in rows_per_expert)
    assert tiles <= kernels._tile_bound(sum(rows_per_expert), len(rows_per_expert))


# --------------------------------------------------------------------------------------------
# On a CUDA device
# --------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not ds_cuda.is_available(), reason=f"{ds_cuda.unavailable_reason()}")
HALF = [torch.float16, torch.bfloat16]


def _close(got, want, dtype):
    # f32 accumulation on both sides; the rounding of the 16-bit output dominates.
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=tol * scale, rtol=tol)


def _rand(*shape, dtype, g):
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


def _segments(seed, e, max_rows):
    """Expert offsets [E+1] of random segment sizes, at least one expert without rows."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_rows + 1, (e,), generator=g)
    counts[torch.randint(0, e, (1,), generator=g)] = 0
    offs = torch.zeros(e + 1, dtype=torch.int64)
    offs[1:] = counts.cumsum(0)
    return offs


def _segment_loop(offs, fn):
    return [fn(i, int(s), int(t)) for i, (s, t) in enumerate(zip(offs[:-1], offs[1:]))]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", HALF)
@given(
    m=st.integers(1, 300),
    n=st.integers(1, 40).map(lambda v: 8 * v),
    k=st.integers(1, 40).map(lambda v: 8 * v),
    b_t=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_gemm_matches_torch(dtype, m, n, k, b_t, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = _rand(m, k, dtype=dtype, g=g)
    b = _rand(n, k, dtype=dtype, g=g) if b_t else _rand(k, n, dtype=dtype, g=g)
    want = a.float() @ (b.float().T if b_t else b.float())
    _close(ds_cuda.gemm(a, b, b_transposed=b_t), want, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", HALF)
@given(
    e=st.integers(1, 9),
    n=st.integers(1, 24).map(lambda v: 8 * v),
    k=st.integers(1, 24).map(lambda v: 8 * v),
    w_t=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_grouped_gemm_matches_a_loop_of_matmuls(dtype, e, n, k, w_t, seed):
    offs = _segments(seed, e, 300)
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = _rand(int(offs[-1]), k, dtype=dtype, g=g)
    w = _rand(e, n, k, dtype=dtype, g=g) if w_t else _rand(e, k, n, dtype=dtype, g=g)
    parts = _segment_loop(offs, lambda i, s, t: x[s:t].float() @ (w[i].float().T if w_t else w[i].float()))
    got = ds_cuda.grouped_gemm(x, w, offs.cuda(), w_transposed=w_t)
    _close(got, torch.cat(parts), dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", HALF)
@given(
    e=st.integers(1, 6),
    f=st.integers(1, 24).map(lambda v: 8 * v),
    k=st.integers(1, 24).map(lambda v: 8 * v),
    seed=st.integers(0, 2**31),
)
def test_grouped_swiglu_and_wgrad_match_torch(dtype, e, f, k, seed):
    offs = _segments(seed, e, 200)
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = int(offs[-1])
    x = _rand(rows, k, dtype=dtype, g=g)
    w = _rand(e, 2 * f, k, dtype=dtype, g=g) / math.sqrt(k)
    act, h = ds_cuda.grouped_swiglu(x, w, offs.cuda(), save_h=True)
    _close(h, torch.cat(_segment_loop(offs, lambda i, s, t: x[s:t].float() @ w[i].float().T)), dtype)
    hf = h.float()
    _close(act, torch.nn.functional.silu(hf[:, :f]) * hf[:, f:], dtype)
    act2, h0 = ds_cuda.grouped_swiglu(x, w, offs.cuda(), save_h=False)
    assert h0.shape == (0, 2 * f) and torch.equal(act2, act)
    y = _rand(rows, f, dtype=dtype, g=g)
    gw = ds_cuda.grouped_wgrad(x, y, offs.cuda())
    _close(gw, torch.stack(_segment_loop(offs, lambda i, s, t: x[s:t].float().T @ y[s:t].float())), dtype)


@pytest.mark.gpu
@needs_cuda
@given(routing_case())
def test_cuda_router_matches_the_cpu_router(case):
    logits, rule, kw, _ = case
    logits = logits.float()  # the CUDA router scores in float32: compare on the same logits
    cpu = route(logits, rule, **kw)
    if "bias" in kw:
        kw = dict(kw, bias=kw["bias"].float().cuda())
    got = route(logits.cuda(), rule, **kw)
    assert torch.equal(got.token_offsets.cpu(), cpu.token_offsets)
    assert torch.equal(got.expert_ids.cpu(), cpu.expert_ids)
    assert torch.equal(got.expert_counts.cpu(), cpu.expert_counts)
    torch.testing.assert_close(got.weights.cpu(), cpu.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rule", ["top_k", "top_p", "group_limited"])
def test_cuda_router_ties_and_bad_input(rule):
    # Integer logits: many exact ties, which go to the lower expert index as on the CPU.
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-2, 3, (257, 16), generator=g).float()
    kw = {
        "top_k": dict(top_k=4),
        "top_p": dict(top_p=0.6, max_k=5),
        "group_limited": dict(top_k=4, n_group=4, topk_group=2),
    }[rule]
    cpu = route(logits, rule, **kw)
    got = route(logits.cuda(), rule, **kw)
    assert torch.equal(got.expert_ids.cpu(), cpu.expert_ids)
    assert torch.equal(got.token_offsets.cpu(), cpu.token_offsets)
    logits[100, 3] = float("nan")
    with pytest.raises(InvalidValueError, match="token 100, expert 3"):
        route(logits.cuda(), rule, **kw)
    bad = dict(top_p=1.5) if rule == "top_p" else dict(top_k=17)
    with pytest.raises(InvalidValueError):
        route(torch.zeros(2, 16, device="cuda"), rule, **bad)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", HALF)
def test_permutation_matches_the_cpu_path(dtype):
    g = torch.Generator().manual_seed(1)
    for t, e, k in [(0, 4, 2), (1, 1, 1), (300, 64, 8), (1000, 7, 7)]:
        r = route(torch.randn(t, e, generator=g), "top_k", top_k=k)
        pair_token = torch.repeat_interleave(torch.arange(t), r.token_offsets.diff())
        want = ops.sort_by_expert(r.token_offsets, r.expert_ids, e)
        got = kernels.sort_by_expert(r.expert_ids.cuda(), pair_token.cuda(), e)
        for a, b in zip(got[:4], want):
            assert torch.equal(a.cpu(), b)
        assert int(got[4]) == 0
        assert torch.equal(kernels.pair_tokens(r.token_offsets.cuda(), pair_token.shape[0]).cpu(), pair_token)
        x = torch.randn(t, 64, generator=g).to(dtype)
        buf = kernels.gather_rows(x.cuda(), got[1])
        assert torch.equal(buf.cpu(), x[want[1]])
        y = kernels.combine_rows(buf, got[2], r.token_offsets.cuda(), r.weights.cuda())
        _close(y, ops.combine_rows(x[want[1]], want[2], r.token_offsets, r.weights), dtype)


def _layer_and_input(dtype, rule):
    """A CPU float32 PEAMoE, its CUDA copy in ``dtype``, and an input whose router logits are
    exact in 16 bits with gaps far above rounding, so both layers route identically."""
    torch.manual_seed(0)
    e, h, f = 16, 128, 96
    kw = dict(router=rule, top_k=2, top_p=0.5, max_k=4)
    if rule == "group_limited":
        kw.update(n_group=4, topk_group=2, renormalize=True, routed_scaling_factor=2.5)
    if rule == "top_k":
        kw.update(shared_intermediate_size=64)
    ref = PEAMoE(h, f, e, **kw)
    with torch.no_grad():
        ref.gate.weight.zero_()
        ref.gate.weight[:, :e] = torch.eye(e)  # logits = the first E input features
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())  # the weights both layers use
    layer = PEAMoE(h, f, e, **kw)
    layer.load_state_dict(ref.state_dict())
    layer = layer.to("cuda", dtype)
    x = torch.randn(231, h).to(dtype).float()
    # Distinct multiples of 1/4 shifted by 1/16: exact in bf16, and no pair a, -a (whose
    # sigmoids sum to exactly 1 and would tie the group scores of the group-limited rule).
    x[:, :e] = torch.stack([torch.randperm(e) for _ in range(231)]).float() * 0.25 - 2.0625
    return ref, layer, x


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rule", ["top_k", "top_p", "group_limited"])
def test_peamoe_on_cuda_matches_the_cpu_layer_forward_and_backward(dtype, rule):
    ref, layer, x = _layer_and_input(dtype, rule)
    xr = x.clone().requires_grad_()
    xg = x.to("cuda", dtype).requires_grad_()
    y_ref, y = ref(xr), layer(xg)
    assert torch.equal(layer.last_routing.expert_ids.cpu(), ref.last_routing.expert_ids)
    _close(y, y_ref, dtype)
    gy = torch.randn_like(y_ref)
    (y_ref * gy).sum().backward()
    (y.float() * gy.to("cuda")).sum().backward()
    _close(xg.grad, xr.grad, dtype)
    for (name, p_ref), p in zip(ref.named_parameters(), layer.parameters()):
        assert p.grad is not None, name
        _close(p.grad, p_ref.grad, dtype)


@pytest.mark.gpu
@needs_cuda
def test_peamoe_on_cuda_rejects_what_the_kernels_cannot_run():
    with pytest.raises(DTypeError, match="float16 or bfloat16.*convert the module"):
        PEAMoE(64, 32, 4, router="top_k").cuda()(torch.randn(5, 64, device="cuda"))
    with pytest.raises(ShapeError, match="multiples of 8"):
        PEAMoE(60, 32, 4, router="top_k").cuda().half()(torch.randn(5, 60, device="cuda").half())
    layer = PEAMoE(64, 32, 4, router="top_k").cuda().half()
    with torch.no_grad():
        assert layer(torch.zeros(0, 64, device="cuda").half()).shape == (0, 64)
    with pytest.raises(DeviceError):
        layer(torch.randn(5, 64).half())


@given(
    st.lists(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, float("inf"), float("-inf")])
        | st.floats(-1e6, 1e6, width=32),
        min_size=1,
        max_size=40,
    )
)
def test_router_selection_keys_order_by_value_then_lower_index(values):
    # The packed keys of cuda/router.cu (select_key), evaluated with numpy's 32/64-bit integers.
    src = " ".join(_runtime.source("router.cu").split())
    assert "int bits = __float_as_int(v + 0.0f);" in src
    assert "int ordered = bits ^ (int)(((u32)(bits >> 31)) >> 1);" in src
    assert "return ((i64)ordered << 32) | (i64)(u32)(E - 1 - i);" in src
    v = np.array(values, dtype=np.float32)
    e = len(v)
    bits = (v + np.float32(0.0)).view(np.int32)
    ordered = bits ^ ((bits >> 31).view(np.uint32) >> 1).view(np.int32)
    keys = (ordered.astype(np.int64) << 32) | (e - 1 - np.arange(e)).astype(np.uint32).astype(np.int64)
    by_key = np.argsort(-keys, kind="stable")
    by_value = sorted(range(e), key=lambda i: (-float(v[i]), i))
    assert by_key.tolist() == by_value
