"""Block-sparse attention, the entry: checks the inputs once, picks the backend, runs its path.

The two paths compute the same thing and do not know each other: :mod:`.gather` gathers the
selected K/V blocks (torch, any device), :mod:`.flex` runs FlexAttention with a block mask of
the selection.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import DeviceError, InvalidValueError
from .flex import flex_unavailable_reason, run_flex
from .gather import run_gather
from .layout import SparseAttentionOutput, block_layout, check_block_indices, check_qkv

BACKENDS = ("auto", "gather", "flex")  # see block_sparse_attention


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
    from :func:`~deepseek_rs.attention.selection.select_blocks` (any order; ``-1`` = unused
    slot). ``key_padding_mask`` [B, Tk] is True for keys to attend. Scores and softmax are in
    float32 (float64 for float64 input).

    Returns :class:`SparseAttentionOutput`: the output (0 for a query row that sees no key),
    and on request the log-sum-exp of each row's scaled scores (float, ``-inf`` where the row
    sees no key) and ``block_mass``: the attention probability each selected block received,
    averaged over the group's heads and the block's real query rows (rows that are padding in
    ``key_padding_mask`` excluded: the gate's distillation target).

    ``backend``: ``"gather"`` gathers the selected K/V blocks and runs dense attention over them
    (:mod:`deepseek_rs.attention.gather`: torch, any device); ``"flex"`` runs FlexAttention with
    a block mask of the selection (:mod:`deepseek_rs.attention.flex`; compiled on CUDA; forward
    only on the CPU); ``"auto"`` takes ``"flex"`` on CUDA when it can run there, else ``"gather"``.
    """
    b, _, hkv, tq, tk = check_qkv(query, key, value)
    lay = block_layout(tq, tk, block_size)
    check_block_indices(block_indices, b, hkv, lay, query.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    kwargs = dict(
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        return_lse=return_lse,
        return_block_mass=return_block_mass,
    )
    if resolve_backend(backend, query.device, block_size, query.shape[-1], value.shape[-1], grad) == "flex":
        return run_flex(query, key, value, block_indices, lay, compile=None, **kwargs)
    return run_gather(query, key, value, block_indices, lay, **kwargs)


__all__ = ["BACKENDS", "block_sparse_attention", "resolve_backend"]
