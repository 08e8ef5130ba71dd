"""Dynamic Attention Routing against dense references (float64)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from deepseek_rs import DeviceError, DTypeError, DynamicAttention, InvalidValueError, ShapeError
from deepseek_rs.attention.gate import BlockGate, gate_distillation_loss
from deepseek_rs.attention.layout import block_layout
from deepseek_rs.attention.module import computed_fraction, dynamic_attention, work_fraction
from deepseek_rs.attention.selection import Selection, pool_blocks, routable_blocks, select_blocks
from deepseek_rs.attention.sparse import block_sparse_attention
from deepseek_rs.attention.training import dense_warmup, gate_losses, gate_parameters, gate_warmup
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

f64 = torch.float64


def dense_mask(block_indices, tq, tk, bs, causal, padding=None, group=1):
    """[B, Hq, Tq, Tk] bool: the (query, key) pairs a selection attends to."""
    b, hkv, nq, _ = block_indices.shape
    lay = block_layout(tq, tk, bs)
    sel = torch.zeros(b, hkv, nq, lay.num_key_blocks + 1, dtype=torch.bool)
    sel.scatter_(-1, torch.where(block_indices >= 0, block_indices, lay.num_key_blocks), True)
    qpos = torch.arange(tk - tq, tk)
    kpos = torch.arange(tk)
    m = sel[:, :, qpos // bs - lay.first_block][..., kpos // bs]  # [B, Hkv, Tq, Tk]
    if causal:
        m = m & (kpos.view(1, -1) <= qpos.view(-1, 1))
    if padding is not None:
        m = m & padding.view(b, 1, 1, tk)
    return m.repeat_interleave(group, dim=1)


def reference(q, k, v, mask, scale=None):
    """Dense masked attention; rows with no key give 0. Returns (out, lse)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0).unsqueeze(-1))
    return p @ v, lse


@st.composite
def problem(draw, max_t=40):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    g = draw(st.integers(1, 3))
    tk = draw(st.integers(1, max_t))
    tq = draw(st.one_of(st.just(tk), st.integers(1, tk)))
    d = draw(st.sampled_from([1, 4, 8]))
    dv = draw(st.sampled_from([d, 3]))
    bs = draw(st.integers(1, 12))
    causal = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, tq, d, generator=gen, dtype=f64)
    k = torch.randn(b, hkv, tk, d, generator=gen, dtype=f64)
    v = torch.randn(b, hkv, tk, dv, generator=gen, dtype=f64)
    return q, k, v, bs, causal, gen


def random_indices(b, hkv, lay, gen, p=0.5):
    """A random selection in random slot order, with unused (-1) slots."""
    nq, nk = lay.num_query_blocks, lay.num_key_blocks
    keep = torch.rand(b, hkv, nq, nk, generator=gen) < p
    perm = torch.argsort(torch.rand(b, hkv, nq, nk, generator=gen), dim=-1)
    idx = torch.where(keep.gather(-1, perm), perm, -1)
    return idx[..., : max(1, nk - 1)] if nk > 1 and bool(torch.rand(1, generator=gen) < 0.5) else idx


@given(problem())
def test_every_block_selected_equals_sdpa(prob):
    q, k, v, bs, causal, _ = prob
    k, v = k[:, :, -q.shape[2] :], v[:, :, -q.shape[2] :]  # SDPA aligns a causal mask top-left
    nk = block_layout(q.shape[2], k.shape[2], bs).num_key_blocks
    out, sel, _ = dynamic_attention(q, k, v, block_size=bs, causal=causal, top_k=nk)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert computed_fraction(sel, q.shape[2], k.shape[2], bs, causal) == pytest.approx(1.0)


@given(problem(), st.booleans())
def test_random_selection_matches_dense_masked_reference(prob, with_padding):
    q, k, v, bs, causal, gen = prob
    b, hkv, tq, tk = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
    lay = block_layout(tq, tk, bs)
    idx = random_indices(b, hkv, lay, gen)
    padding = torch.rand(b, tk, generator=gen) < 0.8 if with_padding else None
    mask = dense_mask(idx, tq, tk, bs, causal, padding, q.shape[1] // hkv)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    got = block_sparse_attention(
        q, k, v, idx, block_size=bs, causal=causal, key_padding_mask=padding, return_lse=True
    )
    want, want_lse = reference(q, k, v, mask)
    torch.testing.assert_close(got.out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.lse, want_lse, rtol=1e-10, atol=1e-10)
    w = torch.randn(want.shape, generator=gen, dtype=f64)
    g_got = torch.autograd.grad((got.out * w).sum(), (q, k, v))
    g_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_gradcheck_small():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 7, 3, dtype=f64, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 7, 3, dtype=f64, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 7, 2, dtype=f64, generator=gen, requires_grad=True)
    idx = torch.tensor([[[[0, -1], [1, 0], [2, -1], [3, 1]]]])
    assert torch.autograd.gradcheck(lambda *t: block_sparse_attention(*t, idx, block_size=2).out, (q, k, v))


