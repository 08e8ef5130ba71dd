"""The Progressive Expert Activation Mixture-of-Experts layer.

``PEAMoE`` = a :class:`~deepseek_rs.moe.routing.Router` + SwiGLU experts stored as stacked
weights (the Hugging Face transformers >= 5 layout) + optional shared experts. The forward pass
is dropless: route -> counting sort by expert -> gather token rows into one expert-contiguous
buffer -> the expert FFN over each expert's segment -> weighted combine back to token order in a
fixed per-token order. Each step is an op of :mod:`.ops` (Rust kernels on the CPU, CUDA kernels
on the GPU) with a backward pass.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Optional, Tuple, Union, overload

import torch
from torch import Tensor, nn

from ..errors import DeviceError, DTypeError, InvalidValueError, ShapeError
from . import ops
from .routing import Router, RouterAuxLosses, RouterOutput, RoutingConfig


class SwiGLUExperts(nn.Module):
    """``num_experts`` SwiGLU FFNs as two stacked weights.

    ``gate_up_proj`` [E, 2F, H] holds each expert's gate rows then its up rows; ``down_proj``
    [E, H, F]. Expert ``e`` maps ``x`` to ``down_e(silu(gate_e x) * up_e x)``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = (
            num_experts,
            hidden_size,
            intermediate_size,
        )
        kw = dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        # The CPU backend of the expert FFN: "auto" (tuned per machine), "rust", "torch" or
        # "grouped_mm" (see deepseek_rs.moe.backends); "rust" is the batch-invariant one.
        self.backend = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default initialisation, per expert.
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        bound = 1 / math.sqrt(self.intermediate_size)
        nn.init.uniform_(self.down_proj, -bound, bound)

    def forward(self, hidden_states: Tensor, routing: RouterOutput) -> Tensor:
        """Run every token [T, H] through its routed experts and combine with the routing weights.

        Every step is a ``torch.ops.deepseek_rs`` op with a CPU (Rust) and a CUDA kernel.
        """
        devices = {t.device for t in (hidden_states, self.gate_up_proj, self.down_proj, routing.expert_ids)}
        if len(devices) > 1:
            raise DeviceError(f"PEAMoE's inputs, weights and routing must share one device, got {devices}")
        t = hidden_states.shape[0]
        perm = ops.sort_by_expert(routing.token_offsets, routing.expert_ids, self.num_experts)
        sorted_pair, sorted_token, pair_position, expert_offsets = perm
        x = hidden_states.to(self.gate_up_proj.dtype).contiguous()
        buf = ops.dispatch(x, sorted_token, pair_position, routing.token_offsets)
        # The pre-activations are kept only when a backward pass may follow.
        save_h = torch.is_grad_enabled() and any(
            p.requires_grad for p in (hidden_states, self.gate_up_proj, self.down_proj, routing.weights)
        )
        out, _ = ops.expert_ffn(buf, self.gate_up_proj, self.down_proj, expert_offsets, save_h, self.backend)
        y = ops.combine(out, routing.weights, sorted_pair, sorted_token, pair_position, routing.token_offsets)
        return y.view(t, self.hidden_size)

    def extra_repr(self) -> str:
        e, h, f = self.num_experts, self.hidden_size, self.intermediate_size
        return f"num_experts={e}, hidden_size={h}, intermediate_size={f}"


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN (``gate_proj``, ``up_proj``, ``down_proj``): the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.batch_invariant = False  # run as one expert of the rust backend (see PEAMoE)
        self._gate_up: Optional[Tuple[tuple, Tensor]] = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_invariant:
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        # torch's SiLU takes a vectorised path for most elements and a scalar one for the tail,
        # which round differently: the expert kernel computes the whole FFN per row instead.
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        weights = (self.gate_proj.weight, self.up_proj.weight)
        trains = x2.requires_grad or any(p.requires_grad for p in self.parameters())
        save_h = torch.is_grad_enabled() and trains
        if save_h:
            gate_up = torch.cat(weights)[None]
        else:  # serving: the concatenated weight is kept while the weights are unchanged
            stamp = tuple((w.data_ptr(), w._version) for w in weights)
            if self._gate_up is None or self._gate_up[0] != stamp:
                self._gate_up = (stamp, torch.cat([w.detach() for w in weights])[None])
            gate_up = self._gate_up[1]
        down = self.down_proj.weight[None]
        offsets = torch.tensor([0, x2.shape[0]])
        y, _ = ops.expert_ffn(x2, gate_up, down, offsets, save_h, "rust")
        return y.view(*x.shape[:-1], y.shape[-1])


def _sigmoid(v: float) -> float:
    """The logistic function in Python floats, without overflow."""
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    z = math.exp(v)
    return z / (1.0 + z)


