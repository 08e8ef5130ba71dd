"""The reference model: a small Qwen3-MoE causal LM in transformers form, its MoE blocks run by
:class:`~deepseek_rs.PEAMoE` through :func:`~deepseek_rs.patch`.

The checkpoint is a plain ``save_pretrained`` directory of ``Qwen3MoeForCausalLM`` (patching
keeps every parameter's name and shape), so ``AutoModelForCausalLM.from_pretrained`` loads it
without deepseek_rs; :func:`load` loads it and patches it again, with the routing asked for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch
from torch import Tensor, nn

from ..moe import PEAMoE, RoutingConfig, patch


@dataclass(frozen=True)
class ModelSize:
    """The shape of a reference model (fields of ``Qwen3MoeConfig`` under shorter names)."""

    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 8
    moe_intermediate_size: int = 256
    top_k: int = 2
    context: int = 512

    def replace(self, **fields: Any) -> ModelSize:
        return dataclasses.replace(self, **fields)


#: The reference size, scaled to train on 2 CPU cores: 3.87M parameters with a 4096-token
#: vocabulary (1.51M used per token with top-2 of 8 experts), context 256.
REFERENCE = ModelSize(
    hidden_size=128,
    layers=4,
    heads=4,
    kv_heads=2,
    head_dim=32,
    num_experts=8,
    moe_intermediate_size=256,
    top_k=2,
    context=256,
)
#: Nearer the size issue 16 asks for (8.14M parameters with a 4096-token vocabulary, context
#: 512): for a machine with more cores.
ISSUE = ModelSize()
#: A size for tests: trains in seconds.
TINY = ModelSize(
    hidden_size=32,
    layers=2,
    heads=2,
    kv_heads=1,
    head_dim=16,
    num_experts=4,
    moe_intermediate_size=32,
    context=64,
)
SIZES = {"reference": REFERENCE, "issue": ISSUE, "tiny": TINY}


def hf_config(size: ModelSize, vocab_size: int, eos_token_id: int = 0) -> Any:
    """The ``Qwen3MoeConfig`` of ``size``: every layer MoE, no shared expert, tied embeddings,
    softmax top-k with renormalised weights, no attention dropout or sliding window."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.moe_intermediate_size,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.context,
        num_experts=size.num_experts,
        num_experts_per_tok=size.top_k,
        moe_intermediate_size=size.moe_intermediate_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        tie_word_embeddings=True,
        use_cache=False,
        attention_dropout=0.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    config.head_dim = size.head_dim  # read by the attention layers; not in the signature
    return config


def routing_fields(router: Union[RoutingConfig, str, None], **fields: Any) -> Dict[str, Any]:
    """``patch``'s routing arguments: ``None`` keeps the config's top-k."""
    return dict(fields, **({"router": router} if router is not None else {}))


#: The expert FFN backend of the reference model's PEAMoE blocks: the Rust kernels, bitwise the
#: same whatever the thread count ("auto" would pick by timing, so two runs could differ).
EXPERTS_BACKEND = "rust"


def set_experts_backend(model: nn.Module, backend: str = EXPERTS_BACKEND) -> nn.Module:
    for m in moe_layers(model):
        m.experts.backend = backend
    return model


def build(
    size: ModelSize,
    vocab_size: int,
    seed: int,
    router: Union[RoutingConfig, str, None] = None,
    eos_token_id: int = 0,
    **routing: Any,
) -> nn.Module:
    """A freshly initialised reference model (seeded), its MoE blocks patched to PEAMoE (on the
    ``EXPERTS_BACKEND`` backend)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        hf_config(size, vocab_size, eos_token_id), attn_implementation="sdpa"
    )
    return set_experts_backend(patch(model, **routing_fields(router, **routing)))


def load(path: Union[str, Path], router: Union[RoutingConfig, str, None] = None, **routing: Any) -> nn.Module:
    """A saved reference model, patched to PEAMoE with the routing asked for (eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa")
    return set_experts_backend(patch(model, **routing_fields(router, **routing))).eval()


def moe_layers(model: nn.Module) -> List[PEAMoE]:
    return [m for m in model.modules() if isinstance(m, PEAMoE)]


def set_routing(model: nn.Module, config: RoutingConfig) -> None:
    """Route every PEAMoE of ``model`` by ``config``."""
    for m in moe_layers(model):
        m.gate.config = config.check(m.num_experts)


def routing_of(model: nn.Module) -> RoutingConfig:
    return moe_layers(model)[0].gate.config


def aux_loss(model: nn.Module, load_balancing: float, z_loss: float, entropy: float) -> Tensor:
    """The weighted sum over the PEAMoE blocks of their last training forward's aux losses."""
    total: Optional[Tensor] = None
    for m in moe_layers(model):
        a = m.aux_losses
        if a is None:
            continue
        term = load_balancing * a.load_balancing + z_loss * a.z_loss + entropy * a.entropy
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def experts_per_token(model: nn.Module) -> float:
    """Mean experts per token over the MoE blocks' last forward."""
    counts = [
        m.last_routing.experts_per_token.double().mean().item()
        for m in moe_layers(model)
        if m.last_routing is not None
    ]
    return sum(counts) / len(counts) if counts else float("nan")


def parameter_counts(model: nn.Module) -> Dict[str, int]:
    """Total parameters, and those a token uses (embeddings once, ``k`` of the experts)."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    experts = sum(p.numel() for m in moe_layers(model) for p in m.experts.parameters())
    e = moe_layers(model)[0].num_experts if moe_layers(model) else 1
    k = routing_of(model).top_k if moe_layers(model) else 1
    return {"total": total, "experts": experts, "active_top_k": total - experts + experts * k // e}


def windows(tokens: Tensor, context: int) -> Iterator[Tensor]:
    """Consecutive non-overlapping windows of ``context + 1`` tokens (inputs and targets)."""
    n = (tokens.numel() - 1) // context
    for i in range(n):
        yield tokens[i * context : i * context + context + 1]


__all__ = [
    "EXPERTS_BACKEND",
    "ISSUE",
    "REFERENCE",
    "SIZES",
    "TINY",
    "ModelSize",
    "aux_loss",
    "build",
    "experts_per_token",
    "hf_config",
    "load",
    "moe_layers",
    "parameter_counts",
    "routing_of",
    "set_experts_backend",
    "set_routing",
    "windows",
]
