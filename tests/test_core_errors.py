"""The Rust bindings never panic on bad arguments: every mistake is a deepseek_rs exception, and
every array argument of a wrong dtype, number of dimensions or writability is named."""

import json

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
    with pytest.raises(DTypeError, match="logits must be float32 or float64, got int32"):
        _core.route_top_k(np.ones((2, 2), np.int32), 1, False)
    with pytest.raises(
        DTypeError, match="logits, bias must have the same dtype, got logits float32, bias float64"
    ):
        _core.route_group_limited(np.ones((2, 4), np.float32), np.zeros(4), 1, 1, 1, False)
    with pytest.raises(ShapeError, match=r"logits must be 2-D, got a 1-D array of shape \(4,\)"):
        _core.route_top_k(np.ones(4), 1, False)
    with pytest.raises(DTypeError, match="token_offsets must be a numpy array of int64, got list"):
        _core.sort_by_expert([0, 1], np.array([0]), 2)


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
    with pytest.raises(DTypeError, match="buf must be float32, got float64"):
        _core.swiglu_experts_forward(buf.astype(np.float64), gu, dn, np.array([0, 1, 3]), 4, out)
    assert _core.swiglu_experts_forward(buf, gu, dn, np.array([0, 1, 3]), 4, out) == 2


# -- every array argument of every binding -------------------------------------------------------

BINDINGS = [
    "route_top_k",
    "route_top_p",
    "route_group_limited",
    "route_backward",
    "sort_by_expert",
    "gather",
    "gather_scaled",
    "combine",
    "combine_weight_grad",
    "swiglu_experts_forward",
    "swiglu_experts_backward",
    "dsir_log_importance",
    "JsonlWriter.write",
]
# The arrays each binding writes into.
OUTPUTS = {
    "gather": ("out",),
    "gather_scaled": ("out",),
    "combine": ("out",),
    "swiglu_experts_forward": ("out", "h"),
    "swiglu_experts_backward": ("grad_buf", "grad_gate_up", "grad_down"),
}
WRONG_DTYPES = [np.int8, np.int16, np.int32, np.uint64, np.float16, np.complex64, np.bool_, np.object_]


def arguments(name, batch=None):
    """Keyword arguments of a call of binding `name` that succeeds: fresh arrays, float64 where
    the binding takes both precisions."""
    f32 = np.float32
    offsets, ids, rows = np.array([0, 1, 2, 3]), np.array([0, 1, 2]), np.ones((3, 2))
    experts = dict(
        buf=np.ones((3, 4), f32),
        gate_up=np.ones((2, 6, 4), f32),
        down=np.ones((2, 4, 3), f32),
        expert_offsets=np.array([0, 1, 3]),
        max_rows=4,
    )
    table = {
        "route_top_k": lambda: dict(logits=np.zeros((3, 4)), k=1, renormalize=False),
        "route_top_p": lambda: dict(logits=np.zeros((3, 4)), top_p=0.5, min_k=1, max_k=2, renormalize=False),
        "route_group_limited": lambda: dict(
            logits=np.zeros((3, 4)), bias=np.zeros(4), top_k=1, n_group=1, topk_group=1, renormalize=False
        ),
        "route_backward": lambda: dict(
            logits=np.zeros((3, 4)),
            token_offsets=offsets,
            expert_ids=ids,
            grad_weights=np.ones(3),
            scoring="softmax",
            renormalize=False,
            scale=1.0,
        ),
        "sort_by_expert": lambda: dict(token_offsets=offsets, expert_ids=ids, num_experts=4),
        "gather": lambda: dict(src=rows, index=np.array([0, 2]), out=np.zeros((2, 2))),
        "gather_scaled": lambda: dict(
            src=rows, index=np.array([0, 2]), scale=np.ones(2), out=np.zeros((2, 2))
        ),
        "combine": lambda: dict(
            buf=rows, pair_position=ids, token_offsets=offsets, weights=np.ones(3), out=np.zeros((3, 2))
        ),
        "combine_weight_grad": lambda: dict(
            grad_out=np.ones((3, 2)), buf=rows, pair_position=ids, token_offsets=offsets
        ),
        "swiglu_experts_forward": lambda: dict(experts, out=np.zeros((3, 4), f32), h=np.zeros((3, 6), f32)),
        "swiglu_experts_backward": lambda: dict(
            experts,
            grad_out=np.ones((3, 4), f32),
            h=np.ones((3, 6), f32),
            grad_buf=np.zeros((3, 4), f32),
            grad_gate_up=np.zeros((2, 6, 4), f32),
            grad_down=np.zeros((2, 4, 3), f32),
        ),
        "dsir_log_importance": lambda: dict(texts=["one two"], log_ratio=np.zeros(64), per_feature=False),
        "JsonlWriter.write": lambda: dict(
            batch=batch,
            rows=np.array([0, 1]),
            signals=np.zeros((2, 2)),
            names=["a", "b"],
            keep=np.array([True, False]),
            reasons=[None, "short"],
        ),
    }
    return table[name]()