def test_block_mass_is_the_dense_probability_per_block():
    gen = torch.Generator().manual_seed(1)
    b, hkv, g, t, d, bs = 2, 2, 2, 19, 4, 4
    q = torch.randn(b, hkv * g, t, d, dtype=f64, generator=gen)
    k = torch.randn(b, hkv, t, d, dtype=f64, generator=gen)
    v = torch.randn(b, hkv, t, d, dtype=f64, generator=gen)
    lay = block_layout(t, t, bs)
    idx = torch.arange(lay.num_key_blocks).expand(b, hkv, lay.num_query_blocks, -1).contiguous()
    got = block_sparse_attention(q, k, v, idx, block_size=bs, return_block_mass=True).block_mass
    mask = dense_mask(idx, t, t, bs, True, None, g)
    kk = k.repeat_interleave(g, 1)
    p = torch.softmax((q @ kk.transpose(-1, -2) / 2).masked_fill(~mask, -math.inf), -1)  # [B, Hq, T, T]
    pad = lay.num_key_blocks * bs - t
    per_block = F.pad(p, (0, pad)).view(b, hkv, g, t, lay.num_key_blocks, bs).sum(-1)
    per_block = F.pad(per_block, (0, 0, 0, pad)).view(b, hkv, g, lay.num_query_blocks, bs, -1)
    rows = torch.tensor([min(bs, t - n * bs) for n in range(lay.num_query_blocks)], dtype=f64)
    want = per_block.sum((2, 4)) / (rows.view(1, 1, -1, 1) * g)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(-1), torch.ones(b, hkv, lay.num_query_blocks, dtype=f64))


def test_padding_rows_without_keys_are_zero_and_finite_in_backward():
    q = torch.randn(1, 1, 6, 4, dtype=f64, requires_grad=True)
    k = torch.randn(1, 1, 6, 4, dtype=f64, requires_grad=True)
    v = torch.randn(1, 1, 6, 4, dtype=f64)
    pad = torch.tensor([[False, False, True, True, True, True]])  # left padding
    out, _, _ = dynamic_attention(q, k, v, block_size=4, top_k=2, key_padding_mask=pad)
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 4, dtype=f64))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    want, _ = reference(q, k, v, dense_mask(torch.tensor([[[[0, 1], [0, 1]]]]), 6, 6, 4, True, pad))
    torch.testing.assert_close(out, want)


def test_length_one_and_decoding_one_token():
    q = torch.randn(1, 4, 1, 8, dtype=f64)
    k = torch.randn(1, 2, 1, 8, dtype=f64)
    v = torch.randn(1, 2, 1, 8, dtype=f64)
    out, sel, _ = dynamic_attention(q, k, v, block_size=16)
    torch.testing.assert_close(out, v.repeat_interleave(2, 1))
    assert sel.block_indices.tolist() == [[[[0]], [[0]]]]
    # one new query over a 50-token cache: own block 3, the sink 0 and the router's pick
    k, v = torch.randn(1, 2, 50, 8, dtype=f64), torch.randn(1, 2, 50, 8, dtype=f64)
    out, sel, _ = dynamic_attention(q, k, v, block_size=16, top_k=1, sink_block=True)
    assert sel.block_indices.shape == (1, 2, 1, 3)
    assert (sel.block_indices[..., 0] == 0).all() and (sel.block_indices[..., -1] == 3).all()
    want, _ = reference(q, k, v, dense_mask(sel.block_indices, 1, 50, 16, True, None, 2))
    torch.testing.assert_close(out, want)


def test_empty_sequences():
    q = torch.randn(2, 2, 0, 4)
    k = torch.randn(2, 2, 0, 4)
    out, sel, _ = dynamic_attention(q, k, k, block_size=4)
    assert out.shape == (2, 2, 0, 4) and sel.block_indices.shape[2] == 0


