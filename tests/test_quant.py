import copy

import pytest
import torch
from deepseek_rs import DTypeError, InvalidValueError, PEAMoE, ShapeError
from deepseek_rs.quant.qat import (
    QMAX,
    Int8Linear,
    Int8SwiGLUExperts,
    QATLinear,
    QATSwiGLUExperts,
    convert_int8,
    fake_quantize,
    int8_matmul,
    model_bytes,
    prepare_qat,
    quantize_rows,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn


@st.composite
def matrices(draw, max_rows=12, max_cols=40):
    rows, cols = draw(st.integers(0, max_rows)), draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    if rows and draw(st.booleans()):
        x[0] = 0  # an all-zero row
    return x


@given(matrices())
def test_fake_quantization_error_is_at_most_half_a_step(x):
    step = x.abs().amax(dim=-1, keepdim=True) / QMAX
    err = (fake_quantize(x) - x).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-45).all()


@given(matrices())
def test_fake_quantization_is_idempotent(x):
    once = fake_quantize(x)
    torch.testing.assert_close(fake_quantize(once), once, rtol=1e-6, atol=0)


@given(matrices())
def test_quantize_rows_matches_fake_quantization(x):
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().max().item() <= QMAX if q.numel() else True
    torch.testing.assert_close(q.float() * scale.unsqueeze(-1), fake_quantize(x), rtol=1e-6, atol=0)


def test_fake_quantization_passes_the_gradient_straight_through():
    x = torch.randn(5, 7, requires_grad=True)
    g = torch.randn(5, 7)
    fake_quantize(x).backward(g)
    torch.testing.assert_close(x.grad, g)


@given(matrices(max_rows=8), st.integers(1, 24), st.integers(0, 2**31))
def test_int8_matmul_equals_the_fake_quantized_product(x, n, seed):
    w = torch.randn(n, x.shape[1], generator=torch.Generator().manual_seed(seed))
    wq, ws = quantize_rows(w)
    got = int8_matmul(x, wq, ws)
    want = fake_quantize(x).double() @ fake_quantize(w).double().t()
    assert got.shape == want.shape and got.dtype == torch.float32
    atol = 1e-5 * want.abs().amax().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=atol + 1e-30)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.ReLU(),
        PEAMoE(16, 8, 4, router="top_k", top_k=2, shared_intermediate_size=8),
        nn.Linear(16, 3),
    )


def test_qat_shares_parameters_and_state_dict_keys():
    m = _model()
    params = {n: p for n, p in m.named_parameters()}
    keys = set(m.state_dict())
    prepare_qat(m)
    assert isinstance(m[0], QATLinear) and isinstance(m[2].experts, QATSwiGLUExperts)
    assert {n: p for n, p in m.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in m.named_parameters())
    assert set(m.state_dict()) == keys


def test_qat_trains_every_weight():
    m = prepare_qat(_model())
    x = torch.randn(32, 12)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_qat_experts_match_float_experts_up_to_rounding():
    m = _model()
    x = torch.randn(40, 12)
    with torch.no_grad():
        want = m(x)
        got = prepare_qat(m)(x)
    # Only rounding separates them: relative error of a few int8 steps.
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("qat", [False, True])
def test_int8_model_computes_what_the_qat_model_computes(qat):
    m = _model()
    if qat:
        prepare_qat(m)
    x = torch.randn(64, 12)
    with torch.no_grad():
        ref = prepare_qat(copy.deepcopy(m))(x)
        convert_int8(m)
        got = m(x)
    assert isinstance(m[0], Int8Linear) and isinstance(m[2].experts, Int8SwiGLUExperts)
    assert not m.training
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_int8_weights_take_a_quarter_of_the_float_bytes():
    big = nn.Sequential(nn.Linear(256, 256, bias=False), PEAMoE(256, 128, 8, router="top_k", top_k=2))
    router_bytes = big[1].gate.weight.numel() * 4
    float_weights = model_bytes(big) - router_bytes
    convert_int8(big)
    int8 = sum(b.numel() for b in big.buffers() if b.dtype == torch.int8)
    scales = sum(b.numel() * 4 for n, b in big.named_buffers() if n.endswith("scale"))
    assert int8 == float_weights / 4
    # Plus one float32 scale per output row: 4 / (input features) of the int8 bytes.
    assert scales == 4 * (256 + 8 * 2 * 128 + 8 * 256)
    assert model_bytes(big) == router_bytes + int8 + scales


def test_empty_batches_and_bad_input():
    m = convert_int8(_model())
    assert m(torch.zeros(0, 12)).shape == (0, 3)
    with pytest.raises(ShapeError, match="Int8Linear input"):
        m(torch.randn(2, 5))
    with pytest.raises(DTypeError):
        quantize_rows(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(DTypeError):
        prepare_qat("not a model")
    with pytest.raises(InvalidValueError):
        convert_int8(nn.Linear(2, 2))


def test_multihead_attention_is_left_in_float():
    # nn.MultiheadAttention reads out_proj.weight directly, so its Linear must not be swapped;
    # the feed-forward Linears around it are.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(layer)
    x = torch.randn(2, 5, 16)
    prepare_qat(model)
    assert isinstance(layer.linear1, QATLinear) and type(layer.self_attn.out_proj) is not QATLinear
    model(x).sum().backward()
    convert_int8(model)
    assert isinstance(layer.linear1, Int8Linear) and not isinstance(layer.self_attn.out_proj, Int8Linear)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
