"""The gather path of block-sparse attention: the selected K/V blocks gathered, dense attention over them.

The computation really skips the other blocks: the selected K/V blocks are gathered per query
block and attention runs over them only, so time and memory are O(T * selected keys), not
O(T^2). Softmax is taken over the selected keys in float32 (float64 for float64 input); rows that
see no key (padding) give zeros. Plain torch, so it runs (and trains) on any device.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .layout import (
    CHUNK_ELEMENTS,
    MASKED,
    BlockLayout,
    SparseAttentionOutput,
    check_padding,
    key_valid,
    split_blocks,
    unpadded_query_rows,
)


def run_gather(
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
) -> SparseAttentionOutput:
    """:func:`~deepseek_rs.attention.block_sparse_attention` by gathering, once q/k/v and
    ``block_indices`` are checked (the index check syncs with the device: the entry has done it);
    ``lay`` is their :class:`BlockLayout`."""
    b, hq, tq = query.shape[:3]
    hkv, tk = key.shape[1], key.shape[2]
    bs, nq, nk = lay.block_size, lay.num_query_blocks, lay.num_key_blocks
    padding = check_padding(key_padding_mask, b, tk, query.device)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    g, d, dv = hq // hkv, query.shape[-1], value.shape[-1]
    s = block_indices.shape[-1]
    device = query.device
    acc = torch.promote_types(query.dtype, torch.float32)
    if tq == 0 or s == 0 or b == 0:
        return SparseAttentionOutput(
            query.new_zeros(b, hq, tq, dv),
            query.new_full((b, hq, tq), -math.inf, dtype=acc) if return_lse else None,
            torch.zeros(b, hkv, nq, s, device=device, dtype=acc) if return_block_mass else None,
        )

    # queries as [B, Hkv, NQ, G * bs, D] (the group's heads share the gathered keys), pre-scaled
    q = nn.functional.pad(query.to(acc) * scale, (0, 0, lay.front, nq * bs - lay.front - tq))
    q = q.view(b, hkv, g, nq, bs, d).transpose(2, 3).reshape(b, hkv, nq, g * bs, d)
    # Blocks as rows, plus a zero row that unused slots and (causal) blocks after the query block
    # gather; padded keys are zeroed. So a NaN or inf in a masked key or value never reaches a
    # score or the output: masking by a finite additive bias then stays exact.
    if padding is not None:
        key = key.masked_fill(~padding.view(b, 1, tk, 1), 0.0)
        value = value.masked_fill(~padding.view(b, 1, tk, 1), 0.0)
    kflat = torch.cat([split_blocks(key, lay).reshape(b * hkv * nk, bs * d), key.new_zeros(1, bs * d)])
    vflat = torch.cat([split_blocks(value, lay).reshape(b * hkv * nk, bs * dv), value.new_zeros(1, bs * dv)])
    key_ok = key_valid(lay, b, tk, padding, device)  # [B, NK * bs]
    all_keys_ok = padding is None and tk == nk * bs
    rows_ok = unpadded_query_rows(lay, tq, padding, device)  # [B or 1, NQ, bs]
    base = (torch.arange(b * hkv, device=device) * nk).view(b, hkv, 1, 1)
    own = (lay.first_block + torch.arange(nq, device=device)).view(1, 1, nq, 1)
    # causal pattern of a key block against its own query block: key r' > query r is masked
    tri = torch.ones(bs, bs, dtype=torch.bool, device=device).triu(1)

    # Slots reordered: the own block first (so its causal triangle is a strided slice), then the
    # used slots, unused ones last; query blocks are then processed in groups of equal used-slot
    # count, so no product is computed for a slot that one query block uses and another doesn't.
    rank = torch.where(block_indices < 0, 2, 1)
    if causal:
        rank = torch.where(block_indices == own, 0, rank)
    order = torch.sort(rank.to(torch.int8), dim=-1, stable=True).indices
    block_indices = block_indices.gather(-1, order)
    width = (block_indices >= 0).sum(-1).amax(dim=(0, 1))  # [NQ] slots each query block needs
    pieces, outs, lses, masses = [], [], [], []
    for w in sorted(set(width.tolist())):
        group = (width == w).nonzero().flatten()
        w = max(w, 1)  # query blocks without any key still get one (masked) slot: output 0
        chunk = max(1, CHUNK_ELEMENTS // max(1, b * hkv * g * bs * w * bs))
        for c0 in range(0, group.numel(), chunk):
            sel = group[c0 : c0 + chunk]
            pieces.append(sel)
            outs_c, lse_c, mass_c = _attend_chunk(
                q.index_select(2, sel),
                kflat,
                vflat,
                block_indices.index_select(2, sel)[..., :w],
                own.index_select(2, sel) if causal else None,
                key_ok,
                all_keys_ok,
                rows_ok.index_select(1, sel),
                base,
                tri,
                (b, hkv, g, bs, d, dv, nk),
                value.dtype,
                return_lse,
                return_block_mass,
            )
            outs.append(outs_c)
            lses.append(lse_c)
            if mass_c is not None:
                masses.append(nn.functional.pad(mass_c, (0, s - w)))
    inverse = torch.empty(nq, dtype=torch.int64, device=device)
    ids = torch.cat(pieces)
    inverse[ids] = torch.arange(nq, device=device)

    def unblock(x: Tensor, tail: Tuple[int, ...]) -> Tensor:
        # [B, Hkv, NQ (grouped order), G, bs, *tail] -> [B, Hq, Tq, *tail]
        x = x.index_select(2, inverse).transpose(2, 3).reshape(b, hq, nq * bs, *tail)
        return x[:, :, lay.front : lay.front + tq]

    return SparseAttentionOutput(
        unblock(torch.cat(outs, dim=2), (dv,)),
        unblock(torch.cat(lses, dim=2), ()) if return_lse else None,
        _unsort(torch.cat(masses, dim=2).index_select(2, inverse), order) if return_block_mass else None,
    )


def _unsort(x: Tensor, order: Optional[Tensor]) -> Tensor:
    """Undo the slot reordering of :func:`run_gather` on a per-slot tensor."""
    return x if order is None else torch.empty_like(x).scatter_(-1, order, x)


def _attend_chunk(
    q: Tensor,
    kflat: Tensor,
    vflat: Tensor,
    idx: Tensor,
    own: Optional[Tensor],
    key_ok: Tensor,
    all_keys_ok: bool,
    rows_ok: Tensor,
    base: Tensor,
    tri: Tensor,
    dims: Tuple[int, ...],
    out_dtype: torch.dtype,
    return_lse: bool,
    return_block_mass: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Attention of C query blocks ``q`` [B, Hkv, C, G*bs, D] (scaled) over their slots ``idx``
    [B, Hkv, C, S]; ``own`` [1, 1, C, 1] their block ids under causal attention (else None)."""
    b, hkv, g, bs, d, dv, nk = dims
    acc = q.dtype
    c, s = idx.shape[2], idx.shape[3]
    causal = own is not None
    slot_ok = idx >= 0
    if causal:
        slot_ok = slot_ok & (idx <= own)
    safe = idx.clamp_min(0)
    flat = torch.where(slot_ok, idx + base, kflat.shape[0] - 1).reshape(-1)  # else the zero row
    ks = kflat.index_select(0, flat).view(b, hkv, c, s * bs, d)
    vs = vflat.index_select(0, flat).view(b, hkv, c, s * bs, dv)
    scores = torch.matmul(q, ks.to(acc).transpose(-1, -2))  # [B, Hkv, C, G*bs, S*bs]
    scores6 = scores.view(b, hkv, c, g, bs, s * bs)
    # Masks, in place and shared by the group's heads: per key (unused slots, padding,
    # past-the-end keys, under causal attention whole blocks after the query block: all zero
    # keys, so an added bias is exact), then the causal triangle on the query block's own block
    # (real keys: filled, so that a NaN or inf after the row is dropped), which the reordering
    # put in slot 0.
    has_diag = (idx[..., 0] == own[:, :, :, 0]) if causal else None  # [B, Hkv, C]
    row_ok = None  # [B, Hkv, C, 1, bs]: the row sees at least one key
    if not all_keys_ok or not bool(slot_ok.all()):
        ok = (
            key_ok.view(b, 1, nk, bs)
            .expand(b, hkv, nk, bs)
            .gather(2, safe.view(b, hkv, c * s, 1).expand(-1, -1, -1, bs))
        )
        ok = ok.view(b, hkv, c, s, bs) & slot_ok.unsqueeze(-1)
        scores6.add_(torch.where(ok, 0.0, MASKED).to(acc).view(b, hkv, c, 1, 1, s * bs))
        seen = ok.sum((-1, -2)).unsqueeze(-1)  # keys per row, [B, Hkv, C, 1]
        if has_diag is not None:  # own block: only the keys up to the row
            own_keys = ok[..., 0, :]
            upto = own_keys.cumsum(-1) - own_keys.sum(-1, keepdim=True)
            seen = seen + torch.where(has_diag.unsqueeze(-1), upto, 0)
        row_ok = (seen > 0).expand(b, hkv, c, bs).reshape(b, hkv, c, 1, bs)
        if bool(row_ok.all()):
            row_ok = None
    if has_diag is not None and bool(has_diag.any()):
        scores6[..., :bs].masked_fill_(has_diag.view(b, hkv, c, 1, 1, 1) & tri, MASKED)
    p = torch.softmax(scores6, dim=-1)
    # a row that sees no key gets output 0 (its softmax is uniform over masked keys)
    out = torch.matmul(p.view(b, hkv, c, g * bs, s * bs), vs.to(acc))
    out = out.to(out_dtype).view(b, hkv, c, g, bs, dv)
    if row_ok is not None:
        out = out * row_ok.unsqueeze(-1).to(out.dtype)
    lse = None
    if return_lse:
        lse = torch.logsumexp(scores6.detach(), dim=-1)
        lse = lse if row_ok is None else lse.masked_fill(~row_ok, -math.inf)
    mass = None
    if return_block_mass:
        with torch.no_grad():
            pm = p.detach() if row_ok is None else p.detach() * row_ok.unsqueeze(-1).to(acc)
            per_row = pm.view(b, hkv, c, g, bs, s, bs).sum(-1)  # [B, Hkv, C, G, bs, S]
            w = rows_ok.view(rows_ok.shape[0], 1, c, 1, bs, 1).to(acc)
            mass = (per_row * w).sum((3, 4)) / (w.sum((3, 4)) * g).clamp_min(1.0)
    return out, lse, mass


__all__ = ["run_gather"]