@st.composite
def gate_logits(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    tk = draw(st.integers(1, 60))
    tq = draw(st.integers(1, tk))
    bs = draw(st.integers(1, 16))
    lay = block_layout(tq, tk, bs)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(b, h, lay.num_query_blocks, lay.num_key_blocks, generator=gen), lay, tq, tk


@given(
    gate_logits(),
    st.booleans(),
    st.integers(0, 6),
    st.integers(0, 2),
    st.booleans(),
)
def test_top_k_selection_is_forced_blocks_plus_best_candidates(gl, causal, top_k, local, sink):
    logits, lay, _, _ = gl
    idx = select_blocks(logits, lay, causal=causal, top_k=top_k, local_blocks=local, sink_block=sink)
    nq, nk = lay.num_query_blocks, lay.num_key_blocks
    for bh in range(logits.shape[0] * logits.shape[1]):
        for n in range(nq):
            row = idx.reshape(-1, nq, idx.shape[-1])[bh, n]
            got = [int(i) for i in row if i >= 0]
            assert got == sorted(got)
            own = lay.first_block + n
            visible = [j for j in range(nk) if not causal or j <= own]
            forced = {j for j in visible if abs(j - own) <= local or (sink and j == 0)}
            cand = [j for j in visible if j not in forced]
            lg = logits.reshape(-1, nq, nk)[bh, n]
            best = sorted(cand, key=lambda j: (-float(lg[j]), j))[:top_k]
            assert set(got) == forced | set(best)


@given(gate_logits(), st.floats(0.05, 1.0), st.integers(1, 3), st.integers(0, 4))
def test_top_p_selection_takes_the_mass_between_min_and_max(gl, p, min_blocks, extra):
    logits, lay, _, _ = gl
    max_blocks = min_blocks + extra
    idx = select_blocks(logits, lay, rule="top_p", top_p=p, min_blocks=min_blocks, max_blocks=max_blocks)
    nq = lay.num_query_blocks
    for bh in range(logits.shape[0] * logits.shape[1]):
        for n in range(nq):
            own = lay.first_block + n
            got = {int(i) for i in idx.reshape(-1, nq, idx.shape[-1])[bh, n] if i >= 0}
            cand = list(range(own))  # causal, no sink, no local window: every earlier block
            chosen = got - {own}
            assert own in got and chosen <= set(cand)
            assert min(min_blocks, len(cand)) <= len(chosen) <= min(max_blocks, len(cand))
            if cand:
                probs = torch.softmax(logits.reshape(-1, nq, lay.num_key_blocks)[bh, n, cand].double(), 0)
                ranked = sorted(range(len(cand)), key=lambda j: (-float(probs[j]), j))
                mass = [float(probs[j]) for j in ranked]
                # the smallest prefix reaching p, clamped to [min, max]
                need = next((i + 1 for i in range(len(mass)) if sum(mass[: i + 1]) >= p - 1e-6), len(mass))
                lo = next((i + 1 for i in range(len(mass)) if sum(mass[: i + 1]) >= p + 1e-6), len(mass))
                counts = {max(min_blocks, min(max_blocks, c)) for c in range(need, lo + 1)}
                assert len(chosen) in {min(c, len(cand)) for c in counts}
                assert chosen == {cand[j] for j in ranked[: len(chosen)]}


def test_padding_only_blocks_are_never_candidates():
    logits = torch.zeros(1, 1, 3, 3)
    logits[..., 1] = 10.0
    lay = block_layout(12, 12, 4)
    valid = torch.tensor([[True, False, True]])
    idx = select_blocks(logits, lay, top_k=1, key_block_valid=valid)
    assert 1 not in idx[0, 0, 2].tolist() and idx[0, 0, 2].tolist() == [0, 2]


def test_pool_blocks_means_and_identity_gate_is_moba():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 10, 6, dtype=f64, generator=gen)
    k = torch.randn(1, 2, 10, 6, dtype=f64, generator=gen)
    pad = torch.ones(1, 10, dtype=torch.bool)
    pad[0, 9] = False
    qp, kp, valid = pool_blocks(q, k, 4, pad)
    torch.testing.assert_close(kp[0, 1, 2], k[0, 1, 8])
    torch.testing.assert_close(kp[0, 0, 0], k[0, 0, :4].mean(0))
    torch.testing.assert_close(qp[0, 1, 1], q[0, 2:4, 4:8].mean((0, 1)))
    torch.testing.assert_close(qp[0, 1, 2], q[0, 2:4, 8].mean(0))  # padded query row 9 left out
    assert valid.tolist() == [[True, True, True]]
    gate = BlockGate(2, 6).double()
    torch.testing.assert_close(gate(qp, kp), qp @ kp.transpose(-1, -2) / math.sqrt(6))


