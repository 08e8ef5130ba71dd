"""Convert the attention of a Hugging Face transformers (>= 5) model to Dynamic Attention Routing, in place.

Supported attention layers (matched by exact class, from
``transformers.models.<name>.modeling_<name>``): ``LlamaAttention``, ``Qwen2Attention`` and
``Qwen3Attention`` (Qwen3's q/k norms run before the attention function, so nothing changes for
them). Each gets a :class:`~deepseek_rs.DynamicAttention` as the submodule ``dynamic_attention``
(its gate is the only new parameter), and the model's attention implementation becomes
``"deepseek_rs_dar"``: a function registered in transformers' ``AttentionInterface`` that runs
the layer's ``DynamicAttention`` on the projected, rotated queries and keys, with a matching
entry in ``AttentionMaskInterface`` that hands it the 2-D key padding mask.

The projections, rotary embeddings and KV cache are the model's own, so ``generate`` works and
with every block selected (``top_k`` >= the number of blocks) the model computes what it did
before. Fine-tune as usual and add :func:`~deepseek_rs.attention.gate_losses` of the model to
the loss to train the gates, after DSA's warm-up of the gates alone, every block attended and
the rest of the model frozen (:func:`~deepseek_rs.attention.gate_warmup`). Sliding-window layers
and attention dropout are refused.
"""

from __future__ import annotations

import importlib
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import InvalidValueError, ShapeError
from .module import DynamicAttention

ATTN_IMPLEMENTATION = "deepseek_rs_dar"
_CLASSES = (("llama", "LlamaAttention"), ("qwen2", "Qwen2Attention"), ("qwen3", "Qwen3Attention"))


def _supported() -> Tuple[type, ...]:
    found = []
    for module, cls in _CLASSES:
        try:
            mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        except ImportError:
            continue
        if hasattr(mod, cls):
            found.append(getattr(mod, cls))
    return tuple(found)


def _key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Optional[Tensor] = None,
    **kwargs: Any,
) -> Optional[Tensor]:
    """The mask transformers builds for us: the 2-D key padding mask [B, kv_length] (True = attend)."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if mask.shape[1] == kv_length and bool(mask.all()) else mask


def _dar_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    **kwargs: Any,
) -> Tuple[Tensor, None]:
    """transformers attention function: [B, H, T, D] in, [B, T, H, D] out (no attention weights)."""
    dar = getattr(module, "dynamic_attention", None)
    if not isinstance(dar, DynamicAttention):
        raise InvalidValueError(
            f"{type(module).__name__} has no DynamicAttention; convert the model with "
            "deepseek_rs.patch_attention"
        )
    if dropout:
        raise InvalidValueError(f"Dynamic Attention Routing has no attention dropout (got {dropout})")
    if sliding_window is not None:
        raise InvalidValueError("Dynamic Attention Routing does not combine with a sliding window")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[1] != key.shape[2]):
        raise ShapeError(
            f"expected a [batch, {key.shape[2]}] key padding mask from transformers, got "
            f"{tuple(attention_mask.shape)} (a static cache or a custom 4-D mask is not supported)"
        )
    out = dar(
        query, key, value, key_padding_mask=attention_mask, scale=scaling, causal=bool(module.is_causal)
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _dar_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _key_padding_mask)


def patch_attention(model: nn.Module, **dar_kwargs: Any) -> nn.Module:
    """Give every supported attention layer of ``model`` a :class:`DynamicAttention`; returns ``model``.

    ``dar_kwargs`` go to each ``DynamicAttention`` (``block_size``, ``rule``, ``top_k``,
    ``top_p``, ``min_blocks``, ``max_blocks``, ``local_blocks``, ``sink_block``, ``gate_dim``,
    ``warmup``, ...). Then DSA's recipe: first train the new gates alone, densely, on
    ``gate_losses(model)`` inside ``with deepseek_rs.gate_warmup(model) as gates:`` (an optimizer
    over ``gates``), then the whole model sparse on its loss plus ``gate_losses(model)``.
    Raises :class:`InvalidValueError` when the model has no supported layer or a layer uses a
    sliding window or attention dropout; then nothing is changed.
    """
    classes = _supported()
    layers: List[nn.Module] = [m for m in model.modules() if type(m) in classes]
    if not layers:
        names = ", ".join(cls for _, cls in _CLASSES)
        raise InvalidValueError(f"{type(model).__name__} contains no supported attention layer ({names})")
    config: Any = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise InvalidValueError("patch_attention needs a transformers PreTrainedModel (with a config)")
    built = []
    for layer in layers:
        if getattr(layer, "sliding_window", None) is not None:
            raise InvalidValueError(f"{type(layer).__name__} {layer.layer_idx} uses a sliding window")
        if getattr(layer, "attention_dropout", 0.0):
            raise InvalidValueError(
                f"{type(layer).__name__} has attention_dropout={layer.attention_dropout}; set it to 0"
            )
        c = layer.config
        weight = layer.q_proj.weight
        built.append(
            DynamicAttention(
                c.num_attention_heads,
                c.num_key_value_heads,
                layer.head_dim,
                causal=bool(layer.is_causal),
                device=weight.device,
                dtype=weight.dtype,
                **dar_kwargs,
            ).train(layer.training)
        )
    _register()
    for layer, dar in zip(layers, built):
        layer.dynamic_attention = dar
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


__all__ = ["ATTN_IMPLEMENTATION", "patch_attention"]
