"""The FlexAttention path of Dynamic Attention Routing (deepseek_rs.attention.flex).

On the CPU: the BlockMask against the selection, the mask_mod against the dense rule, and the
eager FlexAttention results against the gather path and dense references (float64). torch
refuses FlexAttention's backward on the CPU at its entry, so the gradient test lifts that one
check to run torch's eager (math) backward with our mask. Tests marked ``gpu`` run the compiled
kernel on CUDA and skip without it.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from deepseek_rs import DeviceError, DynamicAttention, InvalidValueError, ShapeError
from deepseek_rs.attention import flex, sparse
from deepseek_rs.attention.layout import block_layout
from deepseek_rs.attention.module import dynamic_attention
from deepseek_rs.attention.sparse import block_sparse_attention
from hypothesis import given
from hypothesis import strategies as st
from test_attention import dense_mask, problem, random_indices, reference

fa = pytest.importorskip("torch.nn.attention.flex_attention")
f64 = torch.float64
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def loud_recompile_limit():
    """A compiled FlexAttention that hits dynamo's recompile limit falls back to torch's eager
    (dense) FlexAttention with one warning: make that an error here, so no test passes on it."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


def selected_table(idx, lay, causal):
    """[B, Hkv, NQ, NK] bool: the blocks a query block attends (none after it when causal)."""
    b, hkv, nq, _ = idx.shape
    nk = lay.num_key_blocks
    t = torch.zeros(b, hkv, nq, nk + 1, dtype=torch.bool, device=idx.device)
    t.scatter_(-1, torch.where(idx >= 0, idx, nk), True)
    t = t[..., :nk]
    if causal:
        own = lay.first_block + torch.arange(nq, device=idx.device).view(nq, 1)
        t = t & (torch.arange(nk, device=idx.device) <= own)
    return t


def dense_of(num_blocks, indices, num_cols):
    """[..., rows, num_cols] bool of BlockMask's (num_blocks, indices) tables."""
    used = torch.arange(indices.shape[-1]) < num_blocks.unsqueeze(-1)
    t = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.bool)
    return t.scatter_(-1, torch.where(used, indices.long(), num_cols), True)[..., :num_cols]


@given(problem(), st.booleans())
def test_block_mask_is_the_selection_and_its_mask_mod_the_dense_rule(prob, with_padding):
    q, k, _, bs, causal, gen = prob
    b, hq, hkv, tq, tk = q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    g = hq // hkv
    lay = block_layout(tq, tk, bs)
    idx = random_indices(b, hkv, lay, gen)
    padding = torch.rand(b, tk, generator=gen) < 0.8 if with_padding else None
    mask = flex.selection_block_mask(
        idx, lay, q_len=tq, k_len=tk, num_heads=hq, causal=causal, key_padding_mask=padding
    )
    table = selected_table(idx, lay, causal).repeat_interleave(g, 1)
    nk = lay.num_key_blocks
    partial = dense_of(mask.kv_num_blocks, mask.kv_indices, nk)
    full = dense_of(mask.full_kv_num_blocks, mask.full_kv_indices, nk)
    assert not bool((partial & full).any())
    assert torch.equal(partial | full, table)
    assert mask.BLOCK_SIZE == (bs, bs)
    assert mask.kv_indices.shape[-1] == max(nk, idx.shape[-1])  # compiled kernels size keys by it
    assert mask.kv_indices.dtype == torch.int32 and mask.kv_indices.is_contiguous()
    # the transposed (query-side) tables of the backward agree
    q_side = dense_of(mask.q_num_blocks, mask.q_indices, lay.num_query_blocks).transpose(-1, -2)
    assert torch.equal(q_side, partial)
    # the mask_mod alone is the dense rule (the real query rows; padding rows are cut off)
    pairs = fa.create_mask(mask.mask_mod, b, hq, lay.num_query_blocks * bs, tk, device="cpu")
    real = pairs[:, :, lay.front : lay.front + tq]
    assert torch.equal(real, dense_mask(idx, tq, tk, bs, causal, padding, g))
    # blocks outside the BlockMask hold no attended pair: skipping them is exact
    pad_k = lay.num_key_blocks * bs - tk
    blocks = F.pad(pairs, (0, pad_k)).view(b, hq, lay.num_query_blocks, bs, lay.num_key_blocks, bs)
    any_pair = blocks.any(-1).any(-2)
    assert not bool((any_pair & ~table).any())
    # "full" blocks (which skip the mask_mod) have every pair attended, keys past the end excepted
    key_real = F.pad(torch.ones(tk, dtype=torch.bool), (0, pad_k)).view(lay.num_key_blocks, 1, bs)
    all_pairs = (blocks | ~key_real.transpose(0, 1).view(1, 1, 1, 1, lay.num_key_blocks, bs)).all(-1).all(-2)
    assert not bool((full & ~all_pairs).any())