def test_gate_loss_trains_only_the_gate_and_decreases():
    torch.manual_seed(0)
    m = DynamicAttention(4, 2, 8, block_size=4, top_k=2, sink_block=False).double().train()
    q = torch.randn(2, 4, 32, 8, dtype=f64, requires_grad=True)
    k = torch.randn(2, 2, 32, 8, dtype=f64, requires_grad=True)
    v = torch.randn(2, 2, 32, 8, dtype=f64)
    m(q, k, v)
    assert m.gate_loss is not None and m.gate_loss.item() > 0
    m.gate_loss.backward()
    assert q.grad is None and k.grad is None
    assert m.gate.q_proj.grad.abs().sum() > 0 and m.gate.k_proj.grad.abs().sum() > 0
    opt = torch.optim.Adam(m.gate.parameters(), lr=0.05)
    first = None
    for _ in range(30):
        m(q.detach(), k.detach(), v)
        loss = gate_losses(m)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    m.eval()
    m(q, k, v)
    assert m.gate_loss is None and gate_losses(m).item() == 0.0


def test_distillation_loss_is_zero_when_the_gate_matches_the_mass():
    mass = torch.tensor([[[[0.25, 0.75, 0.0]]]], dtype=f64)
    idx = torch.tensor([[[[0, 2, -1]]]])
    logits = torch.log(torch.tensor([[[[0.25, 5.0, 0.75]]]], dtype=f64))
    assert gate_distillation_loss(logits, idx, mass).item() == pytest.approx(0.0, abs=1e-12)
    assert gate_distillation_loss(logits.flip(-1), idx, mass).item() > 0.1


@given(gate_logits(), st.booleans(), st.integers(0, 4))
def test_computed_fraction_counts_pairs(gl, causal, top_k):
    logits, lay, tq, tk = gl
    idx = select_blocks(logits, lay, causal=causal, top_k=top_k)
    mask = dense_mask(idx, tq, tk, lay.block_size, causal)
    dense = dense_mask(
        torch.arange(lay.num_key_blocks).expand_as(logits).contiguous(), tq, tk, lay.block_size, causal
    )
    want = mask.sum().item() / dense.sum().item()
    assert computed_fraction(Selection(idx, logits), tq, tk, lay.block_size, causal) == pytest.approx(want)


def test_module_state_and_repr():
    m = DynamicAttention(8, 2, 16, block_size=32, rule="top_p", top_p=0.8, max_blocks=4)
    assert sorted(m.state_dict()) == ["gate.k_proj", "gate.q_proj"]
    assert "rule='top_p'" in repr(m) and "max_blocks=4" in repr(m)
    out = m(torch.randn(1, 8, 70, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16))
    assert out.shape == (1, 8, 70, 16) and m.last_selection is not None


def test_half_precision_runs_in_float32():
    q = torch.randn(1, 2, 20, 8)
    k = torch.randn(1, 2, 20, 8)
    v = torch.randn(1, 2, 20, 8)
    out, _, _ = dynamic_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), block_size=4, top_k=5)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05)