class PEAMoE(nn.Module):
    """Mixture-of-Experts layer with Progressive Expert Activation.

    Args:
        hidden_size: model width H.
        intermediate_size: width F of each routed expert's SwiGLU FFN.
        num_experts: number of routed experts E.
        router: a :class:`~deepseek_rs.moe.routing.RoutingConfig`, or its rule name:
            ``"top_p"`` (progressive: as many experts as the token needs to reach ``top_p``
            probability mass, between ``min_k`` and ``max_k``), ``"top_k"``, or
            ``"group_limited"`` (DeepSeek-V3).
        **routing: fields of the ``RoutingConfig`` (``top_k``, ``top_p``, ``min_k``, ``max_k``,
            ``renormalize``, ``n_group``, ``topk_group``, ``routed_scaling_factor``), set on it.
        bias_update_rate: the rate of :meth:`Router.update_bias` (``"group_limited"``).
        shared_intermediate_size: width of an always-on shared SwiGLU expert (0: none).
        shared_expert_gate: scale the shared expert by ``sigmoid(linear(x))`` (Qwen2-MoE).
        shared_experts_name: attribute name of the shared expert (``"shared_experts"`` as in
            DeepSeek-V3, ``"shared_expert"`` as in Qwen2-MoE), so state dicts keep their keys.
        batch_invariant: a token's output has the same bits whatever other tokens share its
            batch (CPU, float32): the router's logits and the shared expert run on
            :func:`~deepseek_rs.moe.ops.linear_rows` and the experts on the ``rust`` backend,
            where BLAS and the tuner pick kernels by batch size. Settable on a built layer.

    ``forward(x)`` takes ``[..., H]`` and returns the same shape. In training (with grad
    enabled) the router's auxiliary losses of the last call are in ``self.aux_losses``;
    ``forward(x, return_aux=True)`` returns ``(y, aux_losses)`` in any mode. The last routing
    is kept in ``self.last_routing`` (detached) for load statistics and
    :meth:`Router.update_bias`.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        *,
        router: Union[RoutingConfig, str, None] = None,
        bias_update_rate: float = 1e-3,
        shared_intermediate_size: int = 0,
        shared_expert_gate: bool = False,
        shared_experts_name: str = "shared_experts",
        batch_invariant: bool = False,
        device=None,
        dtype=None,
        **routing: Any,
    ):
        super().__init__()
        if min(hidden_size, intermediate_size, num_experts) < 1:
            raise InvalidValueError(
                "hidden_size, intermediate_size and num_experts must be positive, got "
                f"{hidden_size}, {intermediate_size}, {num_experts}"
            )
        self.hidden_size, self.intermediate_size, self.num_experts = (
            hidden_size,
            intermediate_size,
            num_experts,
        )
        config = RoutingConfig.of(router, **routing)
        self.gate = Router(
            hidden_size, num_experts, config, bias_update_rate=bias_update_rate, device=device, dtype=dtype
        )
        self.experts = SwiGLUExperts(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)
        self.shared_experts_name = shared_experts_name
        if shared_intermediate_size > 0:
            self.add_module(shared_experts_name, SwiGLU(hidden_size, shared_intermediate_size, device, dtype))
            self.shared_expert_gate = (
                nn.Linear(hidden_size, 1, bias=False, device=device, dtype=dtype)
                if shared_expert_gate
                else None
            )
        elif shared_expert_gate:
            raise InvalidValueError("shared_expert_gate needs a shared expert (shared_intermediate_size > 0)")
        else:
            self.shared_expert_gate = None
        self.aux_losses: Optional[RouterAuxLosses] = None
        self.last_routing: Optional[RouterOutput] = None
        self.batch_invariant = batch_invariant

    @property
    def batch_invariant(self) -> bool:
        return self.gate.batch_invariant

    @batch_invariant.setter
    def batch_invariant(self, on: bool) -> None:
        if on:
            # The guarantee holds for these modules' own kernels; a swapped-in module (QAT,
            # int8, an adapter) would run its own, silently not invariant.
            shared = self._modules.get(self.shared_experts_name)
            parts = {"experts": (self.experts, SwiGLUExperts)}
            if shared is not None:
                parts[self.shared_experts_name] = (shared, SwiGLU)
                for n, m in shared.named_children():
                    parts[f"{self.shared_experts_name}.{n}"] = (m, nn.Linear)
            if self.shared_expert_gate is not None:
                parts["shared_expert_gate"] = (self.shared_expert_gate, nn.Linear)
            for name, (module, want) in parts.items():
                if type(module) is not want:
                    raise InvalidValueError(
                        f"batch_invariant=True covers PEAMoE's own modules; {name} is a "
                        f"{type(module).__name__}, not a {want.__name__}"
                    )
        self.gate.batch_invariant = bool(on)
        self.experts.backend = "rust" if on else "auto"
        shared = self._modules.get(self.shared_experts_name)
        if isinstance(shared, SwiGLU):
            shared.batch_invariant = bool(on)

    def __getstate__(self):
        # The aux losses of the last forward carry its autograd graph, which cannot be
        # copied or pickled; a copy starts without them, like a fresh module.
        state = self.__dict__.copy()
        state["aux_losses"] = None
        return state

    def _check_input(self, hidden_states: Tensor) -> None:
        if not isinstance(hidden_states, Tensor):
            raise DTypeError(f"PEAMoE input must be a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != self.hidden_size:
            raise ShapeError(
                f"PEAMoE input must be [..., {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        if not hidden_states.dtype.is_floating_point:
            raise DTypeError(f"PEAMoE input must be floating point, got {hidden_states.dtype}")
        # The router's weight: the experts may have been swapped for int8 ones (deepseek_rs.quant).
        weights = self.gate.weight.device
        if hidden_states.device != weights:
            raise DeviceError(f"PEAMoE input is on {hidden_states.device} but its weights are on {weights}")
        if self.batch_invariant:
            if weights.type != "cpu":
                raise DeviceError(f"batch_invariant=True is a CPU guarantee; the layer is on {weights}")
            dtypes = {p.dtype for p in self.parameters() if p.is_floating_point()}
            if dtypes != {torch.float32}:
                got = sorted(map(str, dtypes))
                raise DTypeError(f"batch_invariant=True needs float32 weights, got {got}")

    def _shared_gate(self, x: Tensor) -> Tensor:
        """``sigmoid(shared_expert_gate(x))`` [T, 1]."""
        if not self.batch_invariant:
            return torch.sigmoid(self.shared_expert_gate(x))
        g = ops.linear_rows(x, self.shared_expert_gate.weight)
        # torch's vectorised and scalar sigmoids round differently; one value per token, so
        # Python's math is cheap and gives every token the same bits in any batch.
        exact = torch.tensor([_sigmoid(v) for (v,) in g.detach().tolist()], dtype=g.dtype).view_as(g)
        if not g.requires_grad:
            return exact
        a = torch.sigmoid(g)
        return exact + (a - a.detach())  # the exact values, with torch's sigmoid's gradient

    @overload
    def forward(self, hidden_states: Tensor, return_aux: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, hidden_states: Tensor, return_aux: Literal[True]) -> Tuple[Tensor, RouterAuxLosses]: ...

    @overload
    def forward(
        self, hidden_states: Tensor, return_aux: bool = ...
    ) -> Union[Tensor, Tuple[Tensor, RouterAuxLosses]]: ...

    def forward(
        self, hidden_states: Tensor, return_aux: bool = False
    ) -> Union[Tensor, Tuple[Tensor, RouterAuxLosses]]:
        self._check_input(hidden_states)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        routing = self.gate(x)
        y = self.experts(x, routing)
        shared = self._modules.get(self.shared_experts_name)
        if shared is not None:
            xs = x.to(y.dtype)
            s = shared(xs)
            if self.shared_expert_gate is not None:
                s = self._shared_gate(xs) * s
            y = y + s
        y = y.to(hidden_states.dtype).view(shape)
        self.last_routing = RouterOutput(*(t.detach() for t in routing))
        aux = None
        if return_aux or (self.training and torch.is_grad_enabled()):
            aux = self.gate.aux_losses(routing)
        self.aux_losses = aux
        return (y, aux) if return_aux else y

    def extra_repr(self) -> str:
        h, f, e = self.hidden_size, self.intermediate_size, self.num_experts
        return f"hidden_size={h}, intermediate_size={f}, num_experts={e}"


def set_batch_invariant(model: nn.Module, on: bool = True) -> int:
    """Switch every :class:`PEAMoE` in ``model`` to (or from) batch-invariant execution; returns
    how many there are. Raises unless there is one. Other modules with parameters (an
    ``nn.Linear`` of the model's own) keep running on torch's BLAS, whose results may depend on
    the batch: a warning names them."""
    layers = [m for m in model.modules() if isinstance(m, PEAMoE)]
    if not layers:
        raise InvalidValueError("batch invariance needs a model with PEAMoE layers; this one has none")
    for layer in layers:
        layer.batch_invariant = on
    inside = {id(p) for layer in layers for p in layer.parameters()}
    others = sorted(
        {
            name or type(model).__name__
            for name, m in model.named_modules()
            if any(id(p) not in inside for p in m.parameters(recurse=False))
        }
    )
    if on and others:
        named = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        warnings.warn(
            f"batch invariance covers the PEAMoE layers only; {named} run on torch's kernels, "
            "whose results may depend on the batch",
            stacklevel=2,
        )
    return len(layers)


__all__ = ["PEAMoE", "SwiGLU", "SwiGLUExperts", "set_batch_invariant"]
