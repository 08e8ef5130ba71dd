"""The block layout of Dynamic Attention Routing and what the stages over it share.

The sequence is cut into blocks of ``block_size`` tokens, and the queries are the last keys' positions
(a KV cache): :class:`BlockLayout` says which key block each query block is. Here too the input
checks, the block helpers that both paths of block-sparse attention (gather and FlexAttention) use,
and their common result, :class:`SparseAttentionOutput`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import DeviceError, DTypeError, InvalidValueError, ShapeError

MASKED = -1e30  # a finite "minus infinity": the router refuses -inf, and masked rows stay finite
CHUNK_ELEMENTS = 1 << 23  # score entries per chunk of query blocks (32 MiB in float32)


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


class SparseAttentionOutput(NamedTuple):
    """What :func:`block_sparse_attention` returns."""

    out: Tensor  # [B, Hq, Tq, Dv]
    lse: Optional[Tensor]  # [B, Hq, Tq] log-sum-exp of the scaled scores, -inf where no key is seen
    block_mass: Optional[Tensor]  # [B, Hkv, NQ, S] attention probability per selected block, no grad


def check_qkv(query: Tensor, key: Tensor, value: Tensor) -> Tuple[int, int, int, int, int]:
    """Check ``query`` [B, Hq, Tq, D], ``key`` [B, Hkv, Tk, D], ``value`` [B, Hkv, Tk, Dv] (one
    floating dtype, one device, Hq a multiple of Hkv); returns ``(B, Hq, Hkv, Tq, Tk)``."""
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


def check_padding(mask: Optional[Tensor], b: int, tk: int, device: torch.device) -> Optional[Tensor]:
    """The key padding mask [B, Tk] checked and as bool (True = attend; None stays None)."""
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


def check_block_indices(block_indices: Tensor, b: int, hkv: int, lay: BlockLayout, device) -> None:
    """Check ``block_indices`` [B, Hkv, NQ, S] int64 (key block ids, ``-1`` = unused slot, no
    block twice for one query block).
    Syncs with the device (min, max, duplicates): the attention entry checks once."""
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


def split_blocks(x: Tensor, lay: BlockLayout) -> Tensor:
    """[B, H, Tk, D] -> [B, H, NK, bs, D], zero-padded at the end."""
    b, h, t, d = x.shape
    pad = lay.num_key_blocks * lay.block_size - t
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(b, h, lay.num_key_blocks, lay.block_size, d)


def key_valid(lay: BlockLayout, b: int, tk: int, padding: Optional[Tensor], device) -> Tensor:
    """[B, NK * bs] bool: a real (not padding, not past the end) key."""
    n = lay.num_key_blocks * lay.block_size
    valid = (torch.arange(n, device=device) < tk).expand(b, n)
    if padding is not None:
        valid = valid & nn.functional.pad(padding, (0, n - tk), value=False)
    return valid


def real_query_rows(lay: BlockLayout, tq: int, device) -> Tensor:
    """[NQ, bs] bool: a real query row (not alignment padding)."""
    r = torch.arange(lay.num_query_blocks * lay.block_size, device=device) - lay.front
    return ((r >= 0) & (r < tq)).view(lay.num_query_blocks, lay.block_size)


def unpadded_query_rows(lay: BlockLayout, tq: int, padding: Optional[Tensor], device) -> Tensor:
    """[B or 1, NQ, bs] bool: a query row that is neither alignment padding nor padding in the key
    padding mask (the queries are the last ``tq`` keys). Padded rows still attend, but their
    attention is no signal: the gate's distillation target leaves them out."""
    rows = real_query_rows(lay, tq, device).unsqueeze(0)
    if padding is None:
        return rows
    nq, bs = lay.num_query_blocks, lay.block_size
    tk = padding.shape[1]
    real = nn.functional.pad(padding[:, tk - tq :], (lay.front, nq * bs - lay.front - tq), value=False)
    return rows & real.view(padding.shape[0], nq, bs)


__all__ = [
    "CHUNK_ELEMENTS",
    "MASKED",
    "BlockLayout",
    "SparseAttentionOutput",
    "block_layout",
    "check_block_indices",
    "check_padding",
    "check_qkv",
    "key_valid",
    "real_query_rows",
    "split_blocks",
    "unpadded_query_rows",
]