def test_bad_input_raises_clear_errors():
    q, k = torch.randn(1, 4, 8, 4), torch.randn(1, 2, 8, 4)
    with pytest.raises(ShapeError, match="4-D"):
        dynamic_attention(q[0], k, k)
    with pytest.raises(ShapeError, match="multiple"):
        dynamic_attention(torch.randn(1, 3, 8, 4), k, k)
    with pytest.raises(DTypeError, match="floating"):
        dynamic_attention(q.long(), k.long(), k.long())
    with pytest.raises(DTypeError, match="differ"):
        dynamic_attention(q, k.double(), k)
    with pytest.raises(ShapeError, match="more queries"):
        dynamic_attention(q, k[:, :, :4], k[:, :, :4])
    with pytest.raises(ShapeError, match="head_dim"):
        dynamic_attention(q, k[..., :2], k)
    with pytest.raises(DeviceError):
        dynamic_attention(q, k.to("meta"), k)
    with pytest.raises(InvalidValueError, match="block_size"):
        dynamic_attention(q, k, k, block_size=0)
    with pytest.raises(InvalidValueError, match="rule"):
        dynamic_attention(q, k, k, rule="top_q")
    with pytest.raises(InvalidValueError, match="top_p"):
        dynamic_attention(q, k, k, rule="top_p", top_p=0.0)
    with pytest.raises(InvalidValueError, match="min_blocks"):
        dynamic_attention(q, k, k, rule="top_p", min_blocks=3, max_blocks=2)
    with pytest.raises(InvalidValueError, match="top_k"):
        dynamic_attention(q, k, k, top_k=-1)
    with pytest.raises(ShapeError, match="key_padding_mask"):
        dynamic_attention(q, k, k, key_padding_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(DTypeError, match="key_padding_mask"):
        dynamic_attention(q, k, k, key_padding_mask=torch.ones(1, 8))
    with pytest.raises(InvalidValueError, match="block_indices"):
        block_sparse_attention(q, k, k, torch.full((1, 2, 1, 1), 5), block_size=8)
    with pytest.raises(InvalidValueError, match="twice"):
        block_sparse_attention(q, k, k, torch.tensor([[[[0, -1, 0]], [[0, -1, -1]]]]), block_size=8)
    nan_k = k.clone()
    nan_k[0, 0, 2, 0] = float("nan")
    with pytest.raises(InvalidValueError, match="not finite.*query block 1"):
        dynamic_attention(q, nan_k, k, block_size=4, sink_block=False)
    with pytest.raises(ShapeError, match="block_indices"):
        block_sparse_attention(q, k, k, torch.zeros(1, 4, 1, 1, dtype=torch.int64), block_size=8)
    with pytest.raises(DTypeError, match="int64"):
        block_sparse_attention(q, k, k, torch.zeros(1, 2, 1, 1, dtype=torch.int32), block_size=8)
    with pytest.raises(ShapeError, match="heads"):
        DynamicAttention(8, 2, 4)(q, k, k)
    with pytest.raises(ShapeError, match="gate"):
        dynamic_attention(q, k, k, BlockGate(2, 8))
    with pytest.raises(InvalidValueError, match="multiple"):
        DynamicAttention(6, 4, 8)
    for bad in (dict(top_k=-1), dict(rule="top_p", top_p=2.0), dict(local_blocks=-3), dict(block_size=64.0)):
        with pytest.raises(InvalidValueError):
            DynamicAttention(4, 2, 8, **bad)
    with pytest.raises(InvalidValueError, match="gate_dim"):
        BlockGate(2, 8, gate_dim=9)


@pytest.mark.parametrize("gate", [False, True])
def test_causal_routing_never_looks_ahead(gate):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 48, 8, dtype=f64, generator=gen)
    k = torch.randn(1, 2, 48, 8, dtype=f64, generator=gen)
    v = torch.randn(1, 2, 48, 8, dtype=f64, generator=gen)
    g = BlockGate(2, 8).double() if gate else None
    if g is not None:
        with torch.no_grad():
            g.q_proj.add_(torch.randn(g.q_proj.shape, generator=gen, dtype=f64))
    kw = dict(block_size=4, top_k=1, local_blocks=0, sink_block=False)
    out, _, _ = dynamic_attention(q, k, v, g, **kw)
    for j in (5, 22, 47):  # change everything at position j: nothing before j may move
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, j] += 3.0
        k2[:, :, j] -= 3.0
        v2[:, :, j] *= -2.0
        out2, _, _ = dynamic_attention(q2, k2, v2, g, **kw)
        assert torch.equal(out2[:, :, :j], out[:, :, :j])
    # decoding one token at a time over a growing cache gives the full forward's rows
    for t in range(48):
        step, _, _ = dynamic_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], g, **kw)
        torch.testing.assert_close(step[:, :, 0], out[:, :, t], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_in_float32_with_large_values(dtype):
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 64, 128, generator=gen) + 4.0  # large dot products, but finite in fp16
    k = torch.randn(1, 2, 64, 128, generator=gen) + 4.0
    v = torch.randn(1, 2, 64, 128, generator=gen)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    sdpa = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True)
    out, _, _ = dynamic_attention(q.to(dtype), k.to(dtype), v.to(dtype), block_size=16, top_k=4)
    assert out.dtype == dtype and torch.isfinite(out).all()
    sdpa_err = (sdpa.double() - want).abs().max().item()
    assert (out.double() - want).abs().max().item() <= 2 * sdpa_err + 1e-3


def test_work_fraction_counts_whole_blocks():
    t, bs = 64, 8
    q = torch.randn(1, 2, t, 4)
    kv = torch.randn(1, 1, t, 4)
    _, every, _ = dynamic_attention(q, kv, kv, block_size=bs, top_k=8)
    assert work_fraction(every, t, t, bs) == pytest.approx(36 * bs * bs / (t * (t + 1) / 2))
    _, sparse, _ = dynamic_attention(q, kv, kv, block_size=bs, top_k=1, local_blocks=1)
    # own + previous + sink + 1 routed: 1, 2, 3, then 4 blocks per query block
    assert work_fraction(sparse, t, t, bs) == pytest.approx((1 + 2 + 3 + 4 * 5) * bs * bs / (t * (t + 1) / 2))
    assert work_fraction(sparse, t, t, bs) >= computed_fraction(sparse, t, t, bs)


