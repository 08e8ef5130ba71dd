"""Checked torch-facing wrappers of the CUDA kernels: one function per kernel family.

Every function takes and returns torch CUDA tensors, validates shapes, dtypes and devices
(raising the exceptions of :mod:`deepseek_rs.errors`), allocates outputs with torch on the
inputs' device and launches on torch's current stream. None synchronises with the host.

The GEMMs need float16 or bfloat16 operands of one dtype whose contiguous dimensions are
multiples of 8 (16-byte rows for cp.async); they accumulate in float32.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import DeviceError, DTypeError, InvalidValueError, ShapeError
from . import _runtime as rt
from ._runtime import NULL, f32, f64, i32, i64

HALF = (torch.float16, torch.bfloat16)
BM = BN = 128  # output tile of the GEMM kernels (cuda/gemm.cu)
GEMM_THREADS = 256
GEMM_SMEM = 4 * 2 * BM * (32 + 8) * 2  # STAGES * 2 operands * SLOT elements * 2 bytes
ROUTER_WARPS = 4
CHUNK = 256  # pairs per block of the permutation kernels (cuda/permute.cu)
MAX_ROUTER_EXPERTS = 8192


def _suffix(dtype: torch.dtype) -> str:
    return "f16" if dtype == torch.float16 else "bf16"


def _dense(t: Tensor, what: str) -> Tensor:
    """``t`` contiguous with a 16-byte aligned base (a copy only if it was not)."""
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _check_half(what: str, *tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    if dtype not in HALF:
        raise DTypeError(
            f"{what} runs on float16 or bfloat16 tensors, got {dtype}: on CUDA, convert the module "
            "(e.g. a PEAMoE) or the tensors with .half() or .bfloat16()"
        )
    for t in tensors[1:]:
        if t.dtype != dtype:
            raise DTypeError(f"{what} needs operands of one dtype, got {dtype} and {t.dtype}")
    return dtype


def check_device(what: str, *tensors: Tensor) -> torch.device:
    device = tensors[0].device
    if device.type != "cuda":
        raise DeviceError(f"{what} runs on CUDA tensors, got a tensor on {device}")
    for t in tensors[1:]:
        if t.device != device:
            raise DeviceError(f"{what} needs all tensors on one device, got {device} and {t.device}")
    rt.require(device)
    return device


def _check_multiple_of_8(what: str, **dims: int) -> None:
    bad = {k: v for k, v in dims.items() if v % 8}
    if bad:
        names = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise ShapeError(f"{what} needs these dimensions to be multiples of 8 (16-byte rows): {names}")


def _check_offsets(expert_offsets: Tensor, experts: int, rows: int, device: torch.device) -> Tensor:
    if expert_offsets.dtype != torch.int64 or expert_offsets.shape != (experts + 1,):
        raise ShapeError(
            f"expert_offsets must be int64 of shape [{experts + 1}] (experts + 1), got "
            f"{expert_offsets.dtype} {tuple(expert_offsets.shape)}"
        )
    if expert_offsets.device != device:
        raise DeviceError(f"expert_offsets is on {expert_offsets.device}, the operands on {device}")
    return expert_offsets.contiguous()


# --------------------------------------------------------------------------------------------
# GEMMs
# --------------------------------------------------------------------------------------------


def gemm(a: Tensor, b: Tensor, *, b_transposed: bool = False) -> Tensor:
    """``a @ b`` on the tensor cores: ``a`` [M, K]; ``b`` [K, N], or [N, K] when ``b_transposed``
    (``a @ b.T``, the layout of ``nn.Linear`` weights). FP16/BF16 in and out, f32 accumulation."""
    if a.dim() != 2 or b.dim() != 2:
        raise ShapeError(f"gemm takes 2-D operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    m, k = a.shape
    n, kb = b.shape if b_transposed else (b.shape[1], b.shape[0])
    if kb != k:
        layout = "[N, K]" if b_transposed else "[K, N]"
        raise ShapeError(f"gemm: a is {tuple(a.shape)} but b {tuple(b.shape)} is not {layout} with K={k}")
    dtype = _check_half("gemm", a, b)
    device = check_device("gemm", a, b)
    _check_multiple_of_8("gemm", K=k, N=n)
    c = torch.empty(m, n, dtype=dtype, device=device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    name = f"gemm_bt_{_suffix(dtype)}" if b_transposed else f"gemm_{_suffix(dtype)}"
    grid = (math.ceil(n / BN), math.ceil(m / BM), 1)
    args = (_dense(a, "a"), _dense(b, "b"), c, i32(m), i32(n), i32(k))
    rt.launch(device, "gemm.cu", name, grid, (GEMM_THREADS, 1, 1), args, GEMM_SMEM)
    return c


def grouped_tiles(expert_offsets: Tensor) -> Tensor:
    """First 128-row tile of each expert's segment, [E+1] int32 (on the device, no sync)."""
    e = expert_offsets.shape[0] - 1
    tiles = torch.empty(e + 1, dtype=torch.int32, device=expert_offsets.device)
    rt.launch(
        expert_offsets.device,
        "gemm.cu",
        "grouped_tiles",
        (1, 1, 1),
        (1, 1, 1),
        (expert_offsets, i32(e), tiles),
    )
    return tiles


