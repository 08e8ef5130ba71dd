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

import ctypes
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _core
from ..errors import InvalidValueError

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
# Expert FFN over the expert-sorted buffer
# --------------------------------------------------------------------------------------------
# Each expert's rows are one contiguous segment, so every expert is dense products over its
# segment, never a loop over tokens. In float32 they run in Rust (`deepseek-experts`): tasks
# over blocks of an expert's rows stream its weights past the rows, with SwiGLU applied between
# the two products, and the backward's four products in a broadcast-A GEMM kernel. In
# development timings on a 2-core AMD EPYC it beat torch's GEMMs at every segment size tried
# (1 to 384 rows), most at serving sizes, where BLAS runs far below the weight-read floor;
# `ops.RUST_SEGMENT_ROWS = 0` forces torch's GEMMs to compare. Other dtypes (and segments
# longer than RUST_SEGMENT_ROWS) use torch's GEMMs, with the
# SwiGLU elementwise work done per segment in small reused scratch buffers that stay in cache.
# torch._grouped_mm was measured slower than either on the CPU with torch 2.15, and its weight
# gradient fails there.

# Segments of up to this many rows take the Rust path (0: never).
RUST_SEGMENT_ROWS = 1 << 62


# Fresh gradients of stacked expert weights are hundreds of MiB, and writing them first costs
# a page fault per 4 KiB page: a third of the layer's backward on the development machine.
# Asking the kernel for 2 MiB pages on such buffers (as torch's THP_MEM_ALLOC_ENABLE does for
# every allocation) removes most of that; elsewhere it is a no-op.
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _madvise()


