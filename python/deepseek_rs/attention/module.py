"""Dynamic Attention Routing (DAR): block-sparse attention whose key blocks a learnable gate chooses.

:func:`dynamic_attention` runs the whole of it: the blocks are mean-pooled and scored by the
:class:`~.gate.BlockGate` (under causal attention query block n is routed by the pooled keys of
block n - 1), the router selects key blocks (:func:`~.selection.select_blocks`), attention runs
over them only (:func:`~.sparse.block_sparse_attention`) and, in training, the gate gets its
distillation loss (:func:`~.gate.gate_distillation_loss`). :class:`DynamicAttention` is the same
as a module, a drop-in for ``scaled_dot_product_attention``; :func:`computed_fraction` and
:func:`work_fraction` count the attention a selection computes against dense attention.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import InvalidValueError, ShapeError
from .gate import BlockGate, gate_distillation_loss
from .layout import block_layout, check_padding, check_qkv, real_query_rows
from .selection import RULES, Selection, pool_blocks, routable_blocks, select_blocks
from .sparse import BACKENDS, block_sparse_attention


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
    b, hq, hkv, tq, tk = check_qkv(query, key, value)
    padding = check_padding(key_padding_mask, b, tk, query.device)
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
    real = (real_query_rows(lay, q_len, torch.device("cpu"))).view(1, -1, 1, bs)
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
    ``no_grad`` and so produces no ``gate_loss`` (:func:`~.training.gate_losses` warns): use
    ``use_reentrant=False``.

    ``warmup`` (an attribute, also settable for a whole model with :func:`~.training.dense_warmup`) is
    DSA's dense warm-up: while True every visible block is attended, so the output is dense
    attention's, and ``gate_loss`` distils the attention mass over every routable block, also
    those the gate would never pick. Train the gates alone with it for a while before sparse
    training (:func:`~.training.gate_warmup`).
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
        if backend not in BACKENDS:
            raise InvalidValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        check_qkv(query, key, value)
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


__all__ = ["DynamicAttention", "computed_fraction", "dynamic_attention", "work_fraction"]
