"""The CPU backends of the expert FFN and the ISA tier of its Rust kernels.

Three ways to run SwiGLU experts over the expert-sorted buffer, with one contract (outputs,
saved pre-activations, gradients):

* ``rust``: the fused kernels of ``deepseek-experts`` (float32) at the tier of :func:`cpu_isa`.
  Each output element is a fixed-order sum over its own row and the weights, so a token's result
  does not depend on the other tokens of its batch (batch invariance).
* ``torch``: torch's BLAS (MKL, OpenBLAS...) per expert segment, the SwiGLU elementwise work in
  small reused scratch buffers that stay in cache.
* ``grouped_mm``: ``torch._grouped_mm`` over all segments in one call per product (float32 and
  16-bit). Its autograd fails on the CPU with torch 2.15, so the backward calls it explicitly:
  the data gradients as grouped products, the weight gradients as its 2-D x 2-D form grouped
  along the rows.

Which one runs is decided per call by :mod:`.tuning` (``"auto"``), or forced by the
``DEEPSEEK_RS_EXPERTS_BACKEND`` environment variable or by the caller.
``DEEPSEEK_RS_CPU_ISA=avx512|avx2|neon|generic`` caps the tier of the Rust kernels, as
``ONEDNN_MAX_CPU_ISA`` does for oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import _core
from ..errors import InvalidValueError

BACKENDS = ("rust", "torch", "grouped_mm")
BACKEND_ENV = "DEEPSEEK_RS_EXPERTS_BACKEND"
ISA_ENV = "DEEPSEEK_RS_CPU_ISA"
# A tier runs under a cap of its rank or higher; NEON (aarch64) is ranked with AVX2.
_ISA_RANK = {"generic": 0, "avx2": 1, "neon": 1, "avx512": 2}
_GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Grads = Tuple[Tensor, Tensor, Tensor]


# --------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------


@functools.cache
def cpu_isas() -> Tuple[str, ...]:
    """The ISA tiers this CPU runs the Rust kernels at, best first (the last is ``"generic"``)."""
    return tuple(_core.cpu_isas())


@functools.lru_cache(maxsize=16)
def _capped(cap: str) -> str:
    if not cap:
        return cpu_isas()[0]
    if cap not in _ISA_RANK:
        raise InvalidValueError(f"{ISA_ENV}={cap!r} is not one of {', '.join(_ISA_RANK)}")
    return next(t for t in cpu_isas() if _ISA_RANK[t] <= _ISA_RANK[cap])


def cpu_isa() -> str:
    """The tier the Rust kernels run at: the best this CPU has at or below ``DEEPSEEK_RS_CPU_ISA``."""
    return _capped(os.environ.get(ISA_ENV, "").strip().lower())


def requested_backend(backend: str = "auto") -> str:
    """``backend``, with ``"auto"`` replaced by ``DEEPSEEK_RS_EXPERTS_BACKEND`` where that is set."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
        where = f"{BACKEND_ENV}={backend!r}"
    else:
        where = f"backend={backend!r}"
    if backend != "auto" and backend not in BACKENDS:
        raise InvalidValueError(f"{where} is not one of auto, {', '.join(BACKENDS)}")
    return backend


