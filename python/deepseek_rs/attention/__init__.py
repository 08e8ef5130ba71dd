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

from .gate import BlockGate, gate_distillation_loss
from .hf import patch_attention
from .layout import BlockLayout, SparseAttentionOutput, block_layout
from .module import DynamicAttention, computed_fraction, dynamic_attention, work_fraction
from .selection import RULES, Selection, pool_blocks, routable_blocks, select_blocks
from .sparse import block_sparse_attention
from .training import dense_warmup, gate_losses, gate_parameters, gate_warmup

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
    "patch_attention",
    "pool_blocks",
    "routable_blocks",
    "select_blocks",
    "work_fraction",
]
