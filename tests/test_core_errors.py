"""The Rust bindings never panic on bad arguments: every mistake is a deepseek_rs exception."""

import numpy as np
import pytest
from deepseek_rs import DeepseekError, DTypeError, InvalidValueError, ShapeError, _core
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

i64 = st.integers(-3, 12)


@given(
    offsets=hnp.arrays(np.int64, st.integers(0, 6), elements=i64),
    ids=hnp.arrays(np.int64, st.integers(0, 8), elements=i64),
    num_experts=st.integers(0, 5),
    cols=st.integers(0, 3),
)
def test_random_csr_never_panics(offsets, ids, num_experts, cols):
    calls = [
        lambda: _core.sort_by_expert(offsets, ids, num_experts),
        lambda: _core.combine(
            np.ones((4, cols)), ids, offsets, None, np.zeros((max(len(offsets) - 1, 0), cols))
        ),
        lambda: _core.combine_weight_grad(
            np.ones((max(len(offsets) - 1, 0), cols)), np.ones((4, cols)), ids, offsets
        ),
        lambda: _core.gather(np.ones((3, cols)), ids, np.zeros((len(ids), cols))),
        lambda: _core.route_backward(
            np.zeros((max(len(offsets) - 1, 0), 4)), offsets, ids, np.ones(len(ids)), "softmax", False, 1.0
        ),
    ]
    for call in calls:
        try:
            call()
        except DeepseekError:
            pass


def test_messages_name_the_problem():
    with pytest.raises(InvalidValueError, match="expert_ids holds 7, outside 0..4"):
        _core.sort_by_expert(np.array([0, 1]), np.array([7]), 4)
    with pytest.raises(ShapeError, match="token_offsets"):
        _core.sort_by_expert(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 4)
    with pytest.raises(DTypeError, match="same dtype"):
        _core.gather(np.ones((2, 2), np.float32), np.array([0]), np.zeros((1, 2), np.float64))
    with pytest.raises(ShapeError, match="C-contiguous"):
        _core.route_top_k(np.ones((4, 6))[:, ::2], 1, False)
    with pytest.raises(InvalidValueError, match="scoring"):
        _core.route_backward(np.ones((1, 2)), np.array([0, 1]), np.array([0]), np.ones(1), "relu", False, 1.0)
    with pytest.raises(TypeError):
        _core.route_top_k(np.ones((2, 2), np.int32), 1, False)


@given(
    offsets=hnp.arrays(np.int64, st.integers(0, 5), elements=i64),
    rows=st.integers(0, 6),
    h=st.integers(0, 3),
    f=st.integers(0, 3),
    e=st.integers(0, 4),
    max_rows=st.integers(0, 8),
    with_h=st.booleans(),
)
def test_swiglu_experts_never_panics(offsets, rows, h, f, e, max_rows, with_h):
    f32 = np.float32
    args = (np.ones((rows, h), f32), np.ones((e, 2 * f, h), f32), np.ones((e, h, f), f32), offsets, max_rows)
    pre = np.zeros((rows, 2 * f), f32) if with_h else None
    try:
        ran = _core.swiglu_experts_forward(*args, np.zeros((rows, h), f32), pre)
    except DeepseekError:
        return
    assert 0 <= ran <= e


def test_swiglu_experts_bad_arguments():
    f32 = np.float32
    buf, out = np.ones((3, 4), f32), np.zeros((3, 4), f32)
    gu, dn = np.ones((2, 6, 4), f32), np.ones((2, 4, 3), f32)
    with pytest.raises(ShapeError, match="gate_up"):
        _core.swiglu_experts_forward(buf, np.ones((2, 5, 4), f32), dn, np.array([0, 1, 3]), 4, out)
    with pytest.raises(InvalidValueError, match="rise from 0"):
        _core.swiglu_experts_forward(buf, gu, dn, np.array([0, 2, 1]), 4, out)
    with pytest.raises(ShapeError, match="out"):
        _core.swiglu_experts_forward(buf, gu, dn, np.array([0, 1, 3]), 4, np.zeros((2, 4), f32))
    with pytest.raises(TypeError):
        _core.swiglu_experts_forward(buf.astype(np.float64), gu, dn, np.array([0, 1, 3]), 4, out)
    assert _core.swiglu_experts_forward(buf, gu, dn, np.array([0, 1, 3]), 4, out) == 2