def test_sink_is_the_first_block_with_a_real_key():
    logits = torch.zeros(2, 1, 4, 4)
    lay = block_layout(16, 16, 4)
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    idx = select_blocks(logits, lay, top_k=0, sink_block=True, key_block_valid=valid)
    assert idx[0, 0, 3].tolist() == [1, 3] and idx[1, 0, 3].tolist() == [0, 3]
    assert idx[0, 0, 0].tolist() == [0, -1]  # the sink is never after the query block


class SpyGate(BlockGate):
    """A BlockGate that keeps its logits and their gradient."""

    def forward(self, query_pooled, key_pooled):
        self.logits = super().forward(query_pooled, key_pooled)
        self.logits.retain_grad()
        return self.logits


def reference_routable(lay, b, causal, local, sink, key_valid):
    """[B, NQ, NK] bool, written out: visible, not forced (own, local, sink), holding a real key."""
    nq, nk = lay.num_query_blocks, lay.num_key_blocks
    out = torch.zeros(b, nq, nk, dtype=torch.bool)
    for i in range(b):
        sink_block = next((m for m in range(nk) if key_valid[i, m]), 0)
        for n in range(nq):
            qb = lay.first_block + n
            for m in range(nk):
                visible = m <= qb or not causal
                forced = abs(m - qb) <= local or (sink and m == sink_block)
                out[i, n, m] = visible and not forced and bool(key_valid[i, m])
    return out


@given(
    st.integers(1, 2),
    st.integers(1, 2),
    st.integers(1, 40),
    st.integers(1, 8),
    st.booleans(),
    st.integers(0, 2),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_warmup_gate_loss_is_the_kl_of_dense_block_mass_over_routable_blocks(
    b, g, t, bs, causal, local, sink, with_padding, seed
):
    gen = torch.Generator().manual_seed(seed)
    hkv, d = 2, 4
    q = torch.randn(b, hkv * g, t, d, dtype=f64, generator=gen)
    k = torch.randn(b, hkv, t, d, dtype=f64, generator=gen)
    v = torch.randn(b, hkv, t, d, dtype=f64, generator=gen)
    padding = torch.rand(b, t, generator=gen) < 0.8 if with_padding else None
    gate = BlockGate(hkv, d).double()
    with torch.no_grad():
        gate.q_proj.add_(0.5 * torch.randn(gate.q_proj.shape, generator=gen, dtype=f64))
    out, sel, loss = dynamic_attention(
        q, k, v, gate, block_size=bs, causal=causal, top_k=0, local_blocks=local, sink_block=sink,
        key_padding_mask=padding, return_gate_loss=True, warmup=True,
    )  # fmt: skip
    # dense probabilities, then the mass of each key block averaged over the group's heads and rows
    lay = block_layout(t, t, bs)
    nq, nk = lay.num_query_blocks, lay.num_key_blocks
    every = torch.arange(nk).expand(b, hkv, nq, nk)
    mask = dense_mask(every, t, t, bs, causal, padding, g)
    want_out, _ = reference(q, k, v, mask)
    torch.testing.assert_close(out, want_out)
    kk = k.repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, -math.inf)
    p = torch.nan_to_num(torch.softmax(s, -1))  # rows without a key: 0
    pad = nk * bs - t
    valid = torch.ones(b, t, dtype=torch.bool) if padding is None else padding
    # padded query rows attend too, but the target averages over the real rows only
    p = p * valid.view(b, 1, t, 1).to(f64)
    per_block = F.pad(p, (0, pad)).view(b, hkv * g, t, nk, bs).sum(-1)
    per_block = F.pad(per_block, (0, 0, 0, pad)).view(b, hkv, g, nq, bs, nk).sum((2, 4))
    rows = F.pad(valid, (0, pad)).view(b, nq, bs).sum(-1).to(f64)
    mass = per_block / (rows.view(b, 1, -1, 1) * g).clamp_min(1)
    key_valid = F.pad(valid, (0, pad)).view(b, nk, bs).any(-1)
    routable = reference_routable(lay, b, causal, local, sink, key_valid).unsqueeze(1)
    kls = []
    for i in range(b):
        for h in range(hkv):
            for n in range(nq):
                r = routable[i, 0, n]
                m = mass[i, h, n][r]
                if not bool(r.any()) or m.sum() <= 0:
                    continue
                target = m / m.sum()
                log_q = torch.log_softmax(sel.gate_logits[i, h, n][r], -1)
                kls.append(torch.where(target > 0, target * (target.log() - log_q), 0.0).sum())
    want = torch.stack(kls).mean() if kls else torch.zeros((), dtype=f64)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    assert loss.requires_grad


