"""The block-sparse attention of Dynamic Attention Routing through PyTorch's FlexAttention.

:func:`flex_block_sparse_attention` computes what :func:`deepseek_rs.attention.block_sparse_attention`
computes (same arguments, scale, output, ``lse`` and ``block_mass``) with
``torch.nn.attention.flex_attention``: the selection becomes a ``BlockMask`` whose tiles are
our blocks (``BLOCK_SIZE = block_size``), so the fused kernel (``torch.compile``: on CUDA, and
on the CPU for inference) visits only the selected key blocks of each query block. Selected
blocks that need no masking (under causal attention strictly before the query block, every key
real) go into the mask's "full" lists and skip the ``mask_mod``; the others are masked by a
``mask_mod`` that also looks the selection up, so the result is exact whether or not an
implementation skips blocks by the ``BlockMask`` (torch's eager FlexAttention computes every
score and masks).

Query blocks are ours, not FlexAttention's (ours are aligned to the key blocks: a KV cache's
queries start mid-block), so the queries are padded in front to their block boundary, and at
the end to whole blocks, and the padding rows are cut off the output.

What FlexAttention cannot do is refused with a clear error: on CUDA the block size must be a
power of two >= 16 or a multiple of 128 (the Triton kernel's tiles must divide it); on the
CPU, torch has no FlexAttention backward, so inputs that require grad are refused.
``block_mass`` (the gate's distillation target) is computed without gradient by a second
FlexAttention pass whose values are one-hot over the key blocks (64 key blocks per pass).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from .attention import (
    _BACKENDS,
    BlockLayout,
    SparseAttentionOutput,
    _check_block_indices,
    _check_padding,
    _check_qkv,
    block_layout,
)
from .errors import DeviceError, InvalidValueError

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

BACKENDS = _BACKENDS
_CPU_COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASS_COLUMNS = 64  # key blocks per one-hot pass of the block-mass computation


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:  # torch < 2.5
        return None
    return fa


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # torch moved it: let the compile step report
        return True
    return has_triton()


def flex_unavailable_reason(
    device: torch.device, block_size: int, head_dim: int, value_dim: int, requires_grad: bool = False
) -> Optional[str]:
    """Why the FlexAttention path cannot run here (``None`` when it can)."""
    if _flex_module() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
    if device.type == "cuda":
        if not ((block_size >= 16 and block_size & (block_size - 1) == 0) or block_size % 128 == 0):
            return (
                f"FlexAttention on CUDA needs a block_size that is a power of two >= 16 or a multiple of "
                f"128 (its kernel tiles must divide the block), got {block_size}"
            )
        if min(head_dim, value_dim) < 16:
            return (
                "FlexAttention on CUDA needs head dims >= 16, "
                f"got {head_dim} (query, key), {value_dim} (value)"
            )
        if not _has_triton():
            return "FlexAttention on CUDA is compiled by Triton, which is not installed (or sees no GPU)"
        return None
    if device.type == "cpu":
        if requires_grad:
            return "torch's FlexAttention has no backward on the CPU: use backend='gather' to train there"
        return None
    return f"the FlexAttention path runs on CUDA or the CPU, the tensors are on {device}"


def resolve_backend(
    backend: str, device: torch.device, block_size: int, head_dim: int, value_dim: int, requires_grad: bool
) -> str:
    """``"gather"`` or ``"flex"``: ``"auto"`` takes FlexAttention on CUDA when it can run there."""
    if backend not in BACKENDS:
        raise InvalidValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "gather":
        return "gather"
    reason = flex_unavailable_reason(device, block_size, head_dim, value_dim, requires_grad)
    if backend == "auto":
        return "flex" if device.type == "cuda" and reason is None else "gather"
    if reason is not None:
        raise DeviceError(f"backend='flex' cannot run: {reason}")
    return "flex"


@functools.cache
def _compiled_flex(device_type: str) -> Callable:
    # One compiled function per device type for the process: torch.compile caches its graphs.
    # On the CPU, graphs are static (one per shape): the C++ kernel that torch 2.15 generates for
    # dynamic shapes fails to compile for some block sizes.
    return torch.compile(_flex_module().flex_attention, dynamic=False if device_type == "cpu" else None)


def _selection_tables(
    block_indices: Tensor, lay: BlockLayout, causal: bool, key_ok: Tensor
) -> Tuple[Tensor, Tensor]:
    """``(selected, full)`` [B, Hkv, NQ, NK] bool from ``block_indices`` [B, Hkv, NQ, S].

    ``selected`` drops blocks after the query block under causal attention (they hold no visible
    key); ``full`` are the selected blocks every (query, key) pair of which is attended: before
    the query block (or any block without causality) and holding real keys only.
    """
    b, hkv, nq, _ = block_indices.shape
    nk, device = lay.num_key_blocks, block_indices.device
    table = torch.zeros(b, hkv, nq, nk + 1, dtype=torch.bool, device=device)
    table.scatter_(-1, torch.where(block_indices >= 0, block_indices, nk), True)
    selected = table[..., :nk]
    own = (lay.first_block + torch.arange(nq, device=device)).view(nq, 1)
    kb = torch.arange(nk, device=device).view(1, nk)
    block_all_real = key_ok.view(b, 1, 1, nk, lay.block_size).all(-1)
    if causal:
        selected = selected & (kb <= own)
        full = selected & (kb < own) & block_all_real
    else:
        full = selected & block_all_real
    return selected, full


def _ordered(dense: Tensor) -> Tuple[Tensor, Tensor]:
    """BlockMask's (num_blocks, indices) of a dense [..., rows, cols] bool table: the set columns
    of each row first, in ascending order."""
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def selection_block_mask(
    block_indices: Tensor,
    layout: BlockLayout,
    *,
    q_len: int,
    k_len: int,
    num_heads: int,
    causal: bool = True,
    key_padding_mask: Optional[Tensor] = None,
) -> BlockMask:
    """The FlexAttention ``BlockMask`` of a selection, over the block-aligned padded queries.

    ``block_indices`` [B, Hkv, NQ, S] (``-1`` = unused); ``num_heads`` query heads (a multiple of
    Hkv). The mask's query axis has ``NQ * block_size`` rows: row ``m`` is the query at key
    position ``first_block * block_size + m`` (rows outside the ``q_len`` real queries are
    padding and see what their position would see). Its ``mask_mod`` encodes the whole rule
    (selection, causality, key padding, keys past ``k_len``), so it is exact on its own.
    """
    fa = _flex_module()
    b, hkv, nq, _ = block_indices.shape
    bs, nk = layout.block_size, layout.num_key_blocks
    g = num_heads // hkv
    device = block_indices.device
    key_ok = (torch.arange(nk * bs, device=device) < k_len).expand(b, nk * bs)
    if key_padding_mask is not None:
        key_ok = key_ok & nn.functional.pad(key_padding_mask, (0, nk * bs - k_len), value=False)
    key_ok = key_ok.contiguous()
    selected, full = _selection_tables(block_indices, layout, causal, key_ok)
    partial = selected & ~full
    # key position of padded query row 0; a tensor, so that compiled code is not specialised to it
    offset = torch.tensor(layout.first_block * bs, device=device)

    def mask_mod(bi, hi, q_idx, kv_idx):
        keep = selected[bi, hi // g, q_idx // bs, kv_idx // bs] & key_ok[bi, kv_idx]
        if causal:
            keep = keep & (kv_idx <= q_idx + offset)
        return keep

    kv_num, kv_idx = _ordered(partial.repeat_interleave(g, dim=1))
    full_num, full_idx = _ordered(full.repeat_interleave(g, dim=1))
    return fa.BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(nq * bs, k_len),
    )


def flex_block_sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    block_indices: Tensor,
    *,
    block_size: int,
    causal: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    return_block_mass: bool = False,
    compile: Optional[bool] = None,
) -> SparseAttentionOutput:
    """:func:`deepseek_rs.attention.block_sparse_attention` computed by FlexAttention.

    Same arguments and results (the output is 0 for a query row that sees no key; ``lse`` in
    float32, float64 for float64 input, ``-inf`` there). ``compile``: run the
    ``torch.compile``-d FlexAttention (the fused kernel, which skips the blocks outside the
    selection; the first call per shape compiles); ``None`` compiles wherever torch can: on
    CUDA always, on the CPU for float32/bfloat16/float16 inference without ``lse`` or
    ``block_mass``. ``compile=False`` runs torch's eager FlexAttention, which computes every
    score and masks: a reference, not a fast path.
    """
    b, hq, hkv, tq, tk = _check_qkv(query, key, value)
    lay = block_layout(tq, tk, block_size)
    _check_block_indices(block_indices, b, hkv, lay, query.device)
    padding = _check_padding(key_padding_mask, b, tk, query.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    reason = flex_unavailable_reason(query.device, lay.block_size, query.shape[-1], value.shape[-1], grad)
    if reason is not None:
        raise DeviceError(reason)
    if not grad:  # torch's CPU check looks at requires_grad, not at the grad mode
        query, key, value = query.detach(), key.detach(), value.detach()
    cpu_compiles = query.dtype in _CPU_COMPILED_DTYPES and not (return_lse or return_block_mass)
    if compile is None:
        compile = query.device.type == "cuda" or cpu_compiles
    elif compile and query.device.type == "cpu" and not cpu_compiles:
        raise InvalidValueError(
            "compiled FlexAttention on the CPU serves float32/bfloat16/float16 inference only (no lse, "
            f"no block_mass), got {query.dtype}, return_lse={return_lse}, "
            f"return_block_mass={return_block_mass}: use compile=False"
        )
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    bs, nq, s = lay.block_size, lay.num_query_blocks, block_indices.shape[-1]
    dv = value.shape[-1]
    acc = torch.promote_types(query.dtype, torch.float32)
    if tq == 0 or s == 0 or b == 0 or tk == 0:
        return SparseAttentionOutput(
            query.new_zeros(b, hq, tq, dv),
            query.new_full((b, hq, tq), -math.inf, dtype=acc) if return_lse else None,
            torch.zeros(b, hkv, nq, s, device=query.device, dtype=acc) if return_block_mass else None,
        )
    mask = selection_block_mask(
        block_indices, lay, q_len=tq, k_len=tk, num_heads=hq, causal=causal, key_padding_mask=padding
    )
    back = nq * bs - lay.front - tq
    q = nn.functional.pad(query, (0, 0, lay.front, back)) if lay.front or back else query
    fa = _flex_module()
    run = _compiled_flex(query.device.type) if compile else fa.flex_attention
    kwargs = dict(block_mask=mask, scale=scale, enable_gqa=hq != hkv)
    if query.device.type == "cuda":
        # The decoding kernel (taken for short queries) needs the block size to be a multiple of
        # its query tile, which grows with the query length: the main kernel has no such limit.
        kwargs["kernel_options"] = {"FORCE_USE_FLEX_ATTENTION": True}
    if return_lse:
        if hasattr(fa, "AuxRequest"):
            out, aux = run(q, key, value, return_aux=fa.AuxRequest(lse=True), **kwargs)
            lse = aux.lse
        else:  # torch < 2.9
            out, lse = run(q, key, value, return_lse=True, **kwargs)
        lse = lse[:, :, lay.front : lay.front + tq].to(acc)
    else:
        out, lse = run(q, key, value, **kwargs), None
    mass = None
    if return_block_mass:
        with torch.no_grad():
            mass = _block_mass(q.detach(), key.detach(), block_indices, lay, tq, run, kwargs)
    return SparseAttentionOutput(out[:, :, lay.front : lay.front + tq], lse, mass)


def _block_mass(
    q: Tensor, key: Tensor, block_indices: Tensor, lay: BlockLayout, tq: int, run: Callable, kwargs: dict
) -> Tensor:
    """``block_mass`` [B, Hkv, NQ, S] (see ``block_sparse_attention``): attention with one-hot
    values gives each row's probability per key block, ``_MASS_COLUMNS`` key blocks a pass,
    reduced over the group's heads and the real rows of each query block before the next pass."""
    b, hq, _, _ = q.shape
    hkv, tk = key.shape[1], key.shape[2]
    g, bs, nq, nk = hq // hkv, lay.block_size, lay.num_query_blocks, lay.num_key_blocks
    acc = torch.promote_types(q.dtype, torch.float32)
    key_block = torch.arange(tk, device=q.device) // bs
    r = torch.arange(nq * bs, device=q.device) - lay.front
    rows_ok = ((r >= 0) & (r < tq)).view(1, 1, 1, nq, bs, 1).to(acc)
    mass = torch.zeros(b, hkv, nq, block_indices.shape[-1], device=q.device, dtype=acc)
    for c0 in range(0, nk, _MASS_COLUMNS):
        # always _MASS_COLUMNS wide (zero columns past the last block): one kernel shape, and a
        # value dim the CUDA kernel takes (>= 16)
        cols = torch.arange(c0, c0 + _MASS_COLUMNS, device=q.device)
        onehot = (key_block.view(tk, 1) == cols.view(1, -1)).to(q.dtype)
        onehot = onehot.expand(b, hkv, tk, _MASS_COLUMNS).contiguous()
        per_block = run(q, key, onehot, **kwargs).to(acc).view(b, hkv, g, nq, bs, _MASS_COLUMNS)
        per_block = (per_block * rows_ok).sum((2, 4))  # [B, Hkv, NQ, columns]
        local = block_indices - c0
        here = (local >= 0) & (local < _MASS_COLUMNS)
        mass += per_block.gather(-1, local.clamp(0, _MASS_COLUMNS - 1)) * here
    return mass / (rows_ok.sum((2, 4)) * g).clamp_min(1.0)


__all__ = ["BACKENDS", "flex_block_sparse_attention", "flex_unavailable_reason", "selection_block_mask"]
