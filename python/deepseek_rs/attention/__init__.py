"""Dynamic Attention Routing (DAR): attention whose range a learnable gate chooses per query block.

* :mod:`.module`: block layout, block selection, the gather path of block-sparse attention, the
  gate and its losses, :class:`DynamicAttention`;
* :mod:`.flex`: the same block-sparse attention through PyTorch FlexAttention;
* :mod:`.hf`: :func:`patch_attention`, which converts the attention of Hugging Face models.
"""

from .hf import patch_attention
from .module import (
    BlockGate,
    DynamicAttention,
    block_sparse_attention,
    dense_warmup,
    dynamic_attention,
    gate_losses,
    gate_parameters,
    gate_warmup,
)

__all__ = [
    "BlockGate",
    "DynamicAttention",
    "block_sparse_attention",
    "dense_warmup",
    "dynamic_attention",
    "gate_losses",
    "gate_parameters",
    "gate_warmup",
    "patch_attention",
]