@given(problem(), st.booleans())
def test_flex_equals_gather_and_the_dense_reference(prob, with_padding):
    q, k, v, bs, causal, gen = prob
    b, hkv, tq, tk = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
    lay = block_layout(tq, tk, bs)
    idx = random_indices(b, hkv, lay, gen)
    padding = torch.rand(b, tk, generator=gen) < 0.8 if with_padding else None
    kw = dict(block_size=bs, causal=causal, key_padding_mask=padding, return_lse=True, return_block_mass=True)
    got = block_sparse_attention(q, k, v, idx, backend="flex", **kw)
    gathered = block_sparse_attention(q, k, v, idx, backend="gather", **kw)
    want, want_lse = reference(q, k, v, dense_mask(idx, tq, tk, bs, causal, padding, q.shape[1] // hkv))
    torch.testing.assert_close(got.out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.lse, want_lse, rtol=1e-10, atol=1e-10)
    assert got.lse.dtype == gathered.lse.dtype
    torch.testing.assert_close(got.out, gathered.out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.block_mass, gathered.block_mass, rtol=1e-10, atol=1e-12)


@given(problem(), st.booleans(), st.integers(1, 4))
def test_few_queries_take_a_query_tile_and_equal_gather(prob, with_padding, tq):
    """Decoding-sized queries get a mask over a tile of rows (a power of two dividing the block),
    not whole blocks: its tables are those of the tile's query block, the results those of gather."""
    q, k, v, bs, causal, gen = prob
    b, hkv, tk = q.shape[0], k.shape[1], k.shape[2]
    tq = min(tq, q.shape[2])
    q = q[:, :, -tq:]
    lay = block_layout(tq, tk, bs)
    idx = random_indices(b, hkv, lay, gen)
    padding = torch.rand(b, tk, generator=gen) < 0.8 if with_padding else None
    tile = flex._query_tile(tq, bs, 1)
    mask = flex.selection_block_mask(
        idx,
        lay,
        q_len=tq,
        k_len=tk,
        num_heads=q.shape[1],
        causal=causal,
        key_padding_mask=padding,
        query_tile=tile,
    )
    whole = flex.selection_block_mask(
        idx, lay, q_len=tq, k_len=tk, num_heads=q.shape[1], causal=causal, key_padding_mask=padding
    )
    r0, r1 = flex.query_rows(lay, tq, tile)
    assert r0 <= lay.front and lay.front + tq <= r1 and mask.seq_lengths == (r1 - r0, tk)
    assert mask.BLOCK_SIZE == (tile, bs) and (r1 - r0) % tile == 0 and r1 - r0 <= whole.seq_lengths[0]
    block_of_tile = torch.arange(r0, r1, tile) // bs
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(mask, name), getattr(whole, name).index_select(2, block_of_tile))
    pairs = fa.create_mask(mask.mask_mod, b, q.shape[1], r1 - r0, tk, device="cpu")
    whole_pairs = fa.create_mask(whole.mask_mod, b, q.shape[1], whole.seq_lengths[0], tk, device="cpu")
    assert torch.equal(pairs, whole_pairs[:, :, r0:r1])
    kw = dict(block_size=bs, causal=causal, key_padding_mask=padding, return_lse=True)
    with torch.no_grad():
        got = block_sparse_attention(q, k, v, idx, backend="flex", **kw)
    want = block_sparse_attention(q, k, v, idx, backend="gather", **kw)
    torch.testing.assert_close(got.out, want.out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-10, atol=1e-10)


def test_query_tile_choice():
    assert flex._query_tile(1, 128, 16) == 16
    assert flex._query_tile(20, 128, 16) == 32
    assert flex._query_tile(100, 128, 16) == 128  # 128 rows: the block itself
    assert flex._query_tile(1, 384, 16) == 16 and flex._query_tile(200, 384, 16) == 384
    assert flex._query_tile(1, 16, 16) == 16 and flex._query_tile(1, 6, 1) == 1
    assert flex._query_tile(3, 6, 1) == 6  # 4 does not divide 6
    with pytest.raises(InvalidValueError, match="divide"):
        flex.selection_block_mask(
            torch.tensor([[[[0]]]]), block_layout(1, 8, 8), q_len=1, k_len=8, num_heads=1, query_tile=3
        )


@given(problem())
def test_every_block_selected_equals_sdpa(prob):
    q, k, v, bs, causal, _ = prob
    k, v = k[:, :, -q.shape[2] :], v[:, :, -q.shape[2] :]  # SDPA aligns a causal mask top-left
    nk = block_layout(q.shape[2], k.shape[2], bs).num_key_blocks
    out, _, _ = dynamic_attention(q, k, v, block_size=bs, causal=causal, top_k=nk, backend="flex")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@given(problem(max_t=24), st.booleans())
def test_gradients_match_the_dense_reference(prob, with_padding):
    q, k, v, bs, causal, gen = prob
    b, hkv, tq, tk = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
    lay = block_layout(tq, tk, bs)
    idx = random_indices(b, hkv, lay, gen)
    padding = torch.rand(b, tk, generator=gen) < 0.8 if with_padding else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with pytest.MonkeyPatch.context() as mp:  # lift torch's "no backward on the CPU" entry check
        mp.setattr(fa, "_validate_device", lambda *args: None)
        mp.setattr(flex, "flex_unavailable_reason", lambda *args: None)
        got = flex.flex_block_sparse_attention(
            q, k, v, idx, block_size=bs, causal=causal, key_padding_mask=padding
        ).out
    want, _ = reference(q, k, v, dense_mask(idx, tq, tk, bs, causal, padding, q.shape[1] // hkv))
    w = torch.randn(want.shape, generator=gen, dtype=f64)
    for a, e in zip(
        torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))
    ):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_length_one_and_rows_without_keys():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 1, 4, dtype=f64, generator=gen)
    k = torch.randn(1, 1, 9, 4, dtype=f64, generator=gen)
    v = torch.randn(1, 1, 9, 4, dtype=f64, generator=gen)
    idx = torch.tensor([[[[0, 2]]]])  # one decoding query at position 8 (block 2), sink + own block
    got = block_sparse_attention(q, k, v, idx, block_size=4, backend="flex", return_lse=True)
    want = block_sparse_attention(q, k, v, idx, block_size=4, backend="gather", return_lse=True)
    torch.testing.assert_close(got.out, want.out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-12, atol=1e-12)
    # every key padded: zeros and -inf, as the gather path
    none = torch.zeros(1, 9, dtype=torch.bool)
    got = block_sparse_attention(
        q, k, v, idx, block_size=4, backend="flex", key_padding_mask=none, return_lse=True
    )
    assert torch.equal(got.out, torch.zeros_like(got.out)) and bool(torch.isinf(got.lse).all())
    # no slot at all
    empty = block_sparse_attention(q, k, v, idx[..., :0], block_size=4, backend="flex", return_lse=True)
    assert torch.equal(empty.out, torch.zeros_like(empty.out))