def why_not(backend: str, buf: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> str:
    """Why ``backend`` cannot run these tensors ("" when it can)."""
    dtypes = {buf.dtype, gate_up_proj.dtype, down_proj.dtype}
    if backend == "rust":
        if dtypes != {torch.float32}:
            got = sorted(map(str, dtypes))
            return f"the rust backend runs float32 only, got {got}: use backend 'torch' or 'grouped_mm'"
        # A copy of strided weights per call would cost more than the small batches it wins.
        if not (gate_up_proj.is_contiguous() and down_proj.is_contiguous()):
            return (
                "the rust backend needs contiguous expert weights, these are a strided view: "
                "make the parameters contiguous (p.data = p.data.contiguous())"
            )
    if backend == "grouped_mm":
        if not (len(dtypes) == 1 and buf.dtype in _GROUPED_MM_DTYPES):
            got = sorted(map(str, dtypes))
            return f"torch._grouped_mm runs float32, float16 or bfloat16 alike, got {got}"
        h, f = down_proj.shape[1], down_proj.shape[2]
        if (h * buf.element_size()) % 16 or (f * buf.element_size()) % 16:
            return f"torch._grouped_mm needs rows of 16-byte multiples, got H={h}, F={f} in {buf.dtype}"
    return ""


def runnable(buf: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> List[str]:
    """The backends that can run these tensors (``"torch"`` always can)."""
    return [b for b in BACKENDS if not why_not(b, buf, gate_up_proj, down_proj)]


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _np(t: Tensor):
    return t.detach().numpy()


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
    """A contiguous ``torch.empty_like(t)``, backed by huge pages where the OS offers them."""
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if _MADVISE is not None and out.device.type == "cpu":
        start = out.data_ptr()
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        last = (start + out.numel() * out.element_size()) // _HUGE_PAGE * _HUGE_PAGE
        if last > first:
            _MADVISE(first, last - first, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return out


def _weight_grads(gate_up_proj: Tensor, down_proj: Tensor, expert_offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """Uninitialised weight gradients, zero for the experts without rows (which no backend writes)."""
    grad_gate_up, grad_down = _empty_large_like(gate_up_proj), _empty_large_like(down_proj)
    idle = (expert_offsets.diff() == 0).nonzero().flatten()
    if idle.numel():
        grad_gate_up.index_fill_(0, idle, 0)
        grad_down.index_fill_(0, idle, 0)
    return grad_gate_up, grad_down


def _no_weight_grads(like: Tensor) -> Tuple[Tensor, Tensor]:
    return like.new_empty(0), like.new_empty(0)


def _segments(expert_offsets: Tensor) -> List[Tuple[int, int, int]]:
    offs = expert_offsets.tolist()
    return [(e, offs[e], offs[e + 1]) for e in range(len(offs) - 1) if offs[e + 1] > offs[e]]


def _longest(segments) -> int:
    return max((t - s for _, s, t in segments), default=0)


def _swiglu_grad(h: Tensor, grad_act: Tensor, act: Tensor, grad_h: Tensor) -> None:
    """From the pre-activations ``h`` [n, 2F] and ``grad_act`` [n, F], write ``act`` and
    ``grad_h`` [n, 2F] in place."""
    f = grad_act.shape[1]
    gate, up = h[:, :f], h[:, f:]
    sig = torch.sigmoid(gate)
    silu = gate * sig
    torch.mul(silu, up, out=act)
    torch.mul(grad_act, silu, out=grad_h[:, f:])
    # d silu(g)/dg = sig * (1 + g * (1 - sig)), computed in place in the gate half of grad_h.
    gate_grad = torch.mul(gate, 1 - sig, out=grad_h[:, :f])
    gate_grad.add_(1).mul_(sig).mul_(up).mul_(grad_act)


def _outputs(buf: Tensor, down_proj: Tensor, save_h: bool) -> Tuple[Tensor, Tensor]:
    f = down_proj.shape[2]
    return buf.new_empty(buf.shape[0], down_proj.shape[1]), buf.new_empty(
        buf.shape[0] if save_h else 0, 2 * f
    )


# Segments of any length run in Rust (its kernels choose their own blocking by row count).
_ALL_ROWS = 1 << 62


# --------------------------------------------------------------------------------------------
# rust
# --------------------------------------------------------------------------------------------


def rust_forward(buf, gate_up_proj, down_proj, expert_offsets, save_h) -> Tuple[Tensor, Tensor]:
    out, h = _outputs(buf, down_proj, save_h)
    _core.swiglu_experts_forward(
        _np(buf.contiguous()), _np(gate_up_proj.contiguous()), _np(down_proj.contiguous()),
        _np(expert_offsets), _ALL_ROWS, _np(out), _np(h) if save_h else None, isa=cpu_isa(),
    )  # fmt: skip
    return out, h


def rust_backward(grad_out, buf, gate_up_proj, down_proj, expert_offsets, h, weight_grads) -> Grads:
    # The kernel computes the three gradients in one pass per expert, wanted or not.
    grad_buf = torch.empty_like(buf)
    grad_gate_up, grad_down = _weight_grads(gate_up_proj, down_proj, expert_offsets)
    _core.swiglu_experts_backward(
        _np(grad_out), _np(buf.contiguous()), _np(gate_up_proj.contiguous()), _np(down_proj.contiguous()),
        _np(h.contiguous()), _np(expert_offsets), _ALL_ROWS, _np(grad_buf), _np(grad_gate_up),
        _np(grad_down), isa=cpu_isa(),
    )  # fmt: skip
    if not weight_grads:
        return (grad_buf, *_no_weight_grads(gate_up_proj))
    return grad_buf, grad_gate_up, grad_down


# --------------------------------------------------------------------------------------------
# torch: BLAS per expert segment
# --------------------------------------------------------------------------------------------


def torch_forward(buf, gate_up_proj, down_proj, expert_offsets, save_h) -> Tuple[Tensor, Tensor]:
    out, h = _outputs(buf, down_proj, save_h)
    f = down_proj.shape[2]
    segments = _segments(expert_offsets)
    longest = _longest(segments)
    h_scratch = None if save_h else buf.new_empty(longest, 2 * f)
    act = buf.new_empty(longest, f)
    # Transposed views once per call: the per-expert Python overhead is what small batches pay.
    gate_up_t, down_t = gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2)
    for e, s, t in segments:
        n = t - s
        he = h[s:t] if save_h else h_scratch[:n]
        torch.mm(buf[s:t], gate_up_t[e], out=he)
        torch.mul(F.silu(he[:, :f]), he[:, f:], out=act[:n])
        torch.mm(act[:n], down_t[e], out=out[s:t])
    return out, h


def torch_backward(grad_out, buf, gate_up_proj, down_proj, expert_offsets, h, weight_grads) -> Grads:
    f = down_proj.shape[2]
    grad_buf = torch.empty_like(buf)
    grad_gate_up, grad_down = (
        _weight_grads(gate_up_proj, down_proj, expert_offsets)
        if weight_grads
        else _no_weight_grads(gate_up_proj)
    )
    segments = _segments(expert_offsets)
    longest = _longest(segments)
    act, grad_act = buf.new_empty(longest, f), buf.new_empty(longest, f)
    grad_h = buf.new_empty(longest, 2 * f)
    for e, s, t in segments:
        n = t - s
        torch.mm(grad_out[s:t], down_proj[e], out=grad_act[:n])
        _swiglu_grad(h[s:t], grad_act[:n], act[:n], grad_h[:n])
        torch.mm(grad_h[:n], gate_up_proj[e], out=grad_buf[s:t])
        if weight_grads:
            torch.mm(grad_out[s:t].t(), act[:n], out=grad_down[e])
            torch.mm(grad_h[:n].t(), buf[s:t], out=grad_gate_up[e])
    return grad_buf, grad_gate_up, grad_down


# --------------------------------------------------------------------------------------------
# grouped_mm
# --------------------------------------------------------------------------------------------


def _ends(expert_offsets: Tensor) -> Tensor:
    """``torch._grouped_mm``'s ``offs``: each group's end row, int32."""
    return expert_offsets[1:].to(torch.int32)


def grouped_mm_forward(buf, gate_up_proj, down_proj, expert_offsets, save_h) -> Tuple[Tensor, Tensor]:
    f = down_proj.shape[2]
    ends = _ends(expert_offsets)
    h = torch._grouped_mm(buf, gate_up_proj.transpose(1, 2), offs=ends)
    act = F.silu(h[:, :f]).mul_(h[:, f:])
    out = torch._grouped_mm(act, down_proj.transpose(1, 2), offs=ends)
    return out, h if save_h else h.new_empty(0, 2 * f)


def grouped_mm_backward(grad_out, buf, gate_up_proj, down_proj, expert_offsets, h, weight_grads) -> Grads:
    ends = _ends(expert_offsets)
    grad_act = torch._grouped_mm(grad_out, down_proj, offs=ends)
    act, grad_h = torch.empty_like(grad_act), torch.empty_like(h)
    _swiglu_grad(h, grad_act, act, grad_h)
    grad_buf = torch._grouped_mm(grad_h, gate_up_proj, offs=ends)
    if not weight_grads:
        return (grad_buf, *_no_weight_grads(gate_up_proj))
    # The 2-D x 2-D form groups the shared dimension (the rows): one [out, in] block per expert,
    # zero for experts without rows.
    grad_gate_up = torch._grouped_mm(grad_h.t(), buf, offs=ends)
    grad_down = torch._grouped_mm(grad_out.t(), act, offs=ends)
    return grad_buf, grad_gate_up, grad_down


FORWARD: Dict[str, Callable[..., Tuple[Tensor, Tensor]]] = {
    "rust": rust_forward,
    "torch": torch_forward,
    "grouped_mm": grouped_mm_forward,
}
BACKWARD: Dict[str, Callable[..., Grads]] = {
    "rust": rust_backward,
    "torch": torch_backward,
    "grouped_mm": grouped_mm_backward,
}

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "BACKWARD",
    "FORWARD",
    "ISA_ENV",
    "cpu_isa",
    "cpu_isas",
    "requested_backend",
    "runnable",
    "why_not",
]
