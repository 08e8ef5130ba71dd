"""Torch custom ops of the MoE layer (`torch.ops.deepseek_rs.*`) and their CPU kernels in Rust.

Each op is a `torch.library.custom_op` with a fake (meta) implementation, so `torch.compile`
traces around it, and a registered backward where it has one. The leaf ops' CUDA kernels are
registered on the same ops by :mod:`.ops_cuda`, so the dispatcher picks the kernel by the
tensors' device; `dispatch` and `combine` are compositions of leaf ops and run on either.
Arguments are checked by the callers in `routing.py` and `layer.py`; the Rust side checks again
and raises the exceptions of `deepseek_rs.errors`.

Data crosses into Rust as zero-copy numpy views of contiguous CPU tensors; large outputs are
allocated here by torch and filled in place.
"""

import functools
import time
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _core
from ..errors import DTypeError, InvalidValueError
from . import backends, tuning

_HALF = (torch.float16, torch.bfloat16)


def _np(t: Tensor):
    """Zero-copy numpy view; 16-bit floats are viewed as int16 (numpy has no bfloat16)."""
    t = t.detach()
    if t.dtype in _HALF:
        t = t.view(torch.int16)
    return t.numpy()


# --------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("deepseek_rs::route", mutates_args=(), device_types="cpu")
def route(
    logits: Tensor,
    bias: Optional[Tensor],
    rule: str,
    top_k: int,
    top_p: float,
    min_k: int,
    max_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Route `logits` [T, E] (float32/float64, contiguous) by `rule`.

    Returns (token_offsets [T+1], expert_ids [N], weights [N], expert_counts [E]); the
    weights are multiplied by `scale`.
    """
    z = _np(logits)
    if rule == "top_k":
        out = _core.route_top_k(z, top_k, renormalize)
    elif rule == "top_p":
        out = _core.route_top_p(z, top_p, min_k, max_k, renormalize)
    else:
        b = None if bias is None else _np(bias)
        out = _core.route_group_limited(z, b, top_k, n_group, topk_group, renormalize)
    offsets, ids, weights, counts = (torch.from_numpy(a) for a in out)
    if scale != 1.0:
        weights.mul_(scale)
    return offsets, ids, weights, counts


@route.register_fake
def _(logits, bias, rule, top_k, top_p, min_k, max_k, n_group, topk_group, renormalize, scale):
    t, e = logits.shape
    pairs = torch.library.get_ctx().new_dynamic_size() if rule == "top_p" else t * top_k
    i64 = dict(dtype=torch.int64, device=logits.device)
    return (
        logits.new_empty(t + 1, **i64),
        logits.new_empty(pairs, **i64),
        logits.new_empty(pairs),
        logits.new_empty(e, **i64),
    )


def _route_setup(ctx, inputs, output):
    logits, _, rule, *_, renormalize, scale = inputs
    offsets, ids, _, _ = output
    ctx.save_for_backward(logits, offsets, ids)
    ctx.scoring = "sigmoid" if rule == "group_limited" else "softmax"
    ctx.renormalize = renormalize
    ctx.scale = scale


@torch.library.custom_op("deepseek_rs::route_backward", mutates_args=(), device_types="cpu")
def route_backward(
    logits: Tensor,
    token_offsets: Tensor,
    expert_ids: Tensor,
    grad_weights: Tensor,
    scoring: str,
    renormalize: bool,
    scale: float,
) -> Tensor:
    """Gradient of the logits from the gradient of the (scaled) routing weights."""
    g = _core.route_backward(
        _np(logits),
        _np(token_offsets),
        _np(expert_ids),
        _np(grad_weights.contiguous()),
        scoring,
        renormalize,
        scale,
    )
    return torch.from_numpy(g).view_as(logits)


@route_backward.register_fake
def _(logits, token_offsets, expert_ids, grad_weights, scoring, renormalize, scale):
    return torch.empty_like(logits)


def _route_backward(ctx, _g_offsets, _g_ids, g_weights, _g_counts):
    logits, offsets, ids = ctx.saved_tensors
    if g_weights is None:
        return (None,) * 11
    grad = route_backward(logits, offsets, ids, g_weights, ctx.scoring, ctx.renormalize, ctx.scale)
    return (grad,) + (None,) * 10


route.register_autograd(_route_backward, setup_context=_route_setup)


# --------------------------------------------------------------------------------------------
# Dispatch: sort by expert, gather into the expert buffer, weighted combine back
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("deepseek_rs::sort_by_expert", mutates_args=(), device_types="cpu")
def sort_by_expert(
    token_offsets: Tensor, expert_ids: Tensor, num_experts: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stable counting sort of the routed pairs by expert.

    Returns (sorted_pair, sorted_token, pair_position, expert_offsets [E+1]).
    """
    out = _core.sort_by_expert(_np(token_offsets), _np(expert_ids), num_experts)
    return tuple(torch.from_numpy(a) for a in out)


@sort_by_expert.register_fake
def _(token_offsets, expert_ids, num_experts):
    n = expert_ids.shape[0]
    return (
        expert_ids.new_empty(n),
        expert_ids.new_empty(n),
        expert_ids.new_empty(n),
        expert_ids.new_empty(num_experts + 1),
    )


@torch.library.custom_op("deepseek_rs::combine_rows", mutates_args=(), device_types="cpu")
def combine_rows(
    buf: Tensor, pair_position: Tensor, token_offsets: Tensor, weights: Optional[Tensor]
) -> Tensor:
    """out[t] = sum_j weights[j] * buf[pair_position[j]] over token t's pairs, in CSR order.

    16-bit buffers are summed in float32 (the engine has no 16-bit arithmetic) and cast back.
    """
    dtype = buf.dtype
    if dtype in _HALF:
        buf = buf.float()
    if weights is not None:
        weights = weights.to(buf.dtype).contiguous()
    out = buf.new_empty(token_offsets.shape[0] - 1, buf.shape[1])
    _core.combine(
        _np(buf), _np(pair_position), _np(token_offsets), None if weights is None else _np(weights), _np(out)
    )
    return out.to(dtype)


@combine_rows.register_fake
def _(buf, pair_position, token_offsets, weights):
    return buf.new_empty(token_offsets.shape[0] - 1, buf.shape[1])


@torch.library.custom_op("deepseek_rs::gather_rows", mutates_args=(), device_types="cpu")
def gather_rows(src: Tensor, index: Tensor, scale: Optional[Tensor], scale_index: Optional[Tensor]) -> Tensor:
    """out[r] = scale[scale_index[r]] * src[index[r]] (scale_index None: scale[r]; scale None: 1)."""
    if scale is not None and scale_index is not None:
        scale = scale[scale_index]
    if scale is not None and src.dtype in _HALF:
        return gather_rows(src.float(), index, scale, None).to(src.dtype)
    out = src.new_empty(index.shape[0], src.shape[1])
    if scale is None:
        _core.gather(_np(src), _np(index), _np(out))
    else:
        _core.gather_scaled(_np(src), _np(index), _np(scale.to(src.dtype).contiguous()), _np(out))
    return out


@gather_rows.register_fake
def _(src, index, scale, scale_index):
    return src.new_empty(index.shape[0], src.shape[1])


@torch.library.custom_op("deepseek_rs::combine_weight_grad", mutates_args=(), device_types="cpu")
def combine_weight_grad(
    grad_out: Tensor, buf: Tensor, pair_position: Tensor, token_offsets: Tensor
) -> Tensor:
    """grad_weights[j] = dot(grad_out[token of j], buf[pair_position[j]]), in float32 for 16-bit input."""
    if grad_out.dtype in _HALF:
        grad_out, buf = grad_out.float(), buf.float()
    g = _core.combine_weight_grad(
        _np(grad_out.contiguous()), _np(buf.to(grad_out.dtype)), _np(pair_position), _np(token_offsets)
    )
    return torch.from_numpy(g)


@combine_weight_grad.register_fake
def _(grad_out, buf, pair_position, token_offsets):
    dtype = torch.float32 if grad_out.dtype in _HALF else grad_out.dtype
    return grad_out.new_empty(pair_position.shape[0], dtype=dtype)


@torch.library.custom_op("deepseek_rs::dispatch", mutates_args=())
def dispatch(x: Tensor, sorted_token: Tensor, pair_position: Tensor, token_offsets: Tensor) -> Tensor:
    """Gather token rows `x` [T, H] into the expert-sorted buffer [N, H]."""
    return gather_rows(x, sorted_token, None, None)


@dispatch.register_fake
def _(x, sorted_token, pair_position, token_offsets):
    return x.new_empty(sorted_token.shape[0], x.shape[1])


def _dispatch_setup(ctx, inputs, output):
    _, _, pair_position, token_offsets = inputs
    ctx.save_for_backward(pair_position, token_offsets)


def _dispatch_backward(ctx, grad_buf):
    pair_position, token_offsets = ctx.saved_tensors
    # The adjoint of a gather is an unweighted combine.
    return combine_rows(grad_buf.contiguous(), pair_position, token_offsets, None), None, None, None


dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("deepseek_rs::combine", mutates_args=())
def combine(
    buf: Tensor,
    weights: Tensor,
    sorted_pair: Tensor,
    sorted_token: Tensor,
    pair_position: Tensor,
    token_offsets: Tensor,
) -> Tensor:
    """Weighted sum of expert output rows `buf` [N, H] back into token order [T, H]."""
    return combine_rows(buf, pair_position, token_offsets, weights)


@combine.register_fake
def _(buf, weights, sorted_pair, sorted_token, pair_position, token_offsets):
    return buf.new_empty(token_offsets.shape[0] - 1, buf.shape[1])


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, grad_out):
    buf, weights, sorted_pair, sorted_token, pair_position, token_offsets = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_buf = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_buf = gather_rows(grad_out, sorted_token, weights, sorted_pair)
    if ctx.needs_input_grad[1]:
        grad_w = combine_weight_grad(grad_out, buf, pair_position, token_offsets).to(weights.dtype)
    return grad_buf, grad_w, None, None, None, None


