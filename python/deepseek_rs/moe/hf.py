"""Swap the MoE blocks of a Hugging Face transformers (>= 5) model for :class:`PEAMoE`, in place.

Blocks are found through transformers' experts interface, not by a list of families: a block is
a module whose ``experts`` child is an experts module of ``ExpertsInterface`` (see
:mod:`.hf_experts`), next to a linear router ``gate`` or ``router`` (a weight [E, H]) and
optionally a SwiGLU shared expert (``shared_experts``, ``shared_expert`` or ``shared_mlp``,
with ``gate_proj`` / ``up_proj`` / ``down_proj``) and a ``shared_expert_gate`` scaling it by
``sigmoid(shared_expert_gate(x))``. Its routing is read from the router's attributes:

* a router with an ``e_score_correction_bias`` buffer is DeepSeek-V3's ``"group_limited"``
  rule (sigmoid scores, selection bias, ``num_group`` / ``topk_group`` (1 if absent),
  ``norm_topk_prob``, ``routed_scaling_factor``): DeepSeek-V3, GLM-4-MoE, dots1, Solar-Open,
  EXAONE-MoE, ...;
* otherwise softmax ``"top_k"`` with ``top_k``, ``routed_scaling_factor`` and
  renormalisation from ``norm_topk_prob`` (both tried where the router has no such field):
  Mixtral, MiniMax, Qwen2/3-MoE, Qwen3-Next, OLMoE, DeepSeek-V2, Granite-MoE, Jamba, Aria, ...

and then checked: the replacement must hold exactly the block's parameters and buffers (no
bias, no extra norm), and compute the block's function on a random probe input (the
parameters being the same objects, this is the test that the math is the same; a router that
is not plain softmax or sigmoid top-k, such as Ernie-4.5's or PhiMoE's, fails it). The experts
must be SwiGLU (``silu(gate) * up``), as :func:`.hf_experts.unsupported_reason` decides.

The replacement reuses the block's own parameters and buffers (the same tensor objects, so
optimisers, tied weights and ``state_dict`` keys are unaffected; a router named ``router`` keeps
that name). The patched model runs on the CPU (Rust kernels) or on CUDA in float16 / bfloat16.
``patch(model, router="top_p", top_p=0.5)`` then sets the routing of every replacement (the
fields of :class:`RoutingConfig`): progressive expert activation on a pretrained model.

Hugging Face's router outputs are gone after patching, so the load-balancing loss of
``output_router_logits`` is replaced by the ``aux_losses`` that each ``PEAMoE`` keeps after a
training forward (see :class:`PEAMoE`); add them to the loss yourself. ``patch`` turns
``config.output_router_logits`` off (with a warning); passing ``output_router_logits=True`` to
the patched model's forward fails inside transformers. Patching an already patched model
changes nothing and warns so.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import InvalidValueError
from .hf_experts import unsupported_reason, uses_experts_interface
from .layer import PEAMoE
from .routing import Router, RoutingConfig

_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
_JITTER = ("jitter_noise", "router_jitter_noise", "input_jitter_noise")


class _RouterNamedPEAMoE(PEAMoE):
    """A PEAMoE whose router is registered as ``router`` (Granite-MoE, Jamba, Aria, ...) rather
    than ``gate``, so that the patched model keeps its parameter names; ``self.gate`` still
    reaches it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._modules = OrderedDict(("router" if k == "gate" else k, v) for k, v in self._modules.items())

    @property
    def gate(self) -> Router:  # type: ignore[override]
        modules = self._modules  # "gate" while PEAMoE.__init__ runs, "router" after
        return modules["router"] if "router" in modules else modules["gate"]  # type: ignore[return-value]


def _router(block: nn.Module, num_experts: int, hidden: int) -> Tuple[str, nn.Module]:
    for name in _ROUTER_NAMES:
        r = block._modules.get(name)
        w = getattr(r, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) == (num_experts, hidden):
            return name, r  # type: ignore[return-value]
    raise InvalidValueError(
        f"cannot patch {type(block).__name__}: no linear router `gate` or `router` with a weight "
        f"[{num_experts}, {hidden}]"
    )


