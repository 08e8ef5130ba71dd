"""The Rust bindings never panic on bad arguments: every mistake is a deepseek_rs exception, and
every array argument of a wrong dtype, number of dimensions or writability is named, as is every
other argument of a wrong Python type or out of range (a negative count, a non-finite float)."""

import inspect
import json
import math
import re

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


# -- every argument of every binding ------------------------------------------------------------

# The bindings that take arrays.
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
    "linear_rows",
    "dsir_log_importance",
    "JsonlWriter.write",
]
# The bindings that take other arguments only (a class name is its constructor).
SCALAR_ONLY = [
    "compute_signals",
    "hashed_features",
    "JsonlReader",
    "JsonlWriter",
    "Scheduler",
    "Scheduler.submit",
    "Scheduler.cancel",
    "Scheduler.next_batch",
    "Scheduler.next_batch_at",
    "Scheduler.expire_wait",
    "Scheduler.complete",
]
# The arrays each binding writes into.
OUTPUTS = {
    "gather": ("out",),
    "gather_scaled": ("out",),
    "combine": ("out",),
    "swiglu_experts_forward": ("out", "h"),
    "swiglu_experts_backward": ("grad_buf", "grad_gate_up", "grad_down"),
    "linear_rows": ("out",),
}
WRONG_DTYPES = [np.int8, np.int16, np.int32, np.uint64, np.float16, np.complex64, np.bool_, np.object_]


def arguments(name, batch=None, shard=None, tmp=None):
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
        isa="generic",
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
        "linear_rows": lambda: dict(
            x=np.ones((3, 4), f32), w=np.ones((2, 4), f32), out=np.zeros((3, 2), f32), isa="generic"
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
        "compute_signals": lambda: dict(texts=["one two", "three"]),
        "hashed_features": lambda: dict(texts=["one two"], buckets=64),
        "JsonlReader": lambda: dict(path=shard, batch_docs=2, batch_bytes=1 << 20, max_line_bytes=1 << 20),
        "JsonlWriter": lambda: dict(path=tmp and tmp / "new.jsonl"),
        "Scheduler": lambda: dict(
            max_size=8,
            min_size=1,
            max_queue_delay=0.001,
            max_queue_size=16,
            max_batch_cost=64,
            preferred_sizes=[2],
        ),
        "Scheduler.submit": lambda: dict(id=1, cost=2, bucket=3, priority=4, timeout=1.5),
        "Scheduler.cancel": lambda: dict(id=1),
        "Scheduler.next_batch": lambda: dict(timeout=0.0),
        "Scheduler.next_batch_at": lambda: dict(timeout=0.0),
        "Scheduler.expire_wait": lambda: dict(timeout=0.0),
        "Scheduler.complete": lambda: dict(ids=[1, 2], outcome="failed"),
    }
    return table[name]()


def function(name, tmp_path):
    """The callable of binding `name`: a function, a class (its constructor) or a method of a
    fresh instance."""
    cls, _, method = name.partition(".")
    if not method:
        return getattr(_core, name)
    instance = {
        "JsonlWriter": lambda: _core.JsonlWriter(tmp_path / "out.jsonl"),
        "Scheduler": _core.Scheduler,
    }
    return getattr(instance[cls](), method)


ARRAY_ARGS = [(n, a) for n in BINDINGS for a, v in arguments(n).items() if isinstance(v, np.ndarray)]