@pytest.mark.parametrize("backend", ["gather", "flex"])
def test_padded_query_rows_do_not_enter_the_gate_target(backend):
    """Right padding (as in batched fine-tuning): the padded rows attend the real keys, but the
    target is the mass of the real rows only, so changing the padded rows' queries changes nothing."""
    gen = torch.Generator().manual_seed(0)
    b, hkv, g, t, d, bs, real = 2, 2, 2, 32, 4, 4, 26
    q = torch.randn(b, hkv * g, t, d, dtype=f64, generator=gen)
    k = torch.randn(b, hkv, t, d, dtype=f64, generator=gen)
    v = torch.randn(b, hkv, t, d, dtype=f64, generator=gen)
    padding = torch.ones(b, t, dtype=torch.bool)
    padding[0, real:] = False  # row 1 unpadded
    gate = BlockGate(hkv, d).double()
    kw = dict(block_size=bs, top_k=0, sink_block=True, key_padding_mask=padding, return_gate_loss=True)
    _, _, loss = dynamic_attention(q, k, v, gate, warmup=True, **kw)
    q2 = q.clone()
    q2[0, :, real:] = 10 * torch.randn(hkv * g, t - real, d, dtype=f64, generator=gen)
    _, _, loss2 = dynamic_attention(q2, k, v, gate, warmup=True, **kw)
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=0.0)
    # block_mass itself: the dense probabilities per key block averaged over the real rows only
    lay = block_layout(t, t, bs)
    nq, nk = lay.num_query_blocks, lay.num_key_blocks
    every = torch.arange(nk).expand(b, hkv, nq, nk).contiguous()
    with torch.no_grad():
        got = block_sparse_attention(
            q2, k, v, every, block_size=bs, key_padding_mask=padding, return_block_mass=True, backend=backend
        ).block_mass
    s = (q2 @ k.repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(d)).tril()
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril() | ~padding.view(b, 1, 1, t), -math.inf)
    p = torch.softmax(s, -1) * padding.view(b, 1, t, 1).to(f64)
    per_block = p.view(b, hkv, g, nq, bs, nk, bs).sum((2, 4, 6))
    rows = padding.view(b, nq, bs).sum(-1).to(f64)
    want = per_block / (rows.view(b, 1, nq, 1) * g).clamp_min(1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_warmup_trains_the_gate_on_blocks_it_never_picks_and_never_on_forced_ones():
    torch.manual_seed(0)
    b, hkv, t, d, bs = 2, 2, 48, 8, 4
    q = torch.randn(b, hkv, t, d, dtype=f64)
    k = torch.randn(b, hkv, t, d, dtype=f64)
    v = torch.randn(b, hkv, t, d, dtype=f64)
    lay = block_layout(t, t, bs)
    grads = {}
    for warmup in (False, True):
        gate = SpyGate(hkv, d).double()
        _, sel, loss = dynamic_attention(
            q, k, v, gate, block_size=bs, top_k=1, local_blocks=1, sink_block=True,
            return_gate_loss=True, warmup=warmup,
        )  # fmt: skip
        loss.backward()
        grads[warmup] = (gate.logits.grad, sel.block_indices)
    forced, routable = routable_blocks(lay, b, hkv, local_blocks=1, sink_block=True)
    grad, idx = grads[True]
    assert bool(idx.ge(0).sum(-1).eq(torch.arange(1, lay.num_query_blocks + 1)).all())  # dense
    assert bool((grad[~routable] == 0).all())  # forced and future blocks: no gradient
    several = routable & (routable.sum(-1, keepdim=True) > 1)  # (one block alone: KL 0, no gradient)
    assert bool((grad[several] != 0).all())  # every routable block, picked or not
    grad, idx = grads[False]
    picked = (idx.unsqueeze(-1) == torch.arange(lay.num_key_blocks)).any(-2)
    assert bool((grad[~(picked & routable)] == 0).all())  # sparse: only the picked routable blocks
    assert int(routable.sum()) > int((picked & routable).sum()) > 0
    assert bool((forced == (picked & ~routable)).all())


def test_gate_loss_is_zero_without_routable_blocks_and_has_no_nan():
    gate = SpyGate(1, 4).double()
    q, k, v = (torch.randn(1, 1, 8, 4, dtype=f64) for _ in range(3))
    for warmup in (False, True):  # 2 blocks of 4: block 1 sees block 0, which is local (and sink)
        _, _, loss = dynamic_attention(
            q, k, v, gate, block_size=4, top_k=2, local_blocks=1, return_gate_loss=True, warmup=warmup
        )
        assert loss.item() == 0.0
        loss.backward()
        assert bool((gate.logits.grad == 0).all())
    logits = torch.randn(1, 1, 2, 3, dtype=f64, requires_grad=True)
    idx = torch.tensor([[[[0, 1], [-1, -1]]]])
    none = torch.zeros(1, 1, 2, 3, dtype=torch.bool)
    loss = gate_distillation_loss(logits, idx, torch.rand(1, 1, 2, 2, dtype=f64), none)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    # a block whose routable slots got no mass is skipped, the others still count
    some = none.clone()
    some[0, 0, 0, 1] = True
    mass = torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]], dtype=f64)
    assert gate_distillation_loss(logits, idx, mass, some).item() == 0.0