def _routings(block: nn.Module, router: nn.Module) -> List[Dict[str, Any]]:
    """The routing configurations the router's attributes allow, most likely first."""
    top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None)
    if not isinstance(top_k, int):
        raise InvalidValueError(f"cannot patch {type(block).__name__}: its router has no integer top_k")
    scale = getattr(router, "routed_scaling_factor", None)
    fields: Dict[str, Any] = dict(top_k=top_k, routed_scaling_factor=float(scale or 1.0))
    norm = getattr(router, "norm_topk_prob", None)
    renorm = [bool(norm)] if norm is not None else [True, False]
    if "e_score_correction_bias" in dict(router.named_buffers(recurse=False)):
        groups = dict(
            n_group=int(getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1),
            topk_group=int(getattr(router, "topk_group", None) or 1),
        )
        return [dict(router="group_limited", renormalize=r, **groups, **fields) for r in renorm]
    return [dict(router="top_k", renormalize=r, **fields) for r in renorm]


def _shared(block: nn.Module) -> Tuple[Optional[str], Any]:
    for name in _SHARED_NAMES:
        m = block._modules.get(name)
        if m is not None:
            return name, m
    return None, None


def _silu_classes() -> Tuple[type, ...]:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return (nn.SiLU,)
    return (nn.SiLU, SiLUActivation)


def _check_block(block: nn.Module) -> None:
    """Refuse what the probe may not see: jitter (training only), a non-SwiGLU expert."""
    name = type(block).__name__
    for m in (block, *block.children()):
        for attr in _JITTER:
            if (getattr(m, attr, 0) or 0) > 0:
                raise InvalidValueError(
                    f"{name} has router {attr}={getattr(m, attr)}, which PEAMoE does not reproduce; "
                    f"set it to 0 in the config (or on the module) before patching"
                )
    reason = unsupported_reason(block.experts)
    if reason:
        raise InvalidValueError(f"cannot patch {name}: PEAMoE only implements SwiGLU experts; {reason}")
    silu = _silu_classes()
    for path, m in block.named_modules():
        act = getattr(m, "act_fn", None)
        if isinstance(act, nn.Module) and m is not block.experts and not isinstance(act, silu):
            raise InvalidValueError(
                f"{name}.{path or 'act_fn'} uses the activation {type(act).__name__}; PEAMoE only "
                "implements SiLU (SwiGLU) experts (config.hidden_act 'silu' or 'swish')"
            )