# The kind of every non-array argument, by name (`scale` is an array in gather_scaled).
KINDS = {
    **dict.fromkeys(
        ["k", "min_k", "max_k", "top_k", "n_group", "topk_group", "num_experts", "max_rows", "buckets"],
        "count",
    ),
    **dict.fromkeys(["max_size", "min_size", "max_queue_size", "max_batch_cost"], "count"),
    **dict.fromkeys(
        ["id", "cost", "bucket", "priority", "batch_docs", "batch_bytes", "max_line_bytes"], "count"
    ),
    **dict.fromkeys(["top_p", "scale"], "float"),
    **dict.fromkeys(["max_queue_delay", "timeout"], "seconds"),
    **dict.fromkeys(["renormalize", "per_feature"], "bool"),
    **dict.fromkeys(["scoring", "outcome"], "str"),
    "isa": "isa",
    **dict.fromkeys(["texts", "names", "reasons"], "strs"),
    **dict.fromkeys(["ids", "preferred_sizes"], "counts"),
    "path": "path",
    "batch": "DocBatch",
}
# Bad values of each kind: (value, exception, the item of a list the message names, what the
# message says was given); every message reads "<argument> must be ..., got <given>".
NOT_A_NUMBER = [
    ("1", DTypeError, "", "str"),
    (True, DTypeError, "", "bool"),
    (None, DTypeError, "", "NoneType"),
]
NON_FINITE = [(math.nan, InvalidValueError, "", "nan"), (math.inf, InvalidValueError, "", "inf")]
BAD = {
    "count": [
        *NOT_A_NUMBER,
        (1.0, DTypeError, "", "float"),
        (np.float64(2), DTypeError, "", "float64"),
        (-1, InvalidValueError, "", "-1"),
        (np.int64(-3), InvalidValueError, "", "-3"),
        (2**64, InvalidValueError, "", str(2**64)),
    ],
    "float": [
        *NOT_A_NUMBER,
        *NON_FINITE,
        (-math.inf, InvalidValueError, "", "-inf"),
        (10**400, InvalidValueError, "", "1000"),
    ],
    "seconds": [*NOT_A_NUMBER, *NON_FINITE, (-0.5, InvalidValueError, "", "-0.5")],
    "bool": [(1, DTypeError, "", "int"), ("yes", DTypeError, "", "str"), (None, DTypeError, "", "NoneType")],
    "str": [(1, DTypeError, "", "int"), (b"x", DTypeError, "", "bytes"), (None, DTypeError, "", "NoneType")],
    "isa": [
        (1, DTypeError, "", "int"),
        (b"x", DTypeError, "", "bytes"),
        ("sse9", InvalidValueError, "", '"sse9" (an unknown tier)'),
        ("AVX2", InvalidValueError, "", '"AVX2" (an unknown tier)'),
        ("neon" if "neon" not in _core.cpu_isas() else "avx2", InvalidValueError, "", ""),
    ],
    "strs": [
        ("one two", DTypeError, "", "str"),
        (3, DTypeError, "", "int"),
        (None, DTypeError, "", "NoneType"),
        (["a", 1], DTypeError, "[1]", "int"),
    ],
    "counts": [
        ("12", DTypeError, "", "str"),
        (None, DTypeError, "", "NoneType"),
        ([2, -1], InvalidValueError, "[1]", "-1"),
        ([1.5], DTypeError, "[0]", "float"),
    ],
    "path": [(1, DTypeError, "", "int"), (None, DTypeError, "", "NoneType")],
    "DocBatch": [(1, DTypeError, "", "int"), (None, DTypeError, "", "NoneType")],
}


def parameters(binding):
    """The Python parameters of a binding (its runtime signature), and which of them default to
    None (None is a valid value of these)."""
    cls, _, method = binding.partition(".")
    obj = getattr(getattr(_core, cls), method) if method else getattr(_core, cls)
    params = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
    return [p.name for p in params], {p.name for p in params if p.default is None}


def runtime_bindings():
    """Every binding of `_core` that takes arguments: its functions, the constructors of its
    classes, and their methods."""
    names = []
    for n in _core.__all__:
        obj = getattr(_core, n)
        if n[0].islower():
            names.append(n)
            continue
        try:
            inspect.signature(obj)  # a class without a constructor has none
            names.append(n)
        except ValueError:
            pass
        names += [f"{n}.{m}" for m, v in vars(obj).items() if not m.startswith("_") and callable(v)]
    return [n for n in names if parameters(n)[0]]


SCALAR_ARGS = [
    pytest.param(name, arg, value, exc, item, given, id=f"{name}-{arg}-{i}")
    for name in BINDINGS + SCALAR_ONLY
    for arg, good in arguments(name).items()
    if not isinstance(good, np.ndarray)
    for i, (value, exc, item, given) in enumerate(BAD[KINDS[arg]])
    if not (value is None and arg in parameters(name)[1])
]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("core") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one two", "three")))
    return path


@pytest.fixture(scope="module")
def batch(shard):
    return next(iter(_core.JsonlReader(str(shard))))


def test_every_binding_is_swept():
    """A new binding must be added to BINDINGS (if it takes arrays) or SCALAR_ONLY, and each of
    its non-array arguments to KINDS."""
    assert sorted(runtime_bindings()) == sorted(BINDINGS + SCALAR_ONLY)
    for name in BINDINGS + SCALAR_ONLY:
        arrays = {a for n, a in ARRAY_ARGS if n == name}
        assert set(arguments(name)) == set(parameters(name)[0]), name
        assert set(parameters(name)[0]) - arrays <= set(KINDS), name