def test_dynamic_attention_module_backends_agree():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 50, 8, generator=gen, dtype=f64)  # float64: eager FlexAttention, no compile
    k = torch.randn(2, 2, 50, 8, generator=gen, dtype=f64)
    v = torch.randn(2, 2, 50, 8, generator=gen, dtype=f64)
    outs = []
    for backend in ("gather", "flex"):
        m = DynamicAttention(4, 2, 8, block_size=8, top_k=2, backend=backend, dtype=f64).eval()
        with torch.no_grad():
            outs.append((m(q, k, v), m.last_selection.block_indices))
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)


def test_auto_takes_gather_on_the_cpu_and_flex_where_it_can_on_cuda(monkeypatch):
    monkeypatch.setattr(flex, "_has_triton", lambda: True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sparse.resolve_backend("auto", cpu, 64, 64, 64, False) == "gather"
    assert sparse.resolve_backend("flex", cpu, 7, 4, 3, False) == "flex"
    assert sparse.resolve_backend("gather", cuda, 64, 64, 64, True) == "gather"
    for bs in (16, 64, 128, 256, 384):
        assert flex.flex_unavailable_reason(cuda, bs, 64, 64) is None
        assert sparse.resolve_backend("auto", cuda, bs, 64, 64, True) == "flex"
    for bs in (1, 8, 24, 100):
        assert "power of two >= 16 or a multiple of 128" in flex.flex_unavailable_reason(cuda, bs, 64, 64)
        assert sparse.resolve_backend("auto", cuda, bs, 64, 64, True) == "gather"
        with pytest.raises(DeviceError, match="power of two"):
            sparse.resolve_backend("flex", cuda, bs, 64, 64, False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flex, "_has_triton", lambda: False)
        assert "Triton" in flex.flex_unavailable_reason(cuda, 64, 64, 64)
        assert sparse.resolve_backend("auto", cuda, 64, 64, 64, True) == "gather"
    assert "head dims >= 16" in flex.flex_unavailable_reason(cuda, 64, 8, 64)
    assert sparse.resolve_backend("auto", cuda, 64, 64, 8, True) == "gather"
    with pytest.raises(DeviceError, match="head dims"):
        sparse.resolve_backend("flex", cuda, 64, 64, 8, False)


def test_bad_input_errors():
    q = torch.randn(1, 2, 8, 4, dtype=f64)
    k = v = torch.randn(1, 1, 8, 4, dtype=f64)
    idx = torch.tensor([[[[0, 1], [1, -1]]]])
    with pytest.raises(InvalidValueError, match="backend"):
        block_sparse_attention(q, k, v, idx, block_size=4, backend="cuda")
    with pytest.raises(InvalidValueError, match="backend"):
        DynamicAttention(2, 1, 4, backend="triton")
    with pytest.raises(DeviceError, match="no backward on the CPU"):
        block_sparse_attention(q.requires_grad_(), k, v, idx, block_size=4, backend="flex")
    with torch.no_grad():  # no gradient wanted: the CPU flex path runs
        block_sparse_attention(q, k, v, idx, block_size=4, backend="flex")
    q = q.detach()
    with pytest.raises(InvalidValueError, match="inference only"):
        flex.flex_block_sparse_attention(
            q.float(), k.float(), v.float(), idx, block_size=4, compile=True, return_lse=True
        )
    with pytest.raises(InvalidValueError, match="float64"):
        flex.flex_block_sparse_attention(q, k, v, idx, block_size=4, compile=True)
    with pytest.raises(ShapeError, match="block_indices"):
        flex.flex_block_sparse_attention(q, k, v, idx[:, :, :1], block_size=4)
    with pytest.raises(InvalidValueError, match="twice"):
        flex.flex_block_sparse_attention(q, k, v, torch.tensor([[[[0, 0], [1, -1]]]]), block_size=4)


@pytest.mark.slow
def test_compiled_cpu_kernel_equals_gather():
    gen = torch.Generator().manual_seed(5)
    b, hkv, g, tk, tq, d, bs = 2, 2, 2, 300, 250, 16, 32
    q = torch.randn(b, hkv * g, tq, d, generator=gen)
    k = torch.randn(b, hkv, tk, d, generator=gen)
    v = torch.randn(b, hkv, tk, d, generator=gen)
    lay = block_layout(tq, tk, bs)
    padding = torch.rand(b, tk, generator=gen) < 0.9
    for causal in (True, False):
        idx = random_indices(b, hkv, lay, gen)
        kw = dict(block_size=bs, causal=causal, key_padding_mask=padding)
        got = flex.flex_block_sparse_attention(q, k, v, idx, compile=True, **kw).out
        want = block_sparse_attention(q, k, v, idx, backend="gather", **kw).out
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for bs in (3, 4):  # new block sizes recompile (torch's dynamic-shape CPU kernel failed to build here)
        idx = random_indices(b, hkv, block_layout(tq, tk, bs), gen)
        got = flex.flex_block_sparse_attention(q, k, v, idx, block_size=bs, compile=True).out
        want = block_sparse_attention(q, k, v, idx, block_size=bs, backend="gather").out
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_cpu_kernel_with_a_selection_narrower_than_the_key_blocks():
    """The selection's S slots are far fewer than the NK key blocks (the sparse case DAR is for):
    the compiled kernel sizes the key axis from the block mask's tables."""
    gen = torch.Generator().manual_seed(6)
    t, d, bs = 1024, 16, 64
    q, k, v = (torch.randn(1, 2, t, d, generator=gen) for _ in range(3))
    nq = t // bs
    own = torch.arange(nq).view(1, 1, nq, 1).expand(1, 2, nq, 1)
    idx = torch.cat([own, torch.zeros_like(own), (own - 3).clamp_min(-1)], -1)  # own, sink, 3 back
    idx = torch.where((idx == 0) & (torch.arange(3) > 0) & (own == 0), -1, idx)  # no duplicates
    idx = torch.where((idx == 0) & (torch.arange(3) == 2) & (own == 3), -1, idx)
    got = flex.flex_block_sparse_attention(q, k, v, idx, block_size=bs, compile=True).out
    want = block_sparse_attention(q, k, v, idx, block_size=bs, backend="gather").out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def tol(dtype):
    low = dtype in (torch.bfloat16, torch.float16)
    return dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-5, atol=1e-5)


