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
the end to whole blocks, and the padding rows are cut off the output. In inference, a few
queries (decoding) are padded only to a smaller query tile (``BLOCK_SIZE = (tile,
block_size)``, each tile inside one query block), so one token costs a tile, not a block.

The compiled FlexAttention is one ``torch.compile`` for the process, run under a recompile
limit of at least 64: past dynamo's default 8 (an ordinary mix of dtypes, grad modes, block
sizes and lengths reaches it) torch would silently run its eager FlexAttention, which computes
every score.

What FlexAttention cannot do is refused with a clear error: on CUDA the block size must be a
power of two >= 16 or a multiple of 128 (the Triton kernel's tiles must divide it); on the
CPU, torch has no FlexAttention backward, so inputs that require grad are refused.
``block_mass`` (the gate's distillation target) is computed without gradient from the main
pass's ``lse``: one float32 product of each query block with its gathered selected key blocks
(no value product, no second attention pass).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import DeviceError, InvalidValueError
from .layout import (
    CHUNK_ELEMENTS,
    BlockLayout,
    SparseAttentionOutput,
    block_layout,
    check_block_indices,
    check_padding,
    check_qkv,
    key_valid,
    split_blocks,
    unpadded_query_rows,
)

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

_CPU_COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


# Graphs the compiled FlexAttention may keep (dynamo's default, 8, is reached by an ordinary mix of
# dtypes, grad modes, lse requests, block sizes and lengths; past it dynamo silently runs torch's
# eager FlexAttention, which computes every score).
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex(device_type: str, backend: str = "inductor") -> Callable:
    """The process's ``torch.compile``-d FlexAttention for a device type, run under a recompile
    limit of at least ``_RECOMPILE_LIMIT``."""
    # On the CPU, graphs are static (lengths are bucketed, see flex_block_sparse_attention): the
    # C++ kernel that torch 2.15 generates for dynamic shapes fails to compile for some block sizes.
    compiled = torch.compile(
        _flex_module().flex_attention, backend=backend, dynamic=False if device_type == "cpu" else None
    )

    def run(*args, **kwargs):
        limit = max(_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(*args, **kwargs)

    return run


def _cuda_kernel_options(query_tile: int, block_size: int) -> dict:
    """FlexAttention's kernel options on CUDA.

    Its main Triton kernel, forced: the decoding kernel (taken for short queries) needs the block
    size to be a multiple of its query tile, which grows with the query length. ``BACKEND``
    replaces the legacy knob where torch has it (torch refuses both together). Small sparse
    blocks pin the kernel tiles to them: Inductor shrinks its default tiles (up to 128 rows) to
    the sparse blocks only when both are powers of two and it has one config, so a 16-row query
    tile of a 384-key block, or blocks under 64 under ``max_autotune`` (every config >= 64 rows),
    would be refused.
    """
    options = getattr(_flex_module(), "FlexKernelOptions", None)
    if "BACKEND" in getattr(options, "__annotations__", {}):
        out: dict = {"BACKEND": "TRITON"}
    else:
        out = {"FORCE_USE_FLEX_ATTENTION": True}
    if query_tile < 128:
        out["fwd_BLOCK_M"] = query_tile
    if block_size < 64:
        out["fwd_BLOCK_N"] = block_size
        # the backward runs with whole blocks as query tiles (query_tile == block_size)
        out.update({f"bwd_BLOCK_{k}": block_size for k in ("M1", "N1", "M2", "N2")})
    return out


def _selected_table(block_indices: Tensor, lay: BlockLayout, causal: bool) -> Tensor:
    """[B, Hkv, NQ, NK] bool: the blocks each query block attends (under causal attention none
    after it), the ``mask_mod``'s lookup."""
    b, hkv, nq, _ = block_indices.shape
    nk, device = lay.num_key_blocks, block_indices.device
    table = torch.zeros(b, hkv, nq, nk + 1, dtype=torch.bool, device=device)
    table.scatter_(-1, torch.where(block_indices >= 0, block_indices, nk), True)
    selected = table[..., :nk].contiguous()  # one layout whatever the options (no recompile)
    if causal:
        own = (lay.first_block + torch.arange(nq, device=device)).view(nq, 1)
        selected = selected & (torch.arange(nk, device=device) <= own)
    return selected


def _kv_tables(
    block_indices: Tensor, lay: BlockLayout, causal: bool, key_ok: Tensor, g: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """BlockMask's ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)`` [B, Hq,
    NQ(, NK)] from ``block_indices`` [B, Hkv, NQ, S]: the S chosen columns first, then padding
    (torch's compiled kernels size the key axis from the tables' width, so they are NK wide).
    "Full" blocks have every (query, key) pair attended: before the query block (any block
    without causality), holding real keys only; the other selected blocks are partial (masked
    by the ``mask_mod``)."""
    b, hkv, nq, s = block_indices.shape
    nk, bs, device = lay.num_key_blocks, lay.block_size, block_indices.device
    used = block_indices >= 0
    safe = block_indices.clamp_min(0)
    all_real = key_ok.view(b, 1, 1, nk, bs).all(-1).expand(b, hkv, nq, nk).gather(-1, safe)
    full = used & all_real
    if causal:
        own = (lay.first_block + torch.arange(nq, device=device)).view(nq, 1)
        used = used & (block_indices <= own)
        full = full & (block_indices < own)
    partial = used & ~full
    width = max(nk, s)

    def ordered(sel: Tensor) -> Tuple[Tensor, Tensor]:
        cols = torch.where(sel, block_indices, nk).sort(dim=-1).values  # chosen first, ascending
        cols = nn.functional.pad(cols, (0, width - s), value=nk)
        num = sel.sum(-1, dtype=torch.int32)
        cols = torch.where(cols < nk, cols, 0).to(torch.int32)
        return num.repeat_interleave(g, dim=1).contiguous(), cols.repeat_interleave(g, dim=1).contiguous()

    return (*ordered(partial), *ordered(full))


def selection_block_mask(
    block_indices: Tensor,
    layout: BlockLayout,
    *,
    q_len: int,
    k_len: int,
    num_heads: int,
    causal: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    compute_q_blocks: bool = True,
    query_tile: Optional[int] = None,
) -> BlockMask:
    """The FlexAttention ``BlockMask`` of a selection, over the block-aligned padded queries.

    ``block_indices`` [B, Hkv, NQ, S] (``-1`` = unused); ``num_heads`` query heads (a multiple of
    Hkv). The mask's query axis has ``NQ * block_size`` rows: row ``m`` is the query at key
    position ``first_block * block_size + m`` (rows outside the ``q_len`` real queries are
    padding and see what their position would see). Its ``mask_mod`` encodes the whole rule
    (selection, causality, key padding, keys past ``k_len``), so it is exact on its own.
    ``compute_q_blocks=False`` skips
    the transposed tables that only the backward needs.

    ``query_tile`` (a divisor of ``block_size``; default ``block_size``): the mask's query tiles
    have that many rows, and its query axis covers only the tiles that hold real queries, rows
    ``r0 .. r1`` of the above (:func:`query_rows`), each tile inside one query block and
    inheriting its tables. Decoding (a query or a few) then computes a tile, not a block.
    """
    fa = _flex_module()
    b, hkv, _, _ = block_indices.shape
    bs, nk = layout.block_size, layout.num_key_blocks
    g = num_heads // hkv
    device = block_indices.device
    key_ok = (torch.arange(nk * bs, device=device) < k_len).expand(b, nk * bs)
    if key_padding_mask is not None:
        key_ok = key_ok & nn.functional.pad(key_padding_mask, (0, nk * bs - k_len), value=False)
    key_ok = key_ok.contiguous()
    qt = bs if query_tile is None else query_tile
    if qt < 1 or bs % qt:
        raise InvalidValueError(f"query_tile must divide block_size {bs}, got {query_tile}")
    r0, r1 = query_rows(layout, q_len, qt)
    selected = _selected_table(block_indices, layout, causal)
    # Captured 0-dim tensors rather than Python constants, so that compiled code is not specialised
    # to them (one graph serves causal and not, MHA and GQA). Causality is `kv_idx <= q_idx + offset`
    # with offset the key position of mask row 0; without it, an offset past every key.
    offset = torch.full((), layout.first_block * bs + r0 if causal else nk * bs, device=device)
    row0 = torch.full((), r0, device=device)
    group = torch.full((), g, device=device)

    def mask_mod(bi, hi, q_idx, kv_idx):
        keep = selected[bi, hi // group, (q_idx + row0) // bs, kv_idx // bs] & key_ok[bi, kv_idx]
        return keep & (kv_idx <= q_idx + offset)

    tables = _kv_tables(block_indices, layout, causal, key_ok, g)
    if qt != bs:  # each tile takes the tables of its query block
        block_of_tile = torch.arange(r0, r1, qt, device=device) // bs
        tables = tuple(t.index_select(2, block_of_tile) for t in tables)
    return fa.BlockMask.from_kv_blocks(
        *tables,
        BLOCK_SIZE=(qt, bs),
        mask_mod=mask_mod,
        seq_lengths=(r1 - r0, k_len),
        compute_q_blocks=compute_q_blocks,
    )


def query_rows(layout: BlockLayout, q_len: int, query_tile: int) -> Tuple[int, int]:
    """``(r0, r1)``: the rows, among the ``NQ * block_size`` block-aligned padded query rows, of
    the whole ``query_tile``-row tiles that hold the ``q_len`` real queries."""
    r0 = layout.front // query_tile * query_tile
    return r0, -(-(layout.front + q_len) // query_tile) * query_tile


def _query_tile(q_len: int, block_size: int, minimum: int) -> int:
    """Rows per query tile: the power of two >= ``q_len`` (at least ``minimum``) when it divides
    ``block_size`` and is smaller, else ``block_size``."""
    tile = max(minimum, 1 << (q_len - 1).bit_length())
    return tile if tile < block_size and block_size % tile == 0 else block_size


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
    selection; the first call per shape compiles); ``None`` compiles on CUDA always (where
    shapes are dynamic after the first new length), and on the CPU for float32/bfloat16/float16
    inference without ``lse`` or ``block_mass`` when the queries span more than one block
    (prefill: one-token decoding would pay seconds of compilation for each new bucket). On the
    CPU, graphs are static, so the query and key block counts and the slot count are rounded up
    to powers of two (padding rows, keys and slots, masked): a graph serves every length up to
    twice the first. ``compile=False`` runs torch's eager FlexAttention, which computes every
    score and masks: a reference, not a fast path.
    """
    b, _, hkv, tq, tk = check_qkv(query, key, value)
    lay = block_layout(tq, tk, block_size)
    check_block_indices(block_indices, b, hkv, lay, query.device)
    return run_flex(
        query,
        key,
        value,
        block_indices,
        lay,
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        return_lse=return_lse,
        return_block_mass=return_block_mass,
        compile=compile,
    )


def run_flex(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    block_indices: Tensor,
    lay: BlockLayout,
    *,
    causal: bool,
    key_padding_mask: Optional[Tensor],
    scale: Optional[float],
    return_lse: bool,
    return_block_mass: bool,
    compile: Optional[bool],
) -> SparseAttentionOutput:
    """:func:`flex_block_sparse_attention` once q/k/v and ``block_indices`` are checked (the
    index check syncs with the device: ``block_sparse_attention`` has done it already)."""
    b, hq, tq = query.shape[:3]
    hkv, tk, block_size = key.shape[1], key.shape[2], lay.block_size
    padding = check_padding(key_padding_mask, b, tk, query.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    reason = flex_unavailable_reason(query.device, lay.block_size, query.shape[-1], value.shape[-1], grad)
    if reason is not None:
        raise DeviceError(reason)
    if not grad:  # torch's CPU check looks at requires_grad, not at the grad mode
        query, key, value = query.detach(), key.detach(), value.detach()
    cpu_compiles = query.dtype in _CPU_COMPILED_DTYPES and not (return_lse or return_block_mass)
    if compile is None:
        compile = query.device.type == "cuda" or (cpu_compiles and tq > block_size)
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
    if compile and query.device.type == "cpu":
        key, value, block_indices, padding, lay = _bucketed(key, value, block_indices, padding, lay)
        tk, rows = key.shape[2], lay.num_query_blocks * bs - lay.front  # every bucketed block
    else:
        rows = tq
    # Few queries (decoding) take a query tile smaller than the block (on CUDA >= 16 rows, the
    # kernel's smallest tile), unless the backward or block_mass needs the rows of whole blocks.
    qt = bs
    if tq < bs and not (grad or return_block_mass or (compile and query.device.type == "cpu")):
        qt = _query_tile(tq, bs, 16 if query.device.type == "cuda" else 1)
    mask = selection_block_mask(
        block_indices,
        lay,
        q_len=rows,
        k_len=tk,
        num_heads=hq,
        causal=causal,
        key_padding_mask=padding,
        compute_q_blocks=grad,
        query_tile=qt,
    )
    r0, r1 = query_rows(lay, rows, qt)
    front, back = lay.front - r0, r1 - lay.front - tq
    q = nn.functional.pad(query, (0, 0, front, back)) if front or back else query
    fa = _flex_module()
    run = _compiled_flex(query.device.type) if compile else fa.flex_attention
    kwargs = dict(block_mask=mask, scale=scale, enable_gqa=hq != hkv)
    if query.device.type == "cuda":
        kwargs["kernel_options"] = _cuda_kernel_options(qt, bs)
    lse = mass = None
    if return_lse or return_block_mass:
        if hasattr(fa, "AuxRequest"):
            out, aux = run(q, key, value, return_aux=fa.AuxRequest(lse=True), **kwargs)
            lse = aux.lse
        else:  # torch < 2.9
            out, lse = run(q, key, value, return_lse=True, **kwargs)
    else:
        out = run(q, key, value, **kwargs)
    if return_block_mass:
        with torch.no_grad():
            mass = _block_mass(q, key, block_indices, lse.detach(), lay, tq, scale, causal, padding)
    if lse is not None:
        lse = lse[:, :, front : front + tq].to(acc) if return_lse else None
    return SparseAttentionOutput(out[:, :, front : front + tq], lse, mass)


def _bucketed(
    key: Tensor, value: Tensor, block_indices: Tensor, padding: Optional[Tensor], lay: BlockLayout
) -> Tuple[Tensor, Tensor, Tensor, Tensor, BlockLayout]:
    """The problem with its query and key block counts and its slot count rounded up to powers of
    two: keys past the end are padding (masked), query blocks past the end and the extra slots
    select nothing (the extra rows are cut off)."""
    bs, nq, nk, s = lay.block_size, lay.num_query_blocks, lay.num_key_blocks, block_indices.shape[-1]
    nq2, nk2, s2 = (1 << (n - 1).bit_length() for n in (nq, nk, s))
    b, tk = key.shape[0], key.shape[2]
    extra = nk2 * bs - tk
    if padding is None:
        padding = torch.ones(b, tk, dtype=torch.bool, device=key.device)
    return (
        nn.functional.pad(key, (0, 0, 0, extra)),
        nn.functional.pad(value, (0, 0, 0, extra)),
        nn.functional.pad(block_indices, (0, s2 - s, 0, nq2 - nq), value=-1),
        nn.functional.pad(padding, (0, extra), value=False),
        lay._replace(num_key_blocks=nk2, num_query_blocks=nq2),
    )


def _block_mass(
    q: Tensor,
    key: Tensor,
    block_indices: Tensor,
    lse: Tensor,
    lay: BlockLayout,
    tq: int,
    scale: float,
    causal: bool,
    padding: Optional[Tensor],
) -> Tensor:
    """``block_mass`` [B, Hkv, NQ, S] (see ``block_sparse_attention``) from the main pass's
    ``lse`` [B, Hq, NQ * bs] over the padded queries ``q`` [B, Hq, NQ * bs, D]: one float32 (float64)
    product of each query block with its gathered selected key blocks, ``exp(q·k·scale - lse)``
    summed per slot, with no value product; query blocks in chunks of bounded size."""
    b, hq, _, d = q.shape
    hkv, tk = key.shape[1], key.shape[2]
    g, bs, nq, nk, s = (
        hq // hkv,
        lay.block_size,
        lay.num_query_blocks,
        lay.num_key_blocks,
        block_indices.shape[-1],
    )
    device, acc = q.device, torch.promote_types(q.dtype, torch.float32)
    qb = q.view(b, hkv, g, nq, bs, d)
    lse = lse.view(b, hkv, g, nq, bs)
    kflat = split_blocks(key, lay).reshape(b * hkv * nk, bs * d)
    key_ok = key_valid(lay, b, tk, padding, device).view(b, 1, nk, bs).expand(b, hkv, nk, bs)
    rows_ok = unpadded_query_rows(lay, tq, padding, device)  # [B or 1, NQ, bs]
    base = (torch.arange(b * hkv, device=device) * nk).view(b, hkv, 1, 1)
    pos = torch.arange(bs, device=device)
    mass = torch.empty(b, hkv, nq, s, device=device, dtype=acc)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * hkv * g * bs * s * bs))
    for c0 in range(0, nq, chunk):
        idx = block_indices[:, :, c0 : c0 + chunk]  # [B, Hkv, C, S]
        c = idx.shape[2]
        safe = idx.clamp_min(0)
        ks = kflat.index_select(0, (safe + base).reshape(-1)).view(b, hkv, c, s * bs, d)
        qc = qb[:, :, :, c0 : c0 + c].transpose(2, 3).reshape(b, hkv, c, g * bs, d)
        scores = torch.matmul(qc.to(acc), ks.to(acc).transpose(-1, -2)).view(b, hkv, c, g, bs, s, bs)
        # attended (query row, key) pairs: used slot, real key, and under causality key <= query
        ok = (idx >= 0).view(b, hkv, c, s, 1) & key_ok.gather(
            2, safe.view(b, hkv, c * s, 1).expand(-1, -1, -1, bs)
        ).view(b, hkv, c, s, bs)
        ok = ok.view(b, hkv, c, 1, 1, s, bs)
        if causal:
            q_pos = (lay.first_block + c0 + torch.arange(c, device=device)).view(c, 1) * bs + pos  # [C, bs]
            k_pos = idx.view(b, hkv, c, s, 1) * bs + pos  # [B, Hkv, C, S, bs]
            ok = ok & (k_pos.view(b, hkv, c, 1, 1, s, bs) <= q_pos.view(1, 1, c, 1, bs, 1, 1))
        row_lse = lse[:, :, :, c0 : c0 + c].transpose(2, 3).to(acc).view(b, hkv, c, g, bs, 1, 1)
        p = torch.where(ok, torch.exp(scores * scale - row_lse), 0.0)
        w = rows_ok[:, c0 : c0 + c].reshape(rows_ok.shape[0], 1, c, 1, bs, 1).to(acc)
        mass[:, :, c0 : c0 + c] = (p.sum(-1) * w).sum((3, 4)) / (w.sum((3, 4)) * g).clamp_min(1.0)
    return mass


__all__ = [
    "flex_block_sparse_attention",
    "flex_unavailable_reason",
    "query_rows",
    "run_flex",
    "selection_block_mask",
]
