"""Dynamic Attention Routing (DAR): block-sparse attention whose key blocks a learnable gate chooses.

The sequence is cut into blocks of ``block_size`` tokens. For every query block (and every key/value
head: the query heads of a grouped-query group share one selection, as in NSA, so each selected
K/V block is gathered once per group) a gate scores the key blocks and the router
(:func:`deepseek_rs.route`, Rust) picks some of them, by top-k or by the progressive top-p rule
(as many blocks as the query block needs, between ``min_blocks`` and ``max_blocks``). The query
block's own block is always attended; optionally also ``local_blocks`` neighbours on each side
and the first ("sink") block. Under causal attention, blocks after the query block are never
candidates.

The computation really skips the other blocks: the selected K/V blocks are gathered per query
block and attention runs over them only, so time and memory are O(T * selected keys), not
O(T^2). Softmax is taken over the selected keys in float32 (float64 for float64 input); rows that see
no key (padding) give zeros.

The gate (:class:`BlockGate`) follows MoBA and NSA's selection branch: mean-pooled block keys
scored against a pooled query through learnable projections initialised to the identity, so a
converted pretrained model starts with MoBA's parameter-free scoring. Under causal attention
the "query" of block n is the mean-pooled keys of block n - 1: every row of block n comes after
them and they sit in the KV cache, so no row's selection depends on a later token and
one-token decoding routes exactly as the full forward (the block's own mean query would leak
later tokens into earlier rows' selections). Bidirectional attention uses the block's mean
query.

The gate is trained by distillation, as DeepSeek Sparse Attention (DSA) trains its lightning
indexer: after a training forward, :attr:`DynamicAttention.gate_loss` holds the KL divergence
from the attention mass that the query block actually put on each key block (detached) to the
gate's softmax over the same blocks. The KL runs over routable blocks only
(:func:`routable_blocks`): the forced ones (own, local, sink) are attended whatever the gate
says, and in the target they would take most of the mass and teach the gate nothing. Two phases,
as in DSA: under the dense warm-up (``warmup=True`` or :func:`dense_warmup`) every visible
block is attended (the output is dense attention's, exactly) and the KL covers every routable
block, so the gate learns the full distribution, including blocks it would never pick; in
sparse training the KL covers the selected routable blocks (a block the gate does not pick then
gets no gradient, hence the warm-up; with a single routed block, ``top_k=1``, the KL is over one
block and always 0). The gate's inputs are detached, so the loss trains the
gate only and never pulls the attention toward the gate. We chose distillation over a soft gate
that scales the selected blocks' outputs because a soft gate changes the function: a converted
model would no longer compute its own attention (even with every block selected), and the gate
would be trained only through the blocks it already picked.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import DeviceError, DTypeError, InvalidValueError, ShapeError
from ..moe.routing import route

RULES = ("top_k", "top_p")
_BACKENDS = ("auto", "gather", "flex")  # see block_sparse_attention
_MASKED = -1e30  # a finite "minus infinity": the router refuses -inf, and masked rows stay finite
_CHUNK_ELEMENTS = 1 << 23  # score entries per chunk of query blocks (32 MiB in float32)


class BlockLayout(NamedTuple):
    """Where the queries sit among the key blocks.

    The ``Tq`` queries are the last ``Tq`` of the ``Tk`` key positions (a KV cache), so query
    ``i`` has position ``Tk - Tq + i``. Query block ``n`` is key block ``first_block + n``;
    ``front`` zero rows are padded before the first query to align it to its block.
    """

    block_size: int
    num_key_blocks: int
    num_query_blocks: int
    first_block: int
    front: int


def block_layout(q_len: int, k_len: int, block_size: int) -> BlockLayout:
    """The :class:`BlockLayout` of ``q_len`` queries over ``k_len`` keys."""
    if block_size < 1:
        raise InvalidValueError(f"block_size must be positive, got {block_size}")
    if q_len > k_len:
        raise ShapeError(f"more queries ({q_len}) than keys ({k_len}): queries are the last keys' positions")
    offset = k_len - q_len
    nk = -(-k_len // block_size)
    first = offset // block_size
    nq = 0 if q_len == 0 else (k_len - 1) // block_size - first + 1
    return BlockLayout(block_size, nk, nq, first, offset - first * block_size)


class Selection(NamedTuple):
    """The key blocks each query block attends to.

    ``block_indices`` [B, Hkv, NQ, S] int64: key block ids in ascending order, ``-1`` in unused
    slots. ``gate_logits`` [B, Hkv, NQ, NK] are the scores the router selected from (None when
    the selection was given).
    """

    block_indices: Tensor
    gate_logits: Optional[Tensor]


def _check_qkv(query: Tensor, key: Tensor, value: Tensor) -> Tuple[int, int, int, int, int]:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(f"{name} must be 4-D [batch, heads, tokens, head_dim], got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise DTypeError(f"{name} must be floating point, got {t.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise DTypeError(f"query, key and value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise DeviceError(f"query, key and value are on {query.device}, {key.device}, {value.device}")
    b, hq, tq, d = query.shape
    if key.shape[0] != b or value.shape[0] != b:
        raise ShapeError(f"batch sizes differ: query {b}, key {key.shape[0]}, value {value.shape[0]}")
    hkv, tk = key.shape[1], key.shape[2]
    if value.shape[1] != hkv or value.shape[2] != tk:
        raise ShapeError(f"key {tuple(key.shape)} and value {tuple(value.shape)} disagree on heads or tokens")
    if key.shape[3] != d:
        raise ShapeError(f"query head_dim {d} differs from key head_dim {key.shape[3]}")
    if hkv == 0 or hq % hkv != 0:
        raise ShapeError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return b, hq, hkv, tq, tk


def _check_padding(mask: Optional[Tensor], b: int, tk: int, device: torch.device) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2 or tuple(mask.shape) != (b, tk):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ShapeError(f"key_padding_mask must be [batch, keys] = [{b}, {tk}] (True = attend), got {shape}")
    if mask.device != device:
        raise DeviceError(f"key_padding_mask is on {mask.device}, the keys on {device}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise DTypeError(f"key_padding_mask must be bool or integer (1 = attend), got {mask.dtype}")
        mask = mask != 0
    return mask


def _blocks(x: Tensor, lay: BlockLayout) -> Tensor:
    """[B, H, Tk, D] -> [B, H, NK, bs, D], zero-padded at the end."""
    b, h, t, d = x.shape
    pad = lay.num_key_blocks * lay.block_size - t
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(b, h, lay.num_key_blocks, lay.block_size, d)


def _key_valid(lay: BlockLayout, b: int, tk: int, padding: Optional[Tensor], device) -> Tensor:
    """[B, NK * bs] bool: a real (not padding, not past the end) key."""
    n = lay.num_key_blocks * lay.block_size
    valid = (torch.arange(n, device=device) < tk).expand(b, n)
    if padding is not None:
        valid = valid & nn.functional.pad(padding, (0, n - tk), value=False)
    return valid


def _query_rows(lay: BlockLayout, tq: int, device) -> Tensor:
    """[NQ, bs] bool: a real query row (not alignment padding)."""
    r = torch.arange(lay.num_query_blocks * lay.block_size, device=device) - lay.front
    return ((r >= 0) & (r < tq)).view(lay.num_query_blocks, lay.block_size)


def _unpadded_query_rows(lay: BlockLayout, tq: int, padding: Optional[Tensor], device) -> Tensor:
    """[B or 1, NQ, bs] bool: a query row that is neither alignment padding nor padding in the key
    padding mask (the queries are the last ``tq`` keys). Padded rows still attend, but their
    attention is no signal: the gate's distillation target leaves them out."""
    rows = _query_rows(lay, tq, device).unsqueeze(0)
    if padding is None:
        return rows
    nq, bs = lay.num_query_blocks, lay.block_size
    tk = padding.shape[1]
    real = nn.functional.pad(padding[:, tk - tq :], (lay.front, nq * bs - lay.front - tq), value=False)
    return rows & real.view(padding.shape[0], nq, bs)


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
    kv = _key_valid(lay, b, tk, key_padding_mask, key.device).view(b, 1, nk, bs, 1)
    ksum = _blocks(key.to(acc), lay).masked_fill(~kv, 0.0).sum(3)
    kcount = kv.sum(3).to(acc)
    key_pooled = ksum / kcount.clamp_min(1)
    q = nn.functional.pad(query.to(acc), (0, 0, lay.front, nq * bs - lay.front - tq))
    real = _unpadded_query_rows(lay, tq, key_padding_mask, query.device)  # [B or 1, NQ, bs]
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
        logits = gate_logits.detach().float().masked_fill(~candidates, _MASKED).reshape(rows, nk).cpu()
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


