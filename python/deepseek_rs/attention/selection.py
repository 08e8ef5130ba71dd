"""Which key blocks each query block attends: pooling, the forced and routable blocks, the router.

For every query block (and every key/value head: the query heads of a grouped-query group share
one selection, as in NSA, so each selected K/V block is gathered once per group) a gate scores the
key blocks (from the mean-pooled blocks of :func:`pool_blocks`) and the router
(:func:`deepseek_rs.route`, Rust) picks some of them, by top-k or by the progressive top-p rule
(as many blocks as the query block needs, between ``min_blocks`` and ``max_blocks``). The query
block's own block is always attended; optionally also ``local_blocks`` neighbours on each side
and the first ("sink") block. Under causal attention, blocks after the query block are never
candidates (:func:`routable_blocks`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import InvalidValueError, ShapeError
from ..moe.routing import route
from .layout import MASKED, BlockLayout, block_layout, key_valid, split_blocks, unpadded_query_rows

RULES = ("top_k", "top_p")


class Selection(NamedTuple):
    """The key blocks each query block attends to.

    ``block_indices`` [B, Hkv, NQ, S] int64: key block ids in ascending order, ``-1`` in unused
    slots. ``gate_logits`` [B, Hkv, NQ, NK] are the scores the router selected from (None when
    the selection was given).
    """

    block_indices: Tensor
    gate_logits: Optional[Tensor]


def pool_blocks(
    query: Tensor,
    key: Tensor,
    block_size: int,
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean-pooled queries and keys per block, the inputs of the gate.

    Returns ``(query_pooled [B, Hkv, NQ, D], key_pooled [B, Hkv, NK, D], key_block_valid
    [B, NK])``: queries are averaged over the query heads of each group and the real rows of
    each query block (not padding in ``key_padding_mask``; zeros for a block of padding only),
    keys over the real keys of each key block; ``key_block_valid`` says
    whether a key block holds any real key.
    """
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    lay = block_layout(tq, tk, block_size)
    bs, nq, nk = lay.block_size, lay.num_query_blocks, lay.num_key_blocks
    acc = torch.promote_types(key.dtype, torch.float32)  # half-precision sums overflow
    kv = key_valid(lay, b, tk, key_padding_mask, key.device).view(b, 1, nk, bs, 1)
    ksum = split_blocks(key.to(acc), lay).masked_fill(~kv, 0.0).sum(3)
    kcount = kv.sum(3).to(acc)
    key_pooled = ksum / kcount.clamp_min(1)
    q = nn.functional.pad(query.to(acc), (0, 0, lay.front, nq * bs - lay.front - tq))
    real = unpadded_query_rows(lay, tq, key_padding_mask, query.device)  # [B or 1, NQ, bs]
    lead = real.shape[0]
    q = (q.view(b, hkv, hq // hkv, nq, bs, d) * real.view(lead, 1, 1, nq, bs, 1).to(acc)).sum((2, 4))
    rows = real.sum(-1).to(acc) * (hq // hkv)
    query_pooled = q / rows.view(lead, 1, nq, 1).clamp_min(1)
    return query_pooled, key_pooled, kcount.view(b, nk) > 0


def routable_blocks(
    layout: BlockLayout,
    batch: int,
    heads: int,
    *,
    causal: bool = True,
    local_blocks: int = 0,
    sink_block: bool = False,
    key_block_valid: Optional[Tensor] = None,
    device=None,
) -> Tuple[Tensor, Tensor]:
    """The forced and the routable key blocks of each query block, as ``[B, Hkv, NQ, NK]`` bool masks.

    Forced: the query block's own block, the ``local_blocks`` nearest on each side and, with
    ``sink_block``, the first block holding a real key (per ``key_block_valid`` [B, NK]), all
    of them attended whatever the gate says. Routable: the other visible blocks (not after the
    query block when ``causal``) that hold a real key; the gate chooses among these.
    """
    if local_blocks < 0:
        raise InvalidValueError(f"local_blocks must be >= 0, got {local_blocks}")
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    qb = layout.first_block + torch.arange(nq, device=device).view(nq, 1)
    kb = torch.arange(nk, device=device).view(1, nk)
    visible = kb <= qb if causal else torch.ones(nq, nk, dtype=torch.bool, device=device)
    forced = (visible & ((kb - qb).abs() <= local_blocks)).view(1, 1, nq, nk)
    if sink_block:
        sink = torch.zeros(batch, dtype=torch.int64, device=device)
        if key_block_valid is not None and nk > 0:
            sink = key_block_valid.to(torch.int8).argmax(dim=-1)
        forced = forced | (visible & (kb == sink.view(batch, 1, 1))).unsqueeze(1)
    candidates = visible & ~forced
    if key_block_valid is not None:
        candidates = candidates & key_block_valid.view(batch, 1, 1, nk)
    return forced.expand(batch, heads, nq, nk), candidates.expand(batch, heads, nq, nk)


def select_blocks(
    gate_logits: Tensor,
    layout: BlockLayout,
    *,
    causal: bool = True,
    rule: str = "top_k",
    top_k: int = 4,
    top_p: float = 0.9,
    min_blocks: int = 1,
    max_blocks: Optional[int] = None,
    local_blocks: int = 0,
    sink_block: bool = False,
    key_block_valid: Optional[Tensor] = None,
) -> Tensor:
    """Choose the key blocks of each query block from ``gate_logits`` [B, Hkv, NQ, NK].

    The forced blocks of :func:`routable_blocks` are always chosen; among the routable ones
    (visible, holding a real key per ``key_block_valid`` [B, NK], not forced) the router picks ``top_k``
    more (``rule="top_k"``), or the smallest set whose softmax mass over those candidates
    reaches ``top_p``, at least ``min_blocks`` and at most ``max_blocks`` (``rule="top_p"``).
    Returns ``block_indices`` [B, Hkv, NQ, S] (ascending, ``-1`` = unused slot).
    """
    if rule not in RULES:
        raise InvalidValueError(f"rule must be one of {RULES}, got {rule!r}")
    if gate_logits.dim() != 4 or gate_logits.shape[2:] != (layout.num_query_blocks, layout.num_key_blocks):
        raise ShapeError(
            f"gate_logits must be [B, Hkv, {layout.num_query_blocks}, {layout.num_key_blocks}], "
            f"got {tuple(gate_logits.shape)}"
        )
    if rule == "top_k" and top_k < 0:
        raise InvalidValueError(f"top_k must be >= 0, got {top_k}")
    if rule == "top_p":
        if not 0.0 < top_p <= 1.0:
            raise InvalidValueError(f"top_p must be in (0, 1], got {top_p}")
        if min_blocks < 1 or (max_blocks is not None and max_blocks < min_blocks):
            raise InvalidValueError(
                f"need 1 <= min_blocks <= max_blocks, got min_blocks={min_blocks}, max_blocks={max_blocks}"
            )
    b, h, nq, nk = gate_logits.shape
    forced, candidates = routable_blocks(
        layout,
        b,
        h,
        causal=causal,
        local_blocks=local_blocks,
        sink_block=sink_block,
        key_block_valid=key_block_valid,
        device=gate_logits.device,
    )
    device = gate_logits.device
    kb = torch.arange(nk, device=device)
    bad = candidates & ~torch.isfinite(gate_logits.detach())
    if bool(bad.any()):
        i = [int(x) for x in bad.nonzero()[0]]
        raise InvalidValueError(
            f"gate score is not finite (NaN or infinite queries or keys?) at batch {i[0]}, kv head {i[1]}, "
            f"query block {i[2]}, key block {i[3]}"
        )
    chosen = forced.clone()
    rows = b * h * nq
    k = min(top_k, nk) if rule == "top_k" else min(nk if max_blocks is None else max_blocks, nk)
    if rows and k > 0:
        logits = gate_logits.detach().float().masked_fill(~candidates, MASKED).reshape(rows, nk).cpu()
        if rule == "top_k":
            r = route(logits, "top_k", top_k=k)
        else:
            r = route(logits, "top_p", top_p=top_p, min_k=min(min_blocks, k), max_k=k)
        row = torch.repeat_interleave(torch.arange(rows), r.experts_per_token)
        picked = torch.zeros(rows, nk, dtype=torch.bool)
        picked[row, r.expert_ids] = True
        chosen |= picked.to(device).view(b, h, nq, nk) & candidates
    s = int(chosen.sum(-1).max()) if rows else 0
    order = torch.where(chosen, kb, kb + nk)  # chosen blocks first, in ascending order
    idx = order.sort(dim=-1).values[..., :s]
    return torch.where(idx < nk, idx, torch.full_like(idx, -1))


__all__ = ["RULES", "Selection", "pool_blocks", "routable_blocks", "select_blocks"]
