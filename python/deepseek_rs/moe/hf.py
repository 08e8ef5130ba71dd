"""Swap the MoE blocks of a Hugging Face transformers (>= 5) model for :class:`PEAMoE`, in place.

Supported blocks (matched by exact class, from ``transformers.models.<name>.modeling_<name>``):

* ``MixtralSparseMoeBlock``: softmax top-k, always renormalised. Its router jitter noise is
  not reproduced, so a block with ``jitter_noise > 0`` is refused;
* ``Qwen2MoeSparseMoeBlock``: softmax top-k, renormalised iff ``norm_topk_prob``, plus the
  shared expert scaled by ``sigmoid(shared_expert_gate(x))``;
* ``Qwen3MoeSparseMoeBlock``: softmax top-k, renormalised iff ``norm_topk_prob``;
* ``DeepseekV3MoE``: the ``"group_limited"`` rule (sigmoid scores, ``e_score_correction_bias``,
  ``n_group`` / ``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``) plus the
  always-on shared experts.

The replacement reuses the block's own parameters and buffers (the same tensor objects, so
optimisers, tied weights and ``state_dict`` keys are unaffected) and computes the same
function: only SiLU experts without biases are accepted. The patched model runs on the CPU (Rust
kernels) or on CUDA in float16 / bfloat16 (the CUDA kernels, not yet run on a GPU).

Hugging Face's router outputs are gone after patching, so the load-balancing loss of
``output_router_logits`` is replaced by the ``aux_losses`` that each ``PEAMoE`` keeps after a
training forward (see :class:`PEAMoE`); add them to the loss yourself. ``patch`` turns
``config.output_router_logits`` off (with a warning); passing ``output_router_logits=True`` to
the patched model's forward fails inside transformers.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from torch import nn

from ..errors import InvalidValueError
from .layer import PEAMoE


class _Spec(NamedTuple):
    module: str  # transformers.models.<module>.modeling_<module>
    cls: str
    router: Callable[[Any], Dict[str, Any]]  # the block -> PEAMoE's router arguments
    shared: Optional[str] = None  # attribute name of the shared expert
    shared_gate: bool = False  # the shared expert is scaled by sigmoid(shared_expert_gate(x))


def _mixtral(block: Any) -> Dict[str, Any]:
    if block.jitter_noise > 0:
        raise InvalidValueError(
            f"MixtralSparseMoeBlock has router jitter_noise={block.jitter_noise}, which PEAMoE does not "
            "reproduce; set config.router_jitter_noise = 0 (or block.jitter_noise = 0) before patching"
        )
    return dict(router="top_k", top_k=block.gate.top_k, renormalize=True)


def _qwen(block: Any) -> Dict[str, Any]:
    return dict(router="top_k", top_k=block.gate.top_k, renormalize=bool(block.gate.norm_topk_prob))


def _deepseek_v3(block: Any) -> Dict[str, Any]:
    g = block.gate
    return dict(
        router="group_limited",
        top_k=g.top_k,
        renormalize=bool(g.norm_topk_prob),
        n_group=g.num_group,
        topk_group=g.topk_group,
        routed_scaling_factor=float(g.routed_scaling_factor),
    )


_SPECS = (
    _Spec("mixtral", "MixtralSparseMoeBlock", _mixtral),
    _Spec("qwen2_moe", "Qwen2MoeSparseMoeBlock", _qwen, shared="shared_expert", shared_gate=True),
    _Spec("qwen3_moe", "Qwen3MoeSparseMoeBlock", _qwen),
    _Spec("deepseek_v3", "DeepseekV3MoE", _deepseek_v3, shared="shared_experts"),
)


def _supported() -> Dict[type, _Spec]:
    """The block classes of the installed transformers, by class."""
    found = {}
    for spec in _SPECS:
        try:
            mod = importlib.import_module(f"transformers.models.{spec.module}.modeling_{spec.module}")
        except ImportError:
            continue
        cls = getattr(mod, spec.cls, None)
        if cls is not None:
            found[cls] = spec
    return found


def _silu_classes() -> Tuple[type, ...]:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return (nn.SiLU,)
    return (nn.SiLU, SiLUActivation)


def _replacement(block: Any, spec: _Spec) -> PEAMoE:
    """A PEAMoE computing ``block``'s function with ``block``'s own tensors."""
    name = type(block).__name__
    silu = _silu_classes()
    for path, m in block.named_modules():
        act = getattr(m, "act_fn", None)
        if act is not None and not isinstance(act, silu):
            raise InvalidValueError(
                f"{name}.{path or 'act_fn'} uses the activation {type(act).__name__}; PEAMoE only "
                "implements SiLU (SwiGLU) experts (config.hidden_act 'silu' or 'swish')"
            )
    e, two_f, h = block.experts.gate_up_proj.shape
    shared = getattr(block, spec.shared) if spec.shared else None
    new = PEAMoE(
        h,
        two_f // 2,
        e,
        **spec.router(block),
        shared_intermediate_size=shared.gate_proj.out_features if shared is not None else 0,
        shared_expert_gate=spec.shared_gate,
        shared_experts_name=spec.shared or "shared_experts",
        device="meta",
        dtype=block.experts.gate_up_proj.dtype,
    )
    # Same keys and shapes, or PEAMoE would not compute the same function (an expert bias, say).
    old_sd, new_sd = block.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    if old_sd.keys() != new_sd.keys():
        raise InvalidValueError(
            f"cannot patch {name}: PEAMoE has no place for {sorted(old_sd.keys() - new_sd.keys())} "
            f"and needs {sorted(new_sd.keys() - old_sd.keys())}"
        )
    for key, t in old_sd.items():
        if t.shape != new_sd[key].shape:
            raise InvalidValueError(
                f"cannot patch {name}: {key} has shape {tuple(t.shape)}, "
                f"PEAMoE expects {tuple(new_sd[key].shape)}"
            )
    for key, t in old_sd.items():  # a Parameter stays a Parameter, a buffer a buffer: the same objects
        owner, _, attr = key.rpartition(".")
        setattr(new.get_submodule(owner), attr, t)
    return new.train(block.training)


def patch(model: nn.Module) -> nn.Module:
    """Replace every supported MoE block of ``model`` by an equivalent :class:`PEAMoE`, in place.

    Returns ``model``, or the replacement when ``model`` is itself a supported block. See the
    module docstring for the supported blocks; Hugging Face's ``output_router_logits``
    load-balancing loss is replaced by each PEAMoE's ``aux_losses``. Raises
    :class:`InvalidValueError` if ``model`` has no supported block or a block cannot be
    reproduced (non-SiLU activation, biases, Mixtral jitter noise); then nothing is replaced.
    """
    supported = _supported()
    spec = supported.get(type(model))
    if spec is not None:
        return _replacement(model, spec)
    # Build every replacement before swapping any, so that an error leaves the model untouched.
    swaps: List[Tuple[nn.Module, str, PEAMoE]] = []
    built: Dict[int, PEAMoE] = {}  # a block reachable by several paths gets one replacement
    for path, module in model.named_modules(remove_duplicate=False):
        spec = supported.get(type(module))
        if spec is not None:
            if id(module) not in built:
                built[id(module)] = _replacement(module, spec)
            parent, _, attr = path.rpartition(".")
            swaps.append((model.get_submodule(parent), attr, built[id(module)]))
    if not swaps:
        names = ", ".join(s.cls for s in _SPECS)
        raise InvalidValueError(f"{type(model).__name__} contains no supported MoE block ({names})")
    for parent, attr, new in swaps:
        setattr(parent, attr, new)
    config: Any = getattr(model, "config", None)
    if getattr(config, "output_router_logits", False):
        config.output_router_logits = False
        warnings.warn(
            "deepseek_rs.patch set config.output_router_logits = False: the patched blocks do not expose "
            "Hugging Face router logits; add the PEAMoE blocks' aux_losses to the loss instead",
            stacklevel=2,
        )
    return model


__all__ = ["patch"]