combine.register_autograd(_combine_backward, setup_context=_combine_setup)


# --------------------------------------------------------------------------------------------
# Batch-invariant linear
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("deepseek_rs::linear_rows", mutates_args=(), device_types="cpu")
def linear_rows(x: Tensor, weight: Tensor) -> Tensor:
    """`x` [R, K] @ `weight` [N, K]^T in float32, each element a dot product of its own row and
    weight row summed in a fixed order: a row's result has the same bits whatever other rows
    share the call, where BLAS picks kernels (and summation orders) by the number of rows."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise DTypeError(f"linear_rows runs float32 only, got x {x.dtype} and weight {weight.dtype}")
    out = x.new_empty(x.shape[0], weight.shape[0])
    _core.linear_rows(_np(x.contiguous()), _np(weight.contiguous()), _np(out), isa=backends.cpu_isa())
    return out


@linear_rows.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _linear_rows_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad @ weight if ctx.needs_input_grad[0] else None
    grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
    return grad_x, grad_w


linear_rows.register_autograd(_linear_rows_backward, setup_context=_linear_rows_setup)


# --------------------------------------------------------------------------------------------
# Expert FFN over the expert-sorted buffer
# --------------------------------------------------------------------------------------------
# Each expert's rows are one contiguous segment, so every expert is dense products over its
# segment, never a loop over tokens. The CPU backends (Rust kernels, torch's BLAS per segment,
# torch._grouped_mm) are in `backends.py`; with backend "auto" the tuner of `tuning.py` picks
# the fastest for the call's shape class on this machine.


# A costly call is tuned on the segments of this many experts (a prefix of the buffer).
TUNE_EXPERTS = 8


def _prefix(args: tuple, expert_offsets: Tensor) -> tuple:
    """``args`` cut to the first experts holding TUNE_EXPERTS active segments: row tensors (first
    dimension N) to their rows, weights (first dimension E) to those experts."""
    offs = expert_offsets.tolist()
    n_exp, rows, active = len(offs) - 1, offs[-1], 0
    j = 0
    while j < n_exp and active < TUNE_EXPERTS:
        active += offs[j + 1] > offs[j]
        j += 1
    if j == n_exp:
        return args
    cut = []
    for a in args:
        if isinstance(a, Tensor) and a is expert_offsets:
            a = a[: j + 1]
        elif isinstance(a, Tensor) and a.dim() == 3:
            a = a[:j]
        elif isinstance(a, Tensor) and a.dim() == 2 and a.shape[0] == rows:
            a = a[: offs[j]]
        cut.append(a)
    return tuple(cut)


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _run(pass_: str, backend: str, table, args, runnable, key_args):
    backend = backends.requested_backend(backend)
    if backend != "auto":
        why = backends.why_not(backend, *runnable)
        if why:
            raise InvalidValueError(why)
    if runnable[0].shape[0] == 0:  # no rows: nothing to time, and torch handles every layout
        return table["torch"](*args)
    if backend != "auto":
        return table[backend](*args)
    names = backends.runnable(*runnable)
    key = tuning.shape_class(pass_, *key_args)
    if len(names) == 1:
        return table[names[0]](*args)
    cached = tuning.TUNER.cached(pass_, key, names)
    if cached is not None:
        return table[cached](*args)
    # A cheap call is timed whole: a sample of a few experts' weights would fit in the caches,
    # where the whole call streams them from memory. A costly one is timed on a sample, and
    # the choice kept only if the whole call then runs no slower than torch's did.
    torch_result, torch_s = _timed(table["torch"], *args)
    whole = torch_s * len(names) * tuning.Tuner.ROUNDS <= tuning.TUNER.budget_s
    sample = args if whole else _prefix(args, key_args[-1])
    backend = tuning.TUNER.choose(pass_, key, {n: functools.partial(table[n], *sample) for n in names})
    if backend == "torch":
        return torch_result
    result, took = _timed(table[backend], *args)
    if not whole and took > 1.1 * torch_s:
        choice = tuning.TUNER.lookup(key)
        times = dict(choice.times_s if choice else {})
        times.update({"torch, whole call": torch_s, f"{backend}, whole call": took})
        tuning.TUNER.record(key, tuning.Choice("torch", times, choice.tuning_s if choice else 0.0))
        tuning.TUNER.last[pass_] = (key, "torch")
    return result


@torch.library.custom_op("deepseek_rs::expert_ffn", mutates_args=(), device_types="cpu")
def expert_ffn(
    buf: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    expert_offsets: Tensor,
    save_h: bool,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """SwiGLU experts over the expert-sorted buffer `buf` [N, H].

    `gate_up_proj` [E, 2F, H] (gate rows first), `down_proj` [E, H, F]. Returns the expert
    outputs [N, H] and, when `save_h` (needed for the backward), the gate/up
    pre-activations [N, 2F]; otherwise an empty [0, 2F] tensor. `backend`: "auto" (tuned, or
    DEEPSEEK_RS_EXPERTS_BACKEND), "rust", "torch" or "grouped_mm" (the CPU backends).
    """
    args = (buf, gate_up_proj, down_proj, expert_offsets, save_h)
    pass_ = "forward-train" if save_h else "forward"
    weights = (buf, gate_up_proj, down_proj)
    return _run(pass_, backend, backends.FORWARD, args, weights, (buf, down_proj, expert_offsets))


@expert_ffn.register_fake
def _(buf, gate_up_proj, down_proj, expert_offsets, save_h, backend="auto"):
    f = down_proj.shape[2]
    return buf.new_empty(buf.shape[0], down_proj.shape[1]), buf.new_empty(
        buf.shape[0] if save_h else 0, 2 * f
    )


def _expert_ffn_setup(ctx, inputs, output):
    buf, gate_up_proj, down_proj, expert_offsets, _, backend = inputs
    ctx.save_for_backward(buf, gate_up_proj, down_proj, expert_offsets, output[1])
    ctx.backend = backend


@torch.library.custom_op("deepseek_rs::expert_ffn_backward", mutates_args=(), device_types="cpu")
def expert_ffn_backward(
    grad_out: Tensor,
    buf: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    expert_offsets: Tensor,
    h: Tensor,
    weight_grads: bool,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of `expert_ffn` for (buf, gate_up_proj, down_proj).

    Without `weight_grads` (frozen experts) the two weight gradients are empty [0] tensors and
    the backends that can skip their products do.
    """
    if h.shape[0] != buf.shape[0]:
        raise InvalidValueError(
            "expert_ffn ran with save_h=False, so it has no backward; run it with save_h=True"
        )
    grad_out = grad_out.to(buf.dtype).contiguous()
    args = (grad_out, buf, gate_up_proj, down_proj, expert_offsets, h, weight_grads)
    pass_ = "backward" if weight_grads else "backward-data"
    weights = (buf, gate_up_proj, down_proj)
    return _run(pass_, backend, backends.BACKWARD, args, weights, (buf, down_proj, expert_offsets))


@expert_ffn_backward.register_fake
def _(grad_out, buf, gate_up_proj, down_proj, expert_offsets, h, weight_grads, backend="auto"):
    if not weight_grads:
        return torch.empty_like(buf), gate_up_proj.new_empty(0), down_proj.new_empty(0)
    return torch.empty_like(buf), torch.empty_like(gate_up_proj), torch.empty_like(down_proj)


def _expert_ffn_backward(ctx, grad_out, _grad_h):
    buf, gate_up_proj, down_proj, expert_offsets, h = ctx.saved_tensors
    weight_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_buf, grad_gate_up, grad_down = expert_ffn_backward(
        grad_out, buf, gate_up_proj, down_proj, expert_offsets, h, weight_grads, ctx.backend
    )
    if not weight_grads:
        grad_gate_up = grad_down = None
    return grad_buf, grad_gate_up, grad_down, None, None, None


expert_ffn.register_autograd(_expert_ffn_backward, setup_context=_expert_ffn_setup)

__all__ = [
    "combine",
    "combine_rows",
    "combine_weight_grad",
    "dispatch",
    "expert_ffn",
    "expert_ffn_backward",
    "gather_rows",
    "linear_rows",
    "route",
    "route_backward",
    "sort_by_expert",
]
