"""Dynamic Attention Routing (DAR): attention whose range a learnable gate chooses per query block.

The modules, in data-flow order (each imports only those above it):

* :mod:`.layout`: the block layout, input checks and the block helpers the stages share;
* :mod:`.selection`: pooled blocks, the forced and routable blocks, the router's selection;
* :mod:`.gate`: :class:`BlockGate` and its distillation loss;
* :mod:`.gather` and :mod:`.flex`: the two paths of block-sparse attention, by gathering the
  selected K/V blocks and through PyTorch FlexAttention (neither knows the other);
* :mod:`.sparse`: :func:`block_sparse_attention`, which picks the path;
* :mod:`.module`: :func:`dynamic_attention` and :class:`DynamicAttention` (gate, router,
  block-sparse attention) and the work accounting;
* :mod:`.training`: :func:`gate_losses` and DSA's warm-up of the gates;
* :mod:`.hf`: :func:`patch_attention`, which converts the attention of Hugging Face models.
"""

from .gate import BlockGate
from .hf import patch_attention
from .module import DynamicAttention, dynamic_attention
from .sparse import block_sparse_attention
from .training import dense_warmup, gate_losses, gate_parameters, gate_warmup

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