def _build(block: nn.Module, router_name: str, routing: Dict[str, Any]) -> PEAMoE:
    """A PEAMoE with ``routing`` holding ``block``'s own tensors (raises if they do not fit)."""
    name = type(block).__name__
    experts: Any = block.experts
    gate_up = experts.gate_up_proj
    if experts.is_transposed:
        raise InvalidValueError(
            f"cannot patch {name}: its experts are stored transposed ([E, H, 2F]); PEAMoE keeps "
            "[E, 2F, H] (experts_implementation='deepseek_rs' runs this model's experts on our ops)"
        )
    e, two_f, h = gate_up.shape
    shared_name, shared = _shared(block)
    cls = PEAMoE if router_name == "gate" else _RouterNamedPEAMoE
    new = cls(
        h,
        two_f // 2,
        e,
        **routing,
        shared_intermediate_size=shared.gate_proj.out_features if shared is not None else 0,
        shared_expert_gate="shared_expert_gate" in block._modules,
        shared_experts_name=shared_name or "shared_experts",
        device="meta",
        dtype=gate_up.dtype,
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


def _probe_difference(block: nn.Module, new: PEAMoE) -> Optional[float]:
    """max |block(x) - new(x)| / max(1, max |block(x)|) on a random input, in eval mode (None
    where the block's tensors are not materialised, or it does not return one tensor)."""
    p = next(block.parameters())
    if p.device.type == "meta":
        return None
    h = new.hidden_size
    x = torch.randn(2, 16, h, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    modes = {m: m.training for m in block.modules()}
    try:
        block.eval()
        new.eval()
        with torch.no_grad():
            want = block(x)
            got = new(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
        new.train(block.training)
        new.last_routing, new.aux_losses = None, None
    if not isinstance(want, torch.Tensor):
        raise InvalidValueError(
            f"cannot patch {type(block).__name__}: its forward returns {type(want).__name__}, "
            "PEAMoE returns one tensor"
        )
    return float((got.float() - want.float()).abs().max() / max(1.0, float(want.float().abs().max())))


def _replacement(block: nn.Module) -> PEAMoE:
    """A PEAMoE computing ``block``'s function with ``block``'s own tensors."""
    _check_block(block)
    experts: Any = block.experts
    gate_up = experts.gate_up_proj
    h = gate_up.shape[1] if experts.is_transposed else gate_up.shape[2]
    router_name, router = _router(block, gate_up.shape[0], h)
    tol = 1e-4 if gate_up.dtype in (torch.float32, torch.float64) else 3e-2
    diffs = []
    for routing in _routings(block, router):
        new = _build(block, router_name, routing)
        diff = _probe_difference(block, new)
        if diff is None or diff <= tol:
            return new
        diffs.append(diff)
    raise InvalidValueError(
        f"cannot patch {type(block).__name__}: its router {type(router).__name__} is not a softmax or "
        f"sigmoid top-k that PEAMoE reproduces (relative difference {min(diffs):.3g} on a random probe)"
    )


def is_moe_block(module: nn.Module) -> bool:
    """True for a module with an ``experts`` child of transformers' experts interface."""
    return uses_experts_interface(getattr(module, "_modules", {}).get("experts"))


def patch(model: nn.Module, router: Union[RoutingConfig, str, None] = None, **routing: Any) -> nn.Module:
    """Replace every MoE block of ``model`` by an equivalent :class:`PEAMoE`, in place.

    Returns ``model``, or the replacement when ``model`` is itself a block. See the module
    docstring for the blocks found and how; Hugging Face's ``output_router_logits``
    load-balancing loss is replaced by each PEAMoE's ``aux_losses``. With ``router`` and / or
    routing fields (``patch(model, router="top_p", top_p=0.5, max_k=8)``), every replacement
    then routes by that :class:`RoutingConfig` (fields not given keep the block's values).
    Raises :class:`InvalidValueError` if ``model`` has no MoE block or a block cannot be
    reproduced (non-SiLU activation, biases, router jitter noise, a router that is not softmax
    or sigmoid top-k); then nothing is replaced. On an already patched model it warns and
    changes nothing.
    """
    if router is not None or routing:
        RoutingConfig.of(router, **routing)  # bad fields raise before anything is built
    if is_moe_block(model):
        return _set_routing(_replacement(model), router, routing)
    # Build every replacement before swapping any, so that an error leaves the model untouched.
    swaps: List[Tuple[nn.Module, str, PEAMoE]] = []
    built: Dict[int, PEAMoE] = {}  # a block reachable by several paths gets one replacement
    for path, module in model.named_modules(remove_duplicate=False):
        if is_moe_block(module):
            if id(module) not in built:
                built[id(module)] = _set_routing(_replacement(module), router, routing)
            parent, _, attr = path.rpartition(".")
            swaps.append((model.get_submodule(parent), attr, built[id(module)]))
    if not swaps:
        if isinstance(model, PEAMoE) or any(isinstance(m, PEAMoE) for m in model.modules()):
            warnings.warn(
                f"deepseek_rs.patch: {type(model).__name__} is already patched (its MoE blocks are "
                "PEAMoE); nothing changed",
                stacklevel=2,
            )
            return model
        raise InvalidValueError(
            f"{type(model).__name__} contains no supported MoE block (a module with an `experts` "
            "child of transformers' ExpertsInterface)"
        )
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


def _set_routing(new: PEAMoE, router: Union[RoutingConfig, str, None], fields: Dict[str, Any]) -> PEAMoE:
    if router is None and not fields:
        return new
    current = new.gate.config
    if isinstance(router, RoutingConfig):
        config = RoutingConfig.of(router, **fields)
    else:
        config = RoutingConfig.of(current, **({"rule": router} if router else {}), **fields)
    if (current.rule == "group_limited") != (config.rule == "group_limited"):
        raise InvalidValueError(
            f"cannot route a {current.rule!r} block by {config.rule!r}: the router's selection bias "
            "(e_score_correction_bias) is only used by the 'group_limited' rule, and a softmax rule "
            "has no place for it"
        )
    new.gate.config = config.check(new.num_experts)
    return new


__all__ = ["is_moe_block", "patch"]