def _tile_bound(rows: int, experts: int) -> int:
    # sum_e ceil(rows_e / BM) <= floor(rows / BM) + E: launch that many tiles; the surplus exit.
    return rows // BM + experts


def grouped_gemm(
    x: Tensor, w: Tensor, expert_offsets: Tensor, *, w_transposed: bool = True, tiles: Optional[Tensor] = None
) -> Tensor:
    """One launch for every expert: rows ``s:t`` of ``x`` (expert ``e``'s segment of the
    expert-sorted buffer, ``s, t = expert_offsets[e], expert_offsets[e+1]``) times ``w[e].T``
    (``w`` [E, N, K], ``w_transposed``) or ``w[e]`` (``w`` [E, K, N]). Returns [rows, N]."""
    if x.dim() != 2 or w.dim() != 3:
        raise ShapeError(
            f"grouped_gemm takes x [rows, K] and w [E, ., .], got {tuple(x.shape)}, {tuple(w.shape)}"
        )
    rows, k = x.shape
    e = w.shape[0]
    n, kw = (w.shape[1], w.shape[2]) if w_transposed else (w.shape[2], w.shape[1])
    if kw != k:
        raise ShapeError(f"grouped_gemm: x has K={k} but w {tuple(w.shape)} has K={kw}")
    dtype = _check_half("grouped_gemm", x, w)
    device = check_device("grouped_gemm", x, w)
    _check_multiple_of_8("grouped_gemm", K=k, N=n)
    offs = _check_offsets(expert_offsets, e, rows, device)
    out = torch.empty(rows, n, dtype=dtype, device=device)
    if rows == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    tiles = grouped_tiles(offs) if tiles is None else tiles
    name = f"grouped_gemm_bt_{_suffix(dtype)}" if w_transposed else f"grouped_gemm_{_suffix(dtype)}"
    grid = (math.ceil(n / BN), _tile_bound(rows, e), 1)
    args = (_dense(x, "x"), _dense(w, "w"), out, offs, tiles, i32(e), i32(n), i32(k))
    rt.launch(device, "gemm.cu", name, grid, (GEMM_THREADS, 1, 1), args, GEMM_SMEM)
    return out