def test_dense_warmup_sets_and_restores_the_flag():
    m = nn.Sequential(
        DynamicAttention(2, 1, 4, block_size=2, top_k=0), DynamicAttention(2, 1, 4, warmup=True)
    )
    q = torch.randn(1, 2, 16, 4, dtype=f64)
    k, v = torch.randn(1, 1, 16, 4, dtype=f64), torch.randn(1, 1, 16, 4, dtype=f64)
    m.double()
    with dense_warmup(m) as same:
        assert same is m and m[0].warmup and m[1].warmup
        torch.testing.assert_close(
            m[0](q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        )
        assert "warmup=True" in repr(m[0])
    assert not m[0].warmup and m[1].warmup
    assert computed_fraction(m[0].last_selection, 16, 16, 2) == pytest.approx(1.0)
    m[0](q, k, v)
    assert computed_fraction(m[0].last_selection, 16, 16, 2) < 0.5


class _TinyModel(nn.Module):
    """A projection feeding a DynamicAttention: non-gate parameters next to the gate."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4).double()
        self.attn = DynamicAttention(2, 1, 4, block_size=2, top_k=2, local_blocks=0).double()

    def forward(self, x):  # x [1, 16, 4]
        h = self.proj(x)
        q = h.view(1, 16, 2, 2).repeat(1, 1, 1, 2).transpose(1, 2)
        kv = h.unsqueeze(1)
        return self.attn(q, kv, kv)


def test_gate_warmup_trains_only_the_gates_densely_and_restores_everything():
    torch.manual_seed(0)
    m = _TinyModel()
    x = torch.randn(1, 16, 4, dtype=f64)
    assert gate_parameters(m) == [m.attn.gate.q_proj, m.attn.gate.k_proj]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with gate_warmup(m) as gates:
        assert gates == gate_parameters(m) and m.attn.warmup
        assert not any(p.requires_grad for p in m.proj.parameters())
        opt = torch.optim.SGD(gates, lr=0.5)
        out = m(x)
        assert computed_fraction(m.attn.last_selection, 16, 16, 2) == pytest.approx(1.0)
        loss = gate_losses(m)
        assert loss.item() > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert not out.requires_grad  # no graph through the model: only the gate loss has one
    assert not m.attn.warmup and all(p.requires_grad for p in m.parameters())
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("attn.gate."), n
    with gate_warmup(m, dense=False):
        assert not m.attn.warmup and not m.proj.weight.requires_grad
        m(x)
        assert computed_fraction(m.attn.last_selection, 16, 16, 2) < 0.9


def test_gate_losses_warns_when_a_training_module_ran_without_grad():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    m = _TinyModel().train()
    x = torch.randn(1, 16, 4, dtype=f64, requires_grad=True)
    checkpoint(m, x, use_reentrant=True).sum()  # the forward runs under no_grad
    with pytest.warns(RuntimeWarning, match="reentrant"):
        assert gate_losses(m).item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint(m, x, use_reentrant=False).sum()
        assert gate_losses(m).item() > 0
        m(x)
        assert gate_losses(m).item() > 0
        with torch.no_grad():  # e.g. a metric inside the training loop: no gate loss asked for
            m(x)
            gate_losses(m)
        m.eval()
        m(x)
        assert gate_losses(m).item() == 0.0