def test_compiled_calls_share_graphs_and_stay_compiled_past_dynamos_limit(monkeypatch):
    """Dynamo's recompile limit (8 by default, 1 here) would send the process's compiled
    FlexAttention to torch's dense eager one: the compiled path raises its limit, and causal and
    non-causal calls (captured tensors, not constants) share one graph. ``aot_eager`` traces what
    Inductor would compile without building a kernel."""
    compiled = flex._compiled_flex
    monkeypatch.setattr(flex, "_compiled_flex", lambda device_type: compiled(device_type, "aot_eager"))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    gen = torch.Generator().manual_seed(8)
    with torch._dynamo.config.patch(recompile_limit=1):
        for dtype, causal in ((torch.float32, True), (torch.float32, False), (torch.bfloat16, True)):
            q = torch.randn(1, 4, 20, 16, generator=gen).to(dtype)
            k, v = (torch.randn(1, 2, 24, 16, generator=gen).to(dtype) for _ in range(2))
            idx = random_indices(1, 2, block_layout(20, 24, 8), gen)
            kw = dict(block_size=8, causal=causal)
            got = flex.flex_block_sparse_attention(q, k, v, idx, compile=True, **kw).out
            want = block_sparse_attention(q, k, v, idx, backend="gather", **kw).out
            torch.testing.assert_close(got, want, **tol(dtype))
    assert counters["stats"]["unique_graphs"] == 2  # float32 (causal or not), bfloat16