class SparseAttentionOutput(NamedTuple):
    """What :func:`block_sparse_attention` returns."""

    out: Tensor  # [B, Hq, Tq, Dv]
    lse: Optional[Tensor]  # [B, Hq, Tq] log-sum-exp of the scaled scores, -inf where no key is seen
    block_mass: Optional[Tensor]  # [B, Hkv, NQ, S] attention probability per selected block, no grad


def _check_block_indices(block_indices: Tensor, b: int, hkv: int, lay: BlockLayout, device) -> None:
    nq, nk = lay.num_query_blocks, lay.num_key_blocks
    if not isinstance(block_indices, Tensor) or block_indices.dtype != torch.int64:
        raise DTypeError("block_indices must be an int64 tensor")
    if block_indices.dim() != 4 or tuple(block_indices.shape[:3]) != (b, hkv, nq):
        raise ShapeError(
            f"block_indices must be [{b}, {hkv}, {nq}, S] (batch, kv heads, query blocks, slots), "
            f"got {tuple(block_indices.shape)}"
        )
    if block_indices.device != device:
        raise DeviceError(f"block_indices is on {block_indices.device}, the queries on {device}")
    if block_indices.numel() and (int(block_indices.min()) < -1 or int(block_indices.max()) >= nk):
        raise InvalidValueError(f"block_indices must be in -1..{nk - 1} (-1 = unused slot)")
    if block_indices.shape[-1] > 1:
        ordered = block_indices.sort(dim=-1).values
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
            raise InvalidValueError("block_indices selects a key block twice for the same query block")