@pytest.mark.parametrize("name", BINDINGS + SCALAR_ONLY)
def test_the_valid_calls_succeed_in_either_precision(name, tmp_path, batch, shard):
    function(name, tmp_path)(**arguments(name, batch, shard, tmp_path))
    if name in BINDINGS and name not in ("dsir_log_importance", "JsonlWriter.write"):  # float64 only
        kwargs = {
            k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v
            for k, v in arguments(name, batch).items()
        }
        function(name, tmp_path)(**kwargs)


@pytest.mark.parametrize("name, arg, value, exc, item, given", SCALAR_ARGS)
def test_a_bad_scalar_is_named_with_the_value(name, arg, value, exc, item, given, tmp_path, batch, shard):
    kwargs = arguments(name, batch, shard, tmp_path)
    kwargs[arg] = value
    with pytest.raises(exc, match=rf"^{re.escape(arg + item)} must be .*, got {re.escape(given)}") as e:
        function(name, tmp_path)(**kwargs)
    assert isinstance(e.value, TypeError if exc is DTypeError else ValueError)


def test_numpy_scalars_and_path_likes_are_taken(tmp_path, shard):
    z = np.zeros((3, 4))
    _, ids, _, _ = _core.route_top_k(z, np.int64(2), np.bool_(True))
    assert len(ids) == 6
    _core.route_top_p(z, np.float32(0.5), np.int32(1), np.uint8(2), False)
    _core.route_backward(z[:1], np.array([0, 1]), np.array([0]), np.ones(1), "softmax", False, np.float64(2))
    assert len(next(iter(_core.JsonlReader(shard, np.int64(1))))) == 1  # a pathlib.Path
    _core.Scheduler(max_size=np.int64(8), max_queue_delay=np.float32(0.25), preferred_sizes=(4, np.int16(6)))
    _core.Scheduler(max_queue_delay=0)  # an int number of seconds
    assert _core.compute_signals(("a", "b")).shape[0] == 2  # any sequence of str


def test_the_defaults_shown_are_the_defaults_used():
    """Scheduler's signature is written out by hand (PyO3 cannot show a Duration default)."""
    shown = {p.name: p.default for p in inspect.signature(_core.Scheduler).parameters.values()}
    assert _core.Scheduler().config() == {**shown, "preferred_sizes": []}
    s = _core.Scheduler(min_size=1, max_queue_delay=0.0)
    s.submit(7)
    assert s.next_batch(1.0)[:2] == ("batch", [7])
    assert inspect.signature(_core.Scheduler.complete).parameters["outcome"].default == "completed"
    s.complete([7])
    assert s.metrics()["completed"] == 1


def test_a_timeout_beyond_the_clock_is_no_deadline():
    assert _core.Scheduler().submit(1, timeout=1.8e19) is None  # a Duration, but past any Instant


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), -1),
    st.integers(0, 64),
    st.sampled_from([2**31, 2**40, 2**63, 2**64 - 1]),  # counts that fit but are huge
    st.integers(2**64, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(st.one_of(st.none(), st.integers(-3, 9), st.text(max_size=3), st.floats()), max_size=3),
)
WAITS = ("Scheduler.next_batch", "Scheduler.next_batch_at", "Scheduler.expire_wait")


@given(data=st.data(), name=st.sampled_from(BINDINGS + SCALAR_ONLY))
def test_random_scalars_never_panic(data, name, tmp_path_factory, batch, shard):
    """Any Python values for the non-array arguments: a result or a DeepseekError, never a panic
    or an abort (counts that fit an integer type but are huge included: the engines refuse a
    scheduler's max_size or an expert count too large to allocate for)."""
    tmp = tmp_path_factory.mktemp("s")
    kwargs = arguments(name, batch, shard, tmp)
    for arg in kwargs:
        # (A random path would write into the working directory.)
        if (
            not isinstance(kwargs[arg], np.ndarray)
            and arg != "path"
            and data.draw(st.booleans(), label=f"change {arg}")
        ):
            value = data.draw(SCALARS, label=arg)
            if name in WAITS and (value is None or isinstance(value, (int, float)) and value > 0.01):
                value = 0.01  # a short wait, not a hang (None waits for ever)
            kwargs[arg] = value
    try:
        function(name, tmp)(**kwargs)
    except DeepseekError:
        pass


# -- every array argument of every binding -------------------------------------------------------


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