def _empty_large_like(t: Tensor) -> Tensor:
    """``torch.empty_like(t)``, backed by huge pages where the OS offers them."""
    out = torch.empty_like(t)
    if _MADVISE is not None and out.device.type == "cpu":
        start = out.data_ptr()
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        last = (start + out.numel() * out.element_size()) // _HUGE_PAGE * _HUGE_PAGE
        if last > first:
            _MADVISE(first, last - first, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return out


def _active_segments(expert_offsets: Tensor, above: int = 0):
    offs = expert_offsets.tolist()
    return [(e, offs[e], offs[e + 1]) for e in range(len(offs) - 1) if offs[e + 1] - offs[e] > above]


def _longest(segments) -> int:
    return max((t - s for _, s, t in segments), default=0)


def _rust_segment_rows(buf: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> int:
    """How many rows a segment may have to run in Rust: 0 where the Rust path does not apply."""
    rust_ok = (
        buf.dtype == torch.float32
        and gate_up_proj.dtype == down_proj.dtype == torch.float32
        and buf.is_contiguous()
        and gate_up_proj.is_contiguous()
        and down_proj.is_contiguous()
    )
    return RUST_SEGMENT_ROWS if rust_ok else 0


@torch.library.custom_op("deepseek_rs::expert_ffn", mutates_args=(), device_types="cpu")
def expert_ffn(
    buf: Tensor, gate_up_proj: Tensor, down_proj: Tensor, expert_offsets: Tensor, save_h: bool
) -> Tuple[Tensor, Tensor]:
    """SwiGLU experts over the expert-sorted buffer `buf` [N, H].

    `gate_up_proj` [E, 2F, H] (gate rows first), `down_proj` [E, H, F]. Returns the expert
    outputs [N, H] and, when `save_h` (needed for the backward), the gate/up
    pre-activations [N, 2F]; otherwise an empty [0, 2F] tensor.
    """
    f = down_proj.shape[2]
    out = buf.new_empty(buf.shape[0], down_proj.shape[1])
    h = buf.new_empty(buf.shape[0] if save_h else 0, 2 * f)
    rust_rows = _rust_segment_rows(buf, gate_up_proj, down_proj)
    if rust_rows:
        _core.swiglu_experts_forward(
            _np(buf), _np(gate_up_proj), _np(down_proj), _np(expert_offsets), rust_rows, _np(out),
            _np(h) if save_h else None,
        )
    segments = _active_segments(expert_offsets, above=rust_rows)
    longest = _longest(segments)
    h_scratch = None if save_h else buf.new_empty(longest, 2 * f)
    act = buf.new_empty(longest, f)
    # Transposed views once per call: the per-expert Python overhead is what small batches pay.
    gate_up_t, down_t = gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2)
    for e, s, t in segments:
        n = t - s
        he = h[s:t] if save_h else h_scratch[:n]
        torch.mm(buf[s:t], gate_up_t[e], out=he)
        torch.mul(torch.nn.functional.silu(he[:, :f]), he[:, f:], out=act[:n])
        torch.mm(act[:n], down_t[e], out=out[s:t])
    return out, h


@expert_ffn.register_fake
def _(buf, gate_up_proj, down_proj, expert_offsets, save_h):
    f = down_proj.shape[2]
    return buf.new_empty(buf.shape[0], down_proj.shape[1]), buf.new_empty(
        buf.shape[0] if save_h else 0, 2 * f
    )


def _expert_ffn_setup(ctx, inputs, output):
    buf, gate_up_proj, down_proj, expert_offsets, _ = inputs
    ctx.save_for_backward(buf, gate_up_proj, down_proj, expert_offsets, output[1])


@torch.library.custom_op("deepseek_rs::expert_ffn_backward", mutates_args=(), device_types="cpu")
def expert_ffn_backward(
    grad_out: Tensor,
    buf: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    expert_offsets: Tensor,
    h: Tensor,
    weight_grads: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of `expert_ffn` for (buf, gate_up_proj, down_proj), one expert segment at a time.

    Without `weight_grads` (frozen experts) the two weight gradients are empty [0] tensors; the
    CUDA kernel then skips their GEMMs (the Rust kernel computes all three in one pass anyway).
    """
    if h.shape[0] != buf.shape[0]:
        raise InvalidValueError(
            "expert_ffn ran with save_h=False, so it has no backward; run it with save_h=True"
        )
    f = down_proj.shape[2]
    grad_out = grad_out.contiguous()
    grad_buf = torch.empty_like(buf)
    grad_gate_up = _empty_large_like(gate_up_proj)
    grad_down = _empty_large_like(down_proj)
    # Experts without tokens get zero gradients (index_fill_ touches only their slices).
    idle = (expert_offsets.diff() == 0).nonzero().flatten()
    if idle.numel():
        grad_gate_up.index_fill_(0, idle, 0)
        grad_down.index_fill_(0, idle, 0)
    same = grad_out.dtype == h.dtype == torch.float32 and h.is_contiguous()
    rust_rows = _rust_segment_rows(buf, gate_up_proj, down_proj) if same else 0
    if rust_rows:
        _core.swiglu_experts_backward(
            _np(grad_out), _np(buf), _np(gate_up_proj), _np(down_proj), _np(h), _np(expert_offsets),
            rust_rows, _np(grad_buf), _np(grad_gate_up), _np(grad_down),
        )
    segments = _active_segments(expert_offsets, above=rust_rows)
    longest = _longest(segments)
    act, grad_act = buf.new_empty(longest, f), buf.new_empty(longest, f)
    grad_h = buf.new_empty(longest, 2 * f)
    for e, s, t in segments:
        n = t - s
        gate, up = h[s:t, :f], h[s:t, f:]
        sig = torch.sigmoid(gate)
        silu = gate * sig
        torch.mul(silu, up, out=act[:n])
        torch.mm(grad_out[s:t], down_proj[e], out=grad_act[:n])
        torch.mm(grad_out[s:t].t(), act[:n], out=grad_down[e])
        torch.mul(grad_act[:n], silu, out=grad_h[:n, f:])
        # d silu(g)/dg = sig * (1 + g * (1 - sig)), computed in place in `gate_grad`.
        gate_grad = torch.mul(gate, 1 - sig, out=grad_h[:n, :f])
        gate_grad.add_(1).mul_(sig).mul_(up).mul_(grad_act[:n])
        torch.mm(grad_h[:n], gate_up_proj[e], out=grad_buf[s:t])
        torch.mm(grad_h[:n].t(), buf[s:t], out=grad_gate_up[e])
    if not weight_grads:
        return grad_buf, gate_up_proj.new_empty(0), down_proj.new_empty(0)
    return grad_buf, grad_gate_up, grad_down


@expert_ffn_backward.register_fake
def _(grad_out, buf, gate_up_proj, down_proj, expert_offsets, h, weight_grads):
    if not weight_grads:
        return torch.empty_like(buf), gate_up_proj.new_empty(0), down_proj.new_empty(0)
    return torch.empty_like(buf), torch.empty_like(gate_up_proj), torch.empty_like(down_proj)


def _expert_ffn_backward(ctx, grad_out, _grad_h):
    buf, gate_up_proj, down_proj, expert_offsets, h = ctx.saved_tensors
    weight_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_buf, grad_gate_up, grad_down = expert_ffn_backward(
        grad_out, buf, gate_up_proj, down_proj, expert_offsets, h, weight_grads
    )
    if not weight_grads:
        grad_gate_up = grad_down = None
    return grad_buf, grad_gate_up, grad_down, None, None


expert_ffn.register_autograd(_expert_ffn_backward, setup_context=_expert_ffn_setup)

__all__ = [
    "combine",
    "combine_rows",
    "combine_weight_grad",
    "dispatch",
    "expert_ffn",
    "expert_ffn_backward",
    "gather_rows",
    "route",
    "route_backward",
    "sort_by_expert",
]