def block_sparse_attention(
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
    backend: str = "auto",
) -> SparseAttentionOutput:
    """Attention of each query block over its selected key blocks only.

    ``query`` [B, Hq, Tq, D], ``key`` [B, Hkv, Tk, D], ``value`` [B, Hkv, Tk, Dv] (Hq a multiple
    of Hkv; the queries are the last Tq key positions), ``block_indices`` [B, Hkv, NQ, S] as
    from :func:`select_blocks` (any order; ``-1`` = unused slot). ``key_padding_mask`` [B, Tk]
    is True for keys to attend. Scores and softmax are in float32 (float64 for float64 input).

    Returns :class:`SparseAttentionOutput`: the output (0 for a query row that sees no key),
    and on request the log-sum-exp of each row's scaled scores (float, ``-inf`` where the row
    sees no key) and ``block_mass``: the attention probability each selected block received,
    averaged over the group's heads and the block's real query rows (rows that are padding in
    ``key_padding_mask`` excluded: the gate's distillation target).

    ``backend``: ``"gather"`` gathers the selected K/V blocks and runs dense attention over them
    (torch, any device); ``"flex"`` runs FlexAttention with a block mask of the selection
    (:mod:`deepseek_rs.attention_flex`; compiled on CUDA; forward only on the CPU);
    ``"auto"`` takes ``"flex"`` on CUDA when it can run there, else ``"gather"``.
    """
    b, hq, hkv, tq, tk = _check_qkv(query, key, value)
    lay = block_layout(tq, tk, block_size)
    bs, nq, nk = lay.block_size, lay.num_query_blocks, lay.num_key_blocks
    _check_block_indices(block_indices, b, hkv, lay, query.device)
    from . import flex as _flex  # imports this module

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if _flex.resolve_backend(backend, query.device, bs, query.shape[-1], value.shape[-1], grad) == "flex":
        return _flex._flex_checked(
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
            compile=None,
        )
    padding = _check_padding(key_padding_mask, b, tk, query.device)
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
    kflat = torch.cat([_blocks(key, lay).reshape(b * hkv * nk, bs * d), key.new_zeros(1, bs * d)])
    vflat = torch.cat([_blocks(value, lay).reshape(b * hkv * nk, bs * dv), value.new_zeros(1, bs * dv)])
    key_ok = _key_valid(lay, b, tk, padding, device)  # [B, NK * bs]
    all_keys_ok = padding is None and tk == nk * bs
    rows_ok = _unpadded_query_rows(lay, tq, padding, device)  # [B or 1, NQ, bs]
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
        chunk = max(1, _CHUNK_ELEMENTS // max(1, b * hkv * g * bs * w * bs))
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
    """Undo the slot reordering of :func:`block_sparse_attention` on a per-slot tensor."""
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
        scores6.add_(torch.where(ok, 0.0, _MASKED).to(acc).view(b, hkv, c, 1, 1, s * bs))
        seen = ok.sum((-1, -2)).unsqueeze(-1)  # keys per row, [B, Hkv, C, 1]
        if has_diag is not None:  # own block: only the keys up to the row
            own_keys = ok[..., 0, :]
            upto = own_keys.cumsum(-1) - own_keys.sum(-1, keepdim=True)
            seen = seen + torch.where(has_diag.unsqueeze(-1), upto, 0)
        row_ok = (seen > 0).expand(b, hkv, c, bs).reshape(b, hkv, c, 1, bs)
        if bool(row_ok.all()):
            row_ok = None
    if has_diag is not None and bool(has_diag.any()):
        scores6[..., :bs].masked_fill_(has_diag.view(b, hkv, c, 1, 1, 1) & tri, _MASKED)
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


class BlockGate(nn.Module):
    """The learnable gate: ``(q̄ W_q) · (k̄ W_k) / sqrt(gate_dim)`` per key/value head.

    ``k̄`` are the mean-pooled block keys of :func:`pool_blocks`, ``q̄`` the query block's pooled
    query (under causal attention the previous block's pooled keys, see the module docstring). ``W_q`` and
    ``W_k`` [Hkv, D, gate_dim] start as the identity (its first ``gate_dim`` columns), i.e. as
    MoBA's gate ``q̄ · k̄``, scaled.
    """

    def __init__(
        self, num_kv_heads: int, head_dim: int, gate_dim: Optional[int] = None, device=None, dtype=None
    ):
        super().__init__()
        gate_dim = head_dim if gate_dim is None else gate_dim
        if num_kv_heads < 1 or head_dim < 1 or not 1 <= gate_dim <= head_dim:
            raise InvalidValueError(
                f"need num_kv_heads >= 1, head_dim >= 1 and 1 <= gate_dim <= head_dim, got "
                f"{num_kv_heads}, {head_dim}, {gate_dim}"
            )
        self.num_kv_heads, self.head_dim, self.gate_dim = num_kv_heads, head_dim, gate_dim
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Parameter(torch.empty(num_kv_heads, head_dim, gate_dim, **kw))
        self.k_proj = nn.Parameter(torch.empty(num_kv_heads, head_dim, gate_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            eye = torch.eye(self.head_dim, self.gate_dim, device=self.q_proj.device, dtype=self.q_proj.dtype)
            self.q_proj.copy_(eye.expand_as(self.q_proj))
            self.k_proj.copy_(eye.expand_as(self.k_proj))

    def forward(self, query_pooled: Tensor, key_pooled: Tensor) -> Tensor:
        """Gate logits [B, Hkv, NQ, NK] from pooled queries [B, Hkv, NQ, D] and keys [B, Hkv, NK, D]."""
        acc = torch.promote_types(self.q_proj.dtype, torch.float32)  # half precision overflows
        qg = torch.einsum("bhnd,hde->bhne", query_pooled.to(acc), self.q_proj.to(acc))
        kg = torch.einsum("bhnd,hde->bhne", key_pooled.to(acc), self.k_proj.to(acc))
        return torch.matmul(qg, kg.transpose(-1, -2)) / math.sqrt(self.gate_dim)

    def extra_repr(self) -> str:
        return f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, gate_dim={self.gate_dim}"


def gate_distillation_loss(
    gate_logits: Tensor, block_indices: Tensor, block_mass: Tensor, routable: Optional[Tensor] = None
) -> Tensor:
    """KL(attention mass || gate) over each query block's selected routable key blocks (DSA's indexer loss).

    ``gate_logits`` [B, Hkv, NQ, NK]; ``block_indices`` and ``block_mass`` [B, Hkv, NQ, S] as
    from :func:`block_sparse_attention`; ``routable`` [B, Hkv, NQ, NK] bool, the blocks the gate
    chooses among (:func:`routable_blocks`; None = every block). The KL runs over the used slots
    that hold a routable block: forced blocks are attended whatever the gate says, so they are
    not in the target. The target is ``block_mass`` on those slots renormalised; the gate's
    distribution is its softmax over the same slots. Query blocks without such a slot (or with
    no mass on them) are skipped. Returns the mean over the other query blocks; a zero that still
    depends on ``gate_logits`` when there is none.
    """
    acc = torch.promote_types(gate_logits.dtype, torch.float32)
    safe = block_indices.clamp_min(0)
    slots = block_indices >= 0
    if routable is not None:
        slots = slots & routable.gather(-1, safe)
    # _MASKED, not -inf: a query block without any slot gets a finite (unused) softmax, so no NaN
    # reaches the gradient through log_softmax's backward
    logits = gate_logits.gather(-1, safe).to(acc).masked_fill(~slots, _MASKED)
    log_q = torch.log_softmax(logits, dim=-1)
    mass = block_mass.to(acc).masked_fill(~slots, 0.0)
    total = mass.sum(-1, keepdim=True)
    target = mass / total.clamp_min(1e-30)
    rows = total.squeeze(-1) > 0
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_q), 0.0)
    kl = terms.sum(-1)
    return kl[rows].mean() if bool(rows.any()) else gate_logits.sum() * 0.0


def dynamic_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    gate: Optional[BlockGate] = None,
    *,
    block_size: int = 64,
    causal: bool = True,
    rule: str = "top_k",
    top_k: int = 4,
    top_p: float = 0.9,
    min_blocks: int = 1,
    max_blocks: Optional[int] = None,
    local_blocks: int = 0,
    sink_block: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_gate_loss: bool = False,
    warmup: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Selection, Optional[Tensor]]:
    """Dynamic Attention Routing, functional form: gate -> router -> block-sparse attention.

    ``query`` [B, Hq, Tq, D], ``key`` / ``value`` [B, Hkv, Tk, D|Dv] (the layout of
    ``scaled_dot_product_attention`` with grouped-query heads). ``gate`` is a
    :class:`BlockGate`; ``None`` scores with MoBA's parameter-free ``q̄ · k̄ / sqrt(D)``.
    The selection arguments are those of :func:`select_blocks`. ``warmup`` is DSA's dense
    warm-up: every visible block is attended (the dense result, exactly) and the gate loss
    covers every routable block, whatever the selection arguments say. ``backend`` is that of
    :func:`block_sparse_attention`.

    Returns ``(out [B, Hq, Tq, Dv], selection, gate_loss)``; ``gate_loss`` (see
    :func:`gate_distillation_loss`: over the selected routable blocks, under ``warmup`` all of
    them) only with ``return_gate_loss`` and a gate.
    """
    b, hq, hkv, tq, tk = _check_qkv(query, key, value)
    padding = _check_padding(key_padding_mask, b, tk, query.device)
    lay = block_layout(tq, tk, block_size)
    if gate is not None and (gate.num_kv_heads != hkv or gate.head_dim != query.shape[-1]):
        raise ShapeError(
            f"the gate is for {gate.num_kv_heads} kv heads of dim {gate.head_dim}, "
            f"the keys have {hkv} heads of dim {query.shape[-1]}"
        )
    with torch.no_grad():  # the gate's inputs are detached: its loss trains the gate only
        qp, kp, kvalid = pool_blocks(query.detach(), key.detach(), block_size, padding)
        if causal:
            # Route query block n by the pooled keys of block n - 1, not by its own queries: every
            # row of block n follows them (the block's mean query would let a row's selection
            # depend on later tokens) and they are in the KV cache, so one-token decoding routes
            # exactly as the full forward. Block 0 has no candidate to route.
            prev = (lay.first_block + torch.arange(lay.num_query_blocks, device=key.device) - 1).clamp_min(0)
            qp = kp.index_select(2, prev)
    if gate is None:
        logits = torch.matmul(qp, kp.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    else:
        logits = gate(qp, kp)
    idx = select_blocks(
        logits,
        lay,
        causal=causal,
        rule="top_k" if warmup else rule,
        top_k=lay.num_key_blocks if warmup else top_k,
        top_p=top_p,
        min_blocks=min_blocks,
        max_blocks=max_blocks,
        local_blocks=local_blocks,
        sink_block=sink_block,
        key_block_valid=kvalid,
    )
    want_loss = return_gate_loss and gate is not None
    out, _, mass = block_sparse_attention(
        query,
        key,
        value,
        idx,
        block_size=block_size,
        causal=causal,
        key_padding_mask=padding,
        scale=scale,
        return_block_mass=want_loss,
        backend=backend,
    )
    loss = None
    if want_loss and mass is not None:
        _, routable = routable_blocks(
            lay,
            b,
            hkv,
            causal=causal,
            local_blocks=local_blocks,
            sink_block=sink_block,
            key_block_valid=kvalid,
            device=query.device,
        )
        loss = gate_distillation_loss(logits, idx, mass, routable)
    return out, Selection(idx, logits), loss


def computed_fraction(
    selection: Selection, q_len: int, k_len: int, block_size: int, causal: bool = True
) -> float:
    """Share of the (query, key) pairs of dense attention that the selection computes.

    Dense means every key (every earlier-or-equal key when ``causal``) for every query; padding
    is ignored. Pairs are counted per key/value head (the group's query heads share them).
    """
    idx = selection.block_indices.cpu()
    lay = block_layout(q_len, k_len, block_size)
    bs = lay.block_size
    rows = idx.shape[0] * idx.shape[1]
    if q_len == 0 or rows == 0:
        return 0.0
    qpos = lay.first_block * bs + torch.arange(lay.num_query_blocks * bs)
    real = (_query_rows(lay, q_len, torch.device("cpu"))).view(1, -1, 1, bs)
    qpos = qpos.view(1, -1, 1, bs)
    start = (idx.clamp_min(0) * bs).view(rows, lay.num_query_blocks, -1, 1)
    end = (start + bs).clamp_max(k_len)
    if causal:
        per = (torch.minimum(qpos, end - 1) - start + 1).clamp_min(0).minimum(end - start)
    else:
        per = (end - start).expand(-1, -1, -1, bs)
    used = (idx >= 0).view(rows, lay.num_query_blocks, -1, 1)
    total = int((per * used * real).sum())
    positions = torch.arange(k_len - q_len, k_len)
    dense = int((positions + 1).sum()) if causal else q_len * k_len
    return total / (dense * rows)


def work_fraction(
    selection: Selection, q_len: int, k_len: int, block_size: int, causal: bool = True
) -> float:
    """Score products :func:`block_sparse_attention` computes, over the pairs of dense attention.

    The kernel computes whole blocks: every row of a query block (alignment rows included)
    against ``block_size`` keys per slot, as many slots as the query block's group needs (the
    most used slots over batch and heads), masked triangle and padding included. Dense is as in
    :func:`computed_fraction` (causal: only the pairs with key <= query). Per key/value head.
    """
    idx = selection.block_indices
    lay = block_layout(q_len, k_len, block_size)
    if q_len == 0 or idx.numel() == 0:
        return 0.0
    width = (idx >= 0).sum(-1).amax(dim=(0, 1)).clamp_min(1)  # [NQ]
    products = int(width.sum()) * lay.block_size * lay.block_size
    positions = torch.arange(k_len - q_len, k_len)
    dense = int((positions + 1).sum()) if causal else q_len * k_len
    return products / dense


class DynamicAttention(nn.Module):
    """Dynamic Attention Routing as a module: a :class:`BlockGate` + the router + block-sparse attention.

    A drop-in for ``scaled_dot_product_attention`` inside an attention layer: ``forward(query,
    key, value)`` with ``query`` [B, Hq, Tq, D] and ``key`` / ``value`` [B, Hkv, Tk, D]. After a
    forward in training mode, ``gate_loss`` holds the gate's distillation loss (add it to your
    loss, e.g. with weight 1: it only reaches the gate's parameters); ``last_selection`` holds
    the selection of the last forward. Reentrant gradient checkpointing runs the forward under
    ``no_grad`` and so produces no ``gate_loss`` (:func:`gate_losses` warns): use
    ``use_reentrant=False``.

    ``warmup`` (an attribute, also settable for a whole model with :func:`dense_warmup`) is
    DSA's dense warm-up: while True every visible block is attended, so the output is dense
    attention's, and ``gate_loss`` distils the attention mass over every routable block, also
    those the gate would never pick. Train the gates alone with it for a while before sparse
    training (:func:`gate_warmup`).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 64,
        causal: bool = True,
        rule: str = "top_k",
        top_k: int = 4,
        top_p: float = 0.9,
        min_blocks: int = 1,
        max_blocks: Optional[int] = None,
        local_blocks: int = 0,
        sink_block: bool = True,
        gate_dim: Optional[int] = None,
        warmup: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if backend not in _BACKENDS:
            raise InvalidValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise InvalidValueError(
                f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        try:
            block_size, top_k, min_blocks, local_blocks = (
                operator.index(x) for x in (block_size, top_k, min_blocks, local_blocks)
            )
            max_blocks = None if max_blocks is None else operator.index(max_blocks)
        except TypeError as e:
            raise InvalidValueError(f"block_size, top_k, min_blocks, max_blocks, local_blocks: {e}") from None
        if block_size < 1:
            raise InvalidValueError(f"block_size must be positive, got {block_size}")
        if rule not in RULES:
            raise InvalidValueError(f"rule must be one of {RULES}, got {rule!r}")
        if top_k < 0 or local_blocks < 0:
            raise InvalidValueError(f"top_k and local_blocks must be >= 0, got {top_k} and {local_blocks}")
        if rule == "top_p" and not 0.0 < top_p <= 1.0:
            raise InvalidValueError(f"top_p must be in (0, 1], got {top_p}")
        if min_blocks < 1 or (max_blocks is not None and max_blocks < min_blocks):
            raise InvalidValueError(
                f"need 1 <= min_blocks <= max_blocks, got min_blocks={min_blocks}, max_blocks={max_blocks}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.causal, self.rule = block_size, causal, rule
        self.top_k, self.top_p, self.min_blocks, self.max_blocks = top_k, top_p, min_blocks, max_blocks
        self.local_blocks, self.sink_block, self.warmup = local_blocks, sink_block, bool(warmup)
        self.backend = backend
        self.gate = BlockGate(num_kv_heads, head_dim, gate_dim, device=device, dtype=dtype)
        self.gate_loss: Optional[Tensor] = None
        self.last_selection: Optional[Selection] = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        scale: Optional[float] = None,
        causal: Optional[bool] = None,
    ) -> Tensor:
        """Attention output [B, Hq, Tq, Dv]; ``key_padding_mask`` [B, Tk] is True for keys to attend."""
        _check_qkv(query, key, value)
        if query.shape[1:2] != (self.num_heads,) or key.shape[1:2] != (self.num_kv_heads,):
            raise ShapeError(
                f"expected {self.num_heads} query and {self.num_kv_heads} key/value heads, got query "
                f"{tuple(query.shape)} and key {tuple(key.shape)}"
            )
        out, sel, loss = dynamic_attention(
            query,
            key,
            value,
            self.gate,
            block_size=self.block_size,
            causal=self.causal if causal is None else causal,
            rule=self.rule,
            top_k=self.top_k,
            top_p=self.top_p,
            min_blocks=self.min_blocks,
            max_blocks=self.max_blocks,
            local_blocks=self.local_blocks,
            sink_block=self.sink_block,
            key_padding_mask=key_padding_mask,
            scale=scale,
            return_gate_loss=self.training and torch.is_grad_enabled(),
            warmup=self.warmup,
            backend=self.backend,
        )
        self.gate_loss, self.last_selection = loss, sel
        return out

    def extra_repr(self) -> str:
        sel = (
            f"top_k={self.top_k}"
            if self.rule == "top_k"
            else (f"top_p={self.top_p}, min_blocks={self.min_blocks}, max_blocks={self.max_blocks}")
        )
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"block_size={self.block_size}, causal={self.causal}, rule={self.rule!r}, {sel}, "
            f"local_blocks={self.local_blocks}, sink_block={self.sink_block}, warmup={self.warmup}, "
            f"backend={self.backend!r}"
        )


@contextlib.contextmanager
def dense_warmup(model: nn.Module) -> Iterator[nn.Module]:
    """Run every :class:`DynamicAttention` in ``model`` in dense warm-up mode inside the block.

    ``with dense_warmup(model): train(...)`` attends every block (the dense result) and trains the
    gates by distillation over every routable block; each module's own ``warmup`` flag is
    restored on exit (for a warm-up that ends at a step count inside one loop, set
    ``module.warmup`` directly).
    """
    modules = [m for m in model.modules() if isinstance(m, DynamicAttention)]
    before = [m.warmup for m in modules]
    for m in modules:
        m.warmup = True
    try:
        yield model
    finally:
        for m, w in zip(modules, before):
            m.warmup = w


def gate_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The gate parameters of every :class:`DynamicAttention` in ``model`` (what DSA's warm-up trains)."""
    seen, params = set(), []
    for m in model.modules():
        if isinstance(m, DynamicAttention):
            for p in m.gate.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


@contextlib.contextmanager
def gate_warmup(model: nn.Module, dense: bool = True) -> Iterator[List[nn.Parameter]]:
    """DSA's warm-up of the gates on a converted model: only the gates train, every block attended.

    Inside the block every parameter of ``model`` but the gates' is frozen (``requires_grad``
    off, so no graph is built through the language model) and, with ``dense`` (the default),
    every :class:`DynamicAttention` runs in :func:`dense_warmup` mode. Yields
    :func:`gate_parameters`; train them on :func:`gate_losses` alone::

        with deepseek_rs.gate_warmup(model) as gates:
            opt = torch.optim.AdamW(gates, lr=1e-3)
            for batch in warmup_batches:
                model(batch)
                loss = deepseek_rs.gate_losses(model)
                opt.zero_grad(); loss.backward(); opt.step()
        # then train the whole model sparse on lm_loss + gate_losses(model)

    On exit the frozen parameters get ``requires_grad`` back and the ``warmup`` flags are
    restored. ``dense=False`` trains the gates alone in sparse mode (a control: the gate then
    learns only over the blocks it already picks).
    """
    gates = gate_parameters(model)
    ids = {id(p) for p in gates}
    frozen = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with dense_warmup(model) if dense else contextlib.nullcontext(model):
            yield gates
    finally:
        for p in frozen:
            p.requires_grad_(True)


def gate_losses(model: nn.Module) -> Tensor:
    """Sum of the ``gate_loss`` of every :class:`DynamicAttention` in ``model`` (0 if none is set).

    Warns (``RuntimeWarning``) when called with grad enabled while a module in training mode has
    no gate loss from its last forward: that forward ran without grad (reentrant gradient
    checkpointing does), so its gate would silently not be trained.
    """
    dars = [m for m in model.modules() if isinstance(m, DynamicAttention)]
    if torch.is_grad_enabled():
        missing = sum(m.training and m.last_selection is not None and m.gate_loss is None for m in dars)
        if missing:
            warnings.warn(
                f"{missing} of {len(dars)} DynamicAttention modules in training mode have no gate loss: "
                "their last forward ran without grad (reentrant gradient checkpointing?), so their gates "
                "are not trained; use use_reentrant=False",
                RuntimeWarning,
                stacklevel=2,
            )
    losses = [m.gate_loss for m in dars if m.gate_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()


__all__ = [
    "RULES",
    "BlockGate",
    "BlockLayout",
    "DynamicAttention",
    "Selection",
    "SparseAttentionOutput",
    "block_layout",
    "block_sparse_attention",
    "computed_fraction",
    "dense_warmup",
    "dynamic_attention",
    "gate_distillation_loss",
    "gate_losses",
    "gate_parameters",
    "gate_warmup",
    "pool_blocks",
    "routable_blocks",
    "select_blocks",
    "work_fraction",
]