def function(name, tmp_path):
    if name == "JsonlWriter.write":
        return _core.JsonlWriter(str(tmp_path / "out.jsonl")).write
    return getattr(_core, name)


ARRAY_ARGS = [(n, a) for n in BINDINGS for a, v in arguments(n).items() if isinstance(v, np.ndarray)]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    path = tmp_path_factory.mktemp("core") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one two", "three")))
    return next(iter(_core.JsonlReader(str(path))))


def test_every_binding_that_takes_arrays_is_swept():
    """A new binding must be added to BINDINGS (or here, if it takes no array)."""
    no_arrays = {"signal_names", "compute_signals", "hashed_features"}
    functions = {n for n in _core.__all__ if n[0].islower()}
    assert functions - no_arrays == set(BINDINGS) - {"JsonlWriter.write"}


@pytest.mark.parametrize("name", BINDINGS)
def test_the_valid_calls_succeed_in_either_precision(name, tmp_path, batch):
    function(name, tmp_path)(**arguments(name, batch))
    if name not in ("dsir_log_importance", "JsonlWriter.write"):  # these take float64 only
        kwargs = {
            k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v
            for k, v in arguments(name, batch).items()
        }
        function(name, tmp_path)(**kwargs)


@pytest.mark.parametrize(
    "name, arg, dtype",
    [(n, a, d) for n, a in ARRAY_ARGS for d in WRONG_DTYPES if arguments(n)[a].dtype != d],
    ids=lambda x: np.dtype(x).name if isinstance(x, type) else str(x),
)
def test_a_wrong_dtype_is_a_dtype_error_naming_the_argument(name, arg, dtype, tmp_path, batch):
    kwargs = arguments(name, batch)
    kwargs[arg] = kwargs[arg].astype(dtype)
    # Either "arg must be <dtypes>, got <dtype>" or, for a dtype taken but not the one of the
    # other arrays, "a, b must have the same dtype, got a <dtype>, b <dtype>".
    with pytest.raises(DTypeError, match=rf"\b{arg}\b.*\b{np.dtype(dtype).name}\b") as e:
        function(name, tmp_path)(**kwargs)
    assert isinstance(e.value, TypeError)


@pytest.mark.parametrize("name, arg", ARRAY_ARGS)
def test_a_non_array_or_a_wrong_rank_is_named(name, arg, tmp_path, batch):
    kwargs = arguments(name, batch)
    good = kwargs[arg]
    kwargs[arg] = good.tolist()
    with pytest.raises(DTypeError, match=rf"{arg} must be a numpy array of .*, got list"):
        function(name, tmp_path)(**kwargs)
    kwargs[arg] = good[..., None]
    with pytest.raises(ShapeError, match=rf"{arg} must be {good.ndim}-D, got a {good.ndim + 1}-D array"):
        function(name, tmp_path)(**kwargs)


@pytest.mark.parametrize("name", OUTPUTS)
def test_read_only_or_overlapping_outputs_are_invalid_values(name, tmp_path):
    for out in OUTPUTS[name]:
        kwargs = arguments(name)
        kwargs[out].flags.writeable = False
        with pytest.raises(InvalidValueError, match=f"{out} is written to but is a read-only array"):
            function(name, tmp_path)(**kwargs)
    kwargs = arguments(name)
    out = kwargs[OUTPUTS[name][0]]
    src = next(
        k
        for k, v in kwargs.items()
        if isinstance(v, np.ndarray) and k not in OUTPUTS[name] and (v.ndim, v.dtype) == (out.ndim, out.dtype)
    )
    kwargs[OUTPUTS[name][0]] = kwargs[src]  # the output is an input
    with pytest.raises(InvalidValueError, match=f"{OUTPUTS[name][0]} overlaps another array argument"):
        function(name, tmp_path)(**kwargs)


@given(data=st.data(), name=st.sampled_from(BINDINGS))
def test_random_dtypes_and_shapes_never_panic(data, name, tmp_path_factory, batch):
    """Any mix of dtypes and shapes over the array arguments: a result or a DeepseekError (a Rust
    panic would be a pyo3_runtime.PanicException, which is neither)."""
    kwargs = arguments(name, batch)
    dtypes = st.sampled_from([np.float32, np.float64, np.int64, *WRONG_DTYPES])
    for arg, value in list(kwargs.items()):
        if isinstance(value, np.ndarray) and data.draw(st.booleans(), label=f"change {arg}"):
            shape = data.draw(st.lists(st.integers(0, 4), max_size=3), label=f"{arg} shape")
            kwargs[arg] = np.zeros(shape, data.draw(dtypes, label=f"{arg} dtype"))
    try:
        function(name, tmp_path_factory.mktemp("w"))(**kwargs)
    except DeepseekError:
        pass