def grouped_swiglu(
    x: Tensor, gate_up: Tensor, expert_offsets: Tensor, *, save_h: bool, tiles: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """The experts' first layer with SwiGLU fused: ``h = x_e @ gate_up[e].T`` per segment
    (``gate_up`` [E, 2F, K], gate rows first), returns ``(silu(h[:, :F]) * h[:, F:], h)``;
    ``h`` is [0, 2F] unless ``save_h``."""
    if x.dim() != 2 or gate_up.dim() != 3 or gate_up.shape[1] % 2:
        raise ShapeError(
            "grouped_swiglu takes x [rows, K] and gate_up [E, 2F, K], got "
            f"{tuple(x.shape)}, {tuple(gate_up.shape)}"
        )
    rows, k = x.shape
    e, f2, kw = gate_up.shape
    f = f2 // 2
    if kw != k:
        raise ShapeError(f"grouped_swiglu: x has K={k} but gate_up {tuple(gate_up.shape)} has K={kw}")
    dtype = _check_half("grouped_swiglu", x, gate_up)
    device = check_device("grouped_swiglu", x, gate_up)
    _check_multiple_of_8("grouped_swiglu", K=k, F=f)
    offs = _check_offsets(expert_offsets, e, rows, device)
    act = torch.empty(rows, f, dtype=dtype, device=device)
    h = torch.empty(rows if save_h else 0, 2 * f, dtype=dtype, device=device)
    if rows == 0 or f == 0:
        return act, h
    if k == 0:
        h.zero_()
        return act.zero_(), h
    tiles = grouped_tiles(offs) if tiles is None else tiles
    grid = (math.ceil(f / (BN // 2)), _tile_bound(rows, e), 1)
    args = (
        _dense(x, "x"),
        _dense(gate_up, "gate_up"),
        act,
        h if save_h else NULL,
        offs,
        tiles,
        i32(e),
        i32(f),
        i32(k),
    )
    rt.launch(
        device, "gemm.cu", f"grouped_swiglu_{_suffix(dtype)}", grid, (GEMM_THREADS, 1, 1), args, GEMM_SMEM
    )
    return act, h


def grouped_wgrad(x: Tensor, y: Tensor, expert_offsets: Tensor) -> Tensor:
    """Per expert ``x_e.T @ y_e`` over its segment of rows: [E, M, N] from ``x`` [rows, M] and
    ``y`` [rows, N] (the weight gradient of a grouped GEMM); zeros for experts with no rows."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ShapeError(
            f"grouped_wgrad takes x [rows, M] and y [rows, N], got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    rows, m = x.shape
    n = y.shape[1]
    e = expert_offsets.shape[0] - 1
    dtype = _check_half("grouped_wgrad", x, y)
    device = check_device("grouped_wgrad", x, y)
    _check_multiple_of_8("grouped_wgrad", M=m, N=n)
    offs = _check_offsets(expert_offsets, e, rows, device)
    g = torch.empty(e, m, n, dtype=dtype, device=device)
    if e == 0 or m == 0 or n == 0:
        return g
    grid = (math.ceil(n / BN), math.ceil(m / BM), e)
    args = (_dense(x, "x"), _dense(y, "y"), g, offs, i32(m), i32(n))
    rt.launch(
        device, "gemm.cu", f"grouped_wgrad_{_suffix(dtype)}", grid, (GEMM_THREADS, 1, 1), args, GEMM_SMEM
    )
    return g


# --------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------


def route_padded(
    logits: Tensor,
    rule: str,
    *,
    width: int,
    top_p: float = 1.0,
    min_k: int = 1,
    renormalize: bool = False,
    scale: float = 1.0,
    bias: Optional[Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the router kernel of ``rule`` on float32 ``logits`` [T, E] (arguments already checked).

    Returns ``(ids [T, width] int64, weights [T, width] float32, counts [T] int64, bad)``
    where ``bad`` [1] int32 holds the first token with a non-finite logit (or bias), or T.
    Entries past a token's count are 0.
    """
    t, e = logits.shape
    device = logits.device
    ids = torch.empty(t, width, dtype=torch.int64, device=device)
    weights = torch.empty(t, width, dtype=torch.float32, device=device)
    counts = torch.empty(t, dtype=torch.int64, device=device)
    bad = torch.full((1,), t, dtype=torch.int32, device=device)
    if t == 0:
        return ids, weights, counts, bad
    grid = (math.ceil(t / ROUTER_WARPS), 1, 1)
    block = (ROUTER_WARPS * 32, 1, 1)
    if rule == "group_limited":
        smem = ROUTER_WARPS * (e + n_group) * 4
        args = (
            logits,
            bias,
            i32(t),
            i32(e),
            i32(width),
            i32(n_group),
            i32(topk_group),
            i32(int(renormalize)),
        )
        args += (f32(scale), ids, weights, counts, bad)
        rt.launch(device, "router.cu", "route_sigmoid_grouped", grid, block, args, smem)
    else:
        smem = ROUTER_WARPS * e * 4
        code = 0 if rule == "top_k" else 1
        args = (logits, i32(t), i32(e), i32(code), i32(width), f64(top_p), i32(min_k), i32(int(renormalize)))
        args += (f32(scale), ids, weights, counts, bad)
        rt.launch(device, "router.cu", "route_softmax", grid, block, args, smem)
    return ids, weights, counts, bad


# --------------------------------------------------------------------------------------------
# Permutation
# --------------------------------------------------------------------------------------------


def pair_tokens(token_offsets: Tensor, pairs: int) -> Tensor:
    """The token of each routed pair, [N] int64, from the per-token CSR offsets [T+1]."""
    t = token_offsets.shape[0] - 1
    out = torch.empty(pairs, dtype=torch.int64, device=token_offsets.device)
    rt.launch(
        token_offsets.device,
        "permute.cu",
        "pair_tokens",
        (math.ceil(t / 256), 1, 1),
        (256, 1, 1),
        (token_offsets, i64(t), out),
    )
    return out


def sort_by_expert(
    expert_ids: Tensor, pair_token: Tensor, num_experts: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Stable counting sort of the routed pairs by expert (histogram, scan, scatter).

    Returns ``(sorted_pair, sorted_token, pair_position, expert_offsets [E+1], bad)``, the
    same as :func:`deepseek_rs.moe.ops.sort_by_expert`; ``bad`` [1] int32 is 1 if an expert id was
    outside ``0..num_experts`` (those pairs are left out).
    """
    device = expert_ids.device
    n, e = expert_ids.shape[0], num_experts
    chunks = math.ceil(n / CHUNK)
    sorted_pair = torch.empty(n, dtype=torch.int64, device=device)
    sorted_token = torch.empty(n, dtype=torch.int64, device=device)
    pair_position = torch.empty(n, dtype=torch.int64, device=device)
    expert_offsets = torch.zeros(e + 1, dtype=torch.int64, device=device)
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    if n == 0:
        return sorted_pair, sorted_token, pair_position, expert_offsets, bad
    chunk_counts = torch.empty(chunks, e, dtype=torch.int32, device=device)
    chunk_base = torch.empty(chunks, e, dtype=torch.int64, device=device)
    expert_counts = torch.empty(e, dtype=torch.int64, device=device)
    rt.launch(
        device,
        "permute.cu",
        "expert_histogram",
        (chunks, 1, 1),
        (CHUNK, 1, 1),
        (expert_ids, i64(n), i32(e), chunk_counts, bad),
        4 * e,
    )
    scan_args = (chunk_counts, i32(chunks), i32(e), expert_counts, expert_offsets, chunk_base)
    rt.launch(device, "permute.cu", "expert_scan", (1, 1, 1), (256, 1, 1), scan_args)
    scatter_args = (
        expert_ids,
        pair_token,
        i64(n),
        i32(e),
        chunk_base,
        sorted_pair,
        sorted_token,
        pair_position,
    )
    rt.launch(device, "permute.cu", "expert_scatter", (chunks, 1, 1), (CHUNK, 1, 1), scatter_args)
    return sorted_pair, sorted_token, pair_position, expert_offsets, bad


def _row_block(h: int) -> Tuple[int, int, int]:
    return (min(256, max(32, 32 * math.ceil(h / 8 / 32))), 1, 1)


def gather_rows(
    src: Tensor, index: Tensor, scale: Optional[Tensor] = None, scale_index: Optional[Tensor] = None
) -> Tensor:
    """``out[r] = src[index[r]]``, times ``scale[scale_index[r]]`` (float32) when given."""
    rows, h = index.shape[0], src.shape[1]
    dtype = _check_half("gather_rows", src)
    _check_multiple_of_8("gather_rows", H=h)
    out = torch.empty(rows, h, dtype=dtype, device=src.device)
    if rows == 0 or h == 0:
        return out
    args = (
        _dense(src, "src"),
        index,
        NULL if scale is None else scale.float().contiguous(),
        NULL if scale_index is None else scale_index,
        out,
        i32(h),
    )
    rt.launch(src.device, "permute.cu", f"gather_rows_{_suffix(dtype)}", (rows, 1, 1), _row_block(h), args)
    return out


def combine_rows(
    buf: Tensor, pair_position: Tensor, token_offsets: Tensor, weights: Optional[Tensor] = None
) -> Tensor:
    """``out[t] = sum_j weights[j] * buf[pair_position[j]]`` over token t's pairs in CSR order (f32 sums)."""
    t, h = token_offsets.shape[0] - 1, buf.shape[1]
    dtype = _check_half("combine_rows", buf)
    _check_multiple_of_8("combine_rows", H=h)
    out = torch.empty(t, h, dtype=dtype, device=buf.device)
    if t == 0 or h == 0:
        return out
    args = (
        _dense(buf, "buf"),
        pair_position,
        token_offsets,
        NULL if weights is None else weights.float().contiguous(),
        out,
        i32(h),
    )
    rt.launch(buf.device, "permute.cu", f"combine_rows_{_suffix(dtype)}", (t, 1, 1), _row_block(h), args)
    return out


def combine_weight_grad(grad_out: Tensor, buf: Tensor, pair_position: Tensor, pair_token: Tensor) -> Tensor:
    """``g[j] = dot(grad_out[pair_token[j]], buf[pair_position[j]])``, float32 [N]."""
    n, h = pair_position.shape[0], buf.shape[1]
    dtype = _check_half("combine_weight_grad", grad_out, buf)
    out = torch.empty(n, dtype=torch.float32, device=buf.device)
    if n == 0:
        return out
    if h == 0:
        return out.zero_()
    args = (_dense(grad_out, "grad_out"), _dense(buf, "buf"), pair_position, pair_token, i64(n), i32(h), out)
    rt.launch(
        buf.device,
        "permute.cu",
        f"combine_weight_grad_{_suffix(dtype)}",
        (math.ceil(n / 8), 1, 1),
        (256, 1, 1),
        args,
    )
    return out


def swiglu_backward(h: Tensor, grad_act: Tensor) -> Tuple[Tensor, Tensor]:
    """From ``h = [gate | up]`` [rows, 2F] and the gradient of ``act = silu(gate) * up``,
    returns ``(grad_h [rows, 2F], act [rows, F])``."""
    rows, f = grad_act.shape
    dtype = _check_half("swiglu_backward", h, grad_act)
    grad_h = torch.empty(rows, 2 * f, dtype=dtype, device=h.device)
    act = torch.empty(rows, f, dtype=dtype, device=h.device)
    n = rows * f
    if n == 0:
        return grad_h, act
    grid = (min(math.ceil(n / 256), 1 << 16), 1, 1)
    args = (_dense(h, "h"), _dense(grad_act, "grad_act"), grad_h, act, i64(rows), i32(f))
    rt.launch(h.device, "permute.cu", f"swiglu_backward_{_suffix(dtype)}", grid, (256, 1, 1), args)
    return grad_h, act


def check_router_experts(e: int) -> None:
    if e > MAX_ROUTER_EXPERTS:
        raise InvalidValueError(f"the CUDA router handles at most {MAX_ROUTER_EXPERTS} experts, got {e}")


__all__ = [
    "check_device",
    "check_router_experts",
    "combine_rows",
    "combine_weight_grad",
    "gather_rows",
    "gemm",
    "grouped_gemm",
    "grouped_swiglu",
    "grouped_tiles",
    "grouped_wgrad",
    "pair_tokens",
    "route_padded",
    "sort_by_expert",
    "swiglu_backward",
]
