"""The gate of Dynamic Attention Routing, :class:`BlockGate`, and the loss that trains it.

The gate (:class:`BlockGate`) follows MoBA and NSA's selection branch: mean-pooled block keys
scored against a pooled query through learnable projections initialised to the identity, so a
converted pretrained model starts with MoBA's parameter-free scoring. Under causal attention
the "query" of block n is the mean-pooled keys of block n - 1: every row of block n comes after
them and they sit in the KV cache, so no row's selection depends on a later token and
one-token decoding routes exactly as the full forward (the block's own mean query would leak
later tokens into earlier rows' selections). Bidirectional attention uses the block's mean
query.

The gate is trained by distillation, as DeepSeek Sparse Attention (DSA) trains its lightning
indexer: after a training forward, :attr:`.DynamicAttention.gate_loss` holds the KL divergence
from the attention mass that the query block actually put on each key block (detached) to the
gate's softmax over the same blocks. The KL runs over routable blocks only
(:func:`~.selection.routable_blocks`): the forced ones (own, local, sink) are attended whatever the gate
says, and in the target they would take most of the mass and teach the gate nothing. Two phases,
as in DSA: under the dense warm-up (``warmup=True`` or :func:`~.training.dense_warmup`) every visible
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

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import InvalidValueError
from .layout import MASKED


class BlockGate(nn.Module):
    """The learnable gate: ``(q̄ W_q) · (k̄ W_k) / sqrt(gate_dim)`` per key/value head.

    ``k̄`` are the mean-pooled block keys of :func:`~.selection.pool_blocks`, ``q̄`` the query
    block's pooled query (under causal attention the previous block's pooled keys, see the module
    docstring). ``W_q`` and ``W_k`` [Hkv, D, gate_dim] start as the identity (its first
    ``gate_dim`` columns), i.e. as MoBA's gate ``q̄ · k̄``, scaled.
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
    from :func:`~.sparse.block_sparse_attention`; ``routable`` [B, Hkv, NQ, NK] bool, the blocks the gate
    chooses among (:func:`~.selection.routable_blocks`; None = every block). The KL runs over the used slots
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
    # MASKED, not -inf: a query block without any slot gets a finite (unused) softmax, so no NaN
    # reaches the gradient through log_softmax's backward
    logits = gate_logits.gather(-1, safe).to(acc).masked_fill(~slots, MASKED)
    log_q = torch.log_softmax(logits, dim=-1)
    mass = block_mass.to(acc).masked_fill(~slots, 0.0)
    total = mass.sum(-1, keepdim=True)
    target = mass / total.clamp_min(1e-30)
    rows = total.squeeze(-1) > 0
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_q), 0.0)
    kl = terms.sum(-1)
    return kl[rows].mean() if bool(rows.any()) else gate_logits.sum() * 0.0


__all__ = ["BlockGate", "gate_distillation_loss"]