def test_cpu_compiles_prefill_only_one_graph_per_power_of_two_of_blocks(monkeypatch):
    """On the CPU (static graphs), lengths are bucketed to powers of two of blocks: prefills of
    33..64 keys in blocks of 8 share one graph; one-token decoding is not compiled by default."""
    compiled, calls = flex._compiled_flex, []

    def aot_eager(device_type):
        calls.append(device_type)
        return compiled(device_type, "aot_eager")

    monkeypatch.setattr(flex, "_compiled_flex", aot_eager)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    gen = torch.Generator().manual_seed(9)
    for tq, tk, causal, padded in ((40, 40, True, False), (50, 57, False, True), (1, 64, True, True)):
        q = torch.randn(2, 4, tq, 16, generator=gen)
        k, v = (torch.randn(2, 2, tk, 16, generator=gen) for _ in range(2))
        idx = random_indices(2, 2, block_layout(tq, tk, 8), gen)
        padding = torch.rand(2, tk, generator=gen) < 0.8 if padded else None
        kw = dict(block_size=8, causal=causal, key_padding_mask=padding)
        got = flex.flex_block_sparse_attention(q, k, v, idx, **kw).out
        want = block_sparse_attention(q, k, v, idx, backend="gather", **kw).out
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if tq > 1:
            assert counters["stats"]["unique_graphs"] == 1
    assert calls == ["cpu", "cpu"]  # the decoding step ran eager


# --------------------------------------------------------------------------------------------
# CUDA (compiled FlexAttention)
# --------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_every_block_selected_equals_sdpa(dtype, causal):
    """Against a float64 reference, the flex path's error (output and gradients) is at most twice
    that of SDPA in the same dtype, plus a small floor (the test of torch's own FlexAttention)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hkv, t, d, bs = 2, 8, 2, 1000, 64, 128
    x64 = [torch.randn(b, h, t, d, device="cuda", dtype=f64, generator=gen) for h in (hq, hkv, hkv)]
    w = torch.randn(b, hq, t, d, device="cuda", dtype=f64, generator=gen)
    nk = block_layout(t, t, bs).num_key_blocks

    def run(fn, dt):
        x = [a.to(dt).requires_grad_() for a in x64]
        out = fn(*x)
        grads = torch.autograd.grad((out.to(f64) * w).sum(), x)
        return [out, *grads]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def dar(q, k, v):  # backend "auto": flex on CUDA
        return dynamic_attention(q, k, v, block_size=bs, causal=causal, top_k=nk)[0]

    ref = run(sdpa, f64)
    for name, got, base, r in zip(("out", "dq", "dk", "dv"), run(dar, dtype), run(sdpa, dtype), ref):
        err, base_err = (got.to(f64) - r).abs().max().item(), (base.to(f64) - r).abs().max().item()
        assert err <= 2 * base_err + 1e-3, (name, err, base_err)


def check_cuda_against_dense(seed, bs, causal, hq, hkv, tq, tk, d, dv):
    """float32 flex on CUDA against the float64 dense masked reference: output, lse, block_mass
    (against the gather path) and gradients, with a random selection and key padding."""
    gen = torch.Generator().manual_seed(seed)
    b = 2
    q = torch.randn(b, hq, tq, d, generator=gen, dtype=f64)
    k = torch.randn(b, hkv, tk, d, generator=gen, dtype=f64)
    v = torch.randn(b, hkv, tk, dv, generator=gen, dtype=f64)
    lay = block_layout(tq, tk, bs)
    idx = random_indices(b, hkv, lay, gen, p=0.3)
    padding = torch.rand(b, tk, generator=gen) < 0.9
    mask = dense_mask(idx, tq, tk, bs, causal, padding, hq // hkv)
    want, want_lse = reference(q, k, v, mask)
    cuda = [t.to("cuda", torch.float32).requires_grad_() for t in (q, k, v)]
    got = block_sparse_attention(
        *cuda,
        idx.cuda(),
        block_size=bs,
        causal=causal,
        key_padding_mask=padding.cuda(),
        return_lse=True,
        return_block_mass=True,
    )
    torch.testing.assert_close(got.out.double().cpu(), want, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got.lse.double().cpu(), want_lse, rtol=2e-4, atol=2e-4)
    with torch.no_grad():  # inference: few queries take a query tile smaller than the block
        kw = dict(block_size=bs, causal=causal, key_padding_mask=padding.cuda(), return_lse=True)
        inference = block_sparse_attention(*(t.detach() for t in cuda), idx.cuda(), **kw)
    torch.testing.assert_close(inference.out.double().cpu(), want, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(inference.lse.double().cpu(), want_lse, rtol=2e-4, atol=2e-4)
    gathered = block_sparse_attention(
        q, k, v, idx, block_size=bs, causal=causal, key_padding_mask=padding, return_block_mass=True
    )
    torch.testing.assert_close(got.block_mass.double().cpu(), gathered.block_mass, rtol=1e-3, atol=1e-4)
    qr, kr, vr = (t.requires_grad_() for t in (q, k, v))
    want, _ = reference(qr, kr, vr, mask)
    w = torch.randn(want.shape, generator=gen, dtype=f64)
    g_want = torch.autograd.grad((want * w).sum(), (qr, kr, vr))
    g_got = torch.autograd.grad((got.out * w.to("cuda", torch.float32)).sum(), cuda)
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-3, atol=1e-3)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("bs", [16, 64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_random_selection_matches_dense_masked_reference(bs, causal):
    check_cuda_against_dense(bs + causal, bs, causal, hq=4, hkv=2, tq=650, tk=700, d=64, dv=64)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "case, bs, tq, tk, d, dv",
    [
        ("one-token decoding, mid-block", 128, 1, 1000, 64, 64),
        ("one-token decoding, block start", 64, 1, 961, 64, 64),
        ("block size 384 (3 x 128)", 384, 900, 1000, 64, 64),
        ("head dim 80", 128, 500, 700, 80, 80),
        ("head dim 96, value dim 48", 64, 500, 700, 96, 48),
        ("value dim 128, head dim 64", 64, 300, 300, 64, 128),
    ],
)
def test_gpu_decoding_block_and_head_sizes(case, bs, tq, tk, d, dv):
    for causal in (True, False):
        check_cuda_against_dense(tq + d + dv + causal, bs, causal, hq=8, hkv=2, tq=tq, tk=tk, d=d, dv=dv)


@needs_cuda
@pytest.mark.gpu
def test_gpu_dynamic_attention_trains_through_flex():
    torch.manual_seed(0)
    m = DynamicAttention(8, 2, 64, block_size=64, top_k=3).cuda().train()
    q = torch.randn(2, 8, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = m(q, k, v)
    ref = DynamicAttention(8, 2, 64, block_size=64, top_k=3, backend="gather").cuda().train()
    want = ref(q, k, v)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(m.gate_loss, ref.gate_loss, rtol=2e-2, atol=2e-3)
    (out.float().square().mean() + m.gate_loss).backward()
    assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
    assert m.gate.q_proj.grad is not None


def test_block_indices_are_checked_once_and_cuda_takes_the_main_kernel(monkeypatch):
    checks = []
    check = sparse.check_block_indices
    monkeypatch.setattr(sparse, "check_block_indices", lambda *a: checks.append(1) or check(*a))
    monkeypatch.setattr(flex, "check_block_indices", sparse.check_block_indices)
    q = k = v = torch.randn(1, 1, 8, 4, dtype=f64)
    block_sparse_attention(q, k, v, torch.tensor([[[[0, -1], [0, 1]]]]), block_size=4, backend="flex")
    assert len(checks) == 1  # each check syncs with the device (min, max, duplicates)
    # the main Triton kernel: through BACKEND where torch has it (it refuses the legacy knob with it)
    assert flex._cuda_kernel_options(128, 128) == {"BACKEND": "TRITON"}
    assert flex._cuda_kernel_options(384, 384) == {"BACKEND": "TRITON"}
    # tiles pinned to small sparse blocks (Inductor shrinks its tiles only for powers of two, and
    # not under max_autotune, whose configs are all >= 64)
    assert flex._cuda_kernel_options(16, 384) == {"BACKEND": "TRITON", "fwd_BLOCK_M": 16}
    assert flex._cuda_kernel_options(64, 64) == {"BACKEND": "TRITON", "fwd_BLOCK_M": 64}
    bwd = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32}
    assert flex._cuda_kernel_options(32, 32) == {
        "BACKEND": "TRITON",
        "fwd_BLOCK_M": 32,
        "fwd_BLOCK_N": 32,
        **bwd,
    }
    monkeypatch.setattr(fa.FlexKernelOptions, "__annotations__", {"FORCE_USE_FLEX_ATTENTION": bool})
    assert flex._cuda_kernel_options(128, 128) == {"FORCE_USE_FLEX_ATTENTION": True}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_masked_keys_do_not_reach_the_output(bad):
    """A NaN or inf in a key that is masked (after the query under causality, padded, or in an
    unselected block) changes nothing, on both backends; the rows that see it still do."""
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(1, 2, 12, 4, dtype=f64, generator=gen)
    k = torch.randn(1, 1, 12, 4, dtype=f64, generator=gen)
    v = torch.randn(1, 1, 12, 4, dtype=f64, generator=gen)
    idx = torch.tensor([[[[0, -1, -1], [0, 1, -1], [0, 2, -1]]]])  # query block 2 skips block 1
    padding = torch.ones(1, 12, dtype=torch.bool)
    padding[0, 9] = False
    bad_k = k.clone()
    bad_k[0, 0, 5, 1] = bad  # after query rows 0..4 (its own block is 1); in no block of rows 8..11
    bad_k[0, 0, 9] = bad  # padded
    for backend in ("gather", "flex"):
        kw = dict(block_size=4, key_padding_mask=padding, return_lse=True, backend=backend)
        want = block_sparse_attention(q, k, v, idx, **kw)
        got = block_sparse_attention(q, bad_k, v, idx, **kw)
        clean = torch.tensor([r < 5 or r >= 8 for r in range(12)])  # rows that never see key 5
        torch.testing.assert_close(got.out[:, :, clean], want.out[:, :, clean], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.lse[:, :, clean], want.lse[:, :, clean], rtol=1e-12, atol=1e-12)
        if math.isnan(bad):  # the test can fail: without causality, rows 4..7 see key 5
            non_causal = block_sparse_attention(q, bad_k, v, idx, causal=False, **kw)
            assert bool(torch.isnan(non_causal.out[:, :, 4:8]).all())


def test_scale_is_passed_through():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 1, 10, 4, dtype=f64, generator=gen)
    k = torch.randn(1, 1, 10, 4, dtype=f64, generator=gen)
    v = torch.randn(1, 1, 10, 4, dtype=f64, generator=gen)
    idx = torch.tensor([[[[0, 1], [1, -1], [0, 2]]]])
    got = block_sparse_attention(q, k, v, idx, block_size=4, backend="flex", scale=0.3, causal=False)
    want = block_sparse_attention(q, k, v, idx, block_size=4, backend="gather", scale=0.3, causal=False)
    torch.testing.assert_close(got.out, want.out, rtol=1e-12, atol=1e-12)
    assert not math.isclose(float(got.out.abs().sum()), 0.0)


@pytest.mark.parametrize("chunk_elements", [1, 1 << 23])
def test_block_mass_over_many_key_blocks_in_chunks(monkeypatch, chunk_elements):
    monkeypatch.setattr(flex, "CHUNK_ELEMENTS", chunk_elements)  # 1: a query block per chunk
    gen = torch.Generator().manual_seed(7)
    b, hkv, g, tk, tq, d, bs = 1, 2, 2, 161, 150, 4, 2  # 81 key blocks
    q = torch.randn(b, hkv * g, tq, d, dtype=f64, generator=gen)
    k = torch.randn(b, hkv, tk, d, dtype=f64, generator=gen)
    v = torch.randn(b, hkv, tk, d, dtype=f64, generator=gen)
    lay = block_layout(tq, tk, bs)
    idx = random_indices(b, hkv, lay, gen, p=0.3)
    padding = torch.rand(b, tk, generator=gen) < 0.9
    kw = dict(block_size=bs, key_padding_mask=padding, return_block_mass=True)
    got = block_sparse_attention(q, k, v, idx, backend="flex", **kw).block_mass
    want = block_sparse_attention(q, k, v, idx, backend="gather", **kw).block_mass
    assert bool((want > 0).any())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_auto_on_the_cpu_never_calls_flex(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the flex path ran")

    monkeypatch.setattr(sparse, "run_flex", refuse)
    q = k = v = torch.randn(1, 1, 8, 4)
    idx = torch.tensor([[[[0, -1], [0, 1]]]])
    block_sparse_attention(q, k, v, idx, block_size=4)
    DynamicAttention(1, 1, 4, block_size=4)(q, k, v)
    with pytest.raises(AssertionError, match="flex path ran"):
        block_sparse_attention(q, k, v, idx, block_size=4, backend="flex")


def test_patched_llama_with_the_flex_backend_matches_gather_in_cached_decoding():
    transformers = pytest.importorskip("transformers")
    from deepseek_rs import patch_attention

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    base = transformers.LlamaForCausalLM(cfg).double().eval()  # float64: eager FlexAttention
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    logits = {}
    for backend in ("gather", "flex"):
        model = patch_attention(copy.deepcopy(base), block_size=4, top_k=2, backend=backend)
        with torch.no_grad():
            out = model(ids[:, :17], attention_mask=mask[:, :17], use_cache=True)
            steps, cache = [out.logits], out.cache
            for t in range(17, 30):  # one-token decoding: the query starts mid-block
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
                steps.append(out.logits)
                cache = out.cache
        logits[backend] = torch.cat(steps, 1)
    torch.testing.assert_close(logits["flex"], logits["gather"], rtol=1e-10, atol=1e-10)
