"""Expert routing: which experts each token uses and with what weight.

Three rules, one output format (a per-token CSR, so the number of experts per token may vary):

* ``"top_k"``: softmax over all experts, the ``top_k`` most probable (Mixtral, Qwen-MoE);
* ``"top_p"``: progressive expert activation (Huang et al. 2024, "Harder Tasks Need More
  Experts"): the smallest set of most probable experts whose probability mass reaches
  ``top_p``, between ``min_k`` and ``max_k`` experts;
* ``"group_limited"``: DeepSeek-V3: sigmoid scores, a selection-only bias balanced without an
  auxiliary loss, and top-k inside the best ``topk_group`` of ``n_group`` expert groups.

Ties go to the lower expert index. Gradients reach the logits through the selected weights.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DeviceError, DTypeError, InvalidValueError, ShapeError
from . import ops

RULES = ("top_k", "top_p", "group_limited")
MAX_GROUPS = 256  # expert groups of "group_limited" at most (the Rust and CUDA routers keep one score each)


class RouterOutput(NamedTuple):
    """A routing as a per-token CSR.

    Token ``t`` uses experts ``expert_ids[token_offsets[t]:token_offsets[t+1]]`` (by
    descending score) with the matching ``weights``.
    """

    logits: Tensor  # [T, E], as scored (float32 or float64)
    token_offsets: Tensor  # [T + 1] int64
    expert_ids: Tensor  # [N] int64
    weights: Tensor  # [N], differentiable with respect to the logits
    expert_counts: Tensor  # [E] int64, pairs routed to each expert

    @property
    def experts_per_token(self) -> Tensor:
        """Number of experts each token uses, [T]."""
        return self.token_offsets.diff()


class RouterAuxLosses(NamedTuple):
    """The auxiliary losses of a routing, each a scalar tensor. Weight and add them yourself."""

    load_balancing: (
        Tensor  # Switch Transformer: E * sum_e (share of pairs_e) * (mean prob_e); 1 when balanced
    )
    z_loss: Tensor  # ST-MoE: mean over tokens of logsumexp(logits)^2
    entropy: Tensor  # mean entropy of the token distributions; minimising it keeps top-p sparse


@dataclass(frozen=True)
class RoutingConfig:
    """How a router picks each token's experts: one object carried by :func:`route`,
    :class:`Router`, :class:`~deepseek_rs.PEAMoE` and the ops' CPU and CUDA kernels.

    ``rule`` is ``"top_p"`` (progressive expert activation, the default), ``"top_k"`` or
    ``"group_limited"`` (see the module docstring). ``top_k`` is the experts per token of
    ``"top_k"`` and ``"group_limited"``; ``top_p``, ``min_k`` and ``max_k`` (None: every expert)
    bound ``"top_p"``. ``renormalize`` divides each token's weights by their sum; ``n_group`` /
    ``topk_group`` are the expert groups of ``"group_limited"``; the weights are multiplied by
    ``routed_scaling_factor`` (DeepSeek-V3's name).

    Values that are wrong for any expert count raise :class:`InvalidValueError` here; those that
    depend on it (``top_k`` > experts, ``n_group`` not dividing them) in :meth:`check`, which
    ``Router`` and ``PEAMoE`` call at construction and :func:`route` at each call.
    """

    rule: str = "top_p"
    top_k: int = 2
    top_p: float = 0.5
    min_k: int = 1
    max_k: Optional[int] = None
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise InvalidValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        # Integers and reals of any kind (numpy scalars too) are stored as Python int / float;
        # the plain types skip the (slower) abstract checks.
        counts = ("top_k", "min_k", "n_group", "topk_group") + (("max_k",) if self.max_k is not None else ())
        for name in counts:
            value = getattr(self, name)
            if type(value) is not int:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise InvalidValueError(f"{name} must be an integer >= 1, got {value!r}")
                object.__setattr__(self, name, int(value))
            if value < 1:
                raise InvalidValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("top_p", "routed_scaling_factor"):
            value = getattr(self, name)
            if type(value) is not float:
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise InvalidValueError(f"{name} must be a finite number, got {value!r}")
                object.__setattr__(self, name, float(value))
            if not math.isfinite(value):
                raise InvalidValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_k is not None and self.min_k > self.max_k:
            raise InvalidValueError(f"min_k must be <= max_k, got min_k={self.min_k}, max_k={self.max_k}")
        if self.n_group > MAX_GROUPS:
            raise InvalidValueError(f"n_group must be at most {MAX_GROUPS}, got {self.n_group}")
        if self.topk_group > self.n_group:
            raise InvalidValueError(
                f"topk_group must be in 1..={self.n_group} (n_group), got {self.topk_group}"
            )
        if not isinstance(self.renormalize, (bool, np.bool_)):
            raise InvalidValueError(f"renormalize must be a bool, got {self.renormalize!r}")
        object.__setattr__(self, "renormalize", bool(self.renormalize))

    @property
    def scoring(self) -> str:
        """``"sigmoid"`` for ``group_limited``, ``"softmax"`` for the others."""
        return "sigmoid" if self.rule == "group_limited" else "softmax"

    def check(self, num_experts: int) -> RoutingConfig:
        """Raise :class:`InvalidValueError` unless this config can route over ``num_experts``."""
        e = num_experts
        if self.rule == "top_p":
            max_k = e if self.max_k is None else self.max_k
            if max_k > e:
                raise InvalidValueError(f"max_k must be in 1..={e} (the number of experts), got {max_k}")
            if self.min_k > max_k:
                raise InvalidValueError(f"min_k must be in 1..={max_k} (max_k or experts), got {self.min_k}")
            return self
        if self.top_k > e:
            raise InvalidValueError(f"top_k must be in 1..{e} (the number of experts), got {self.top_k}")
        if self.rule == "group_limited":
            if e % self.n_group:
                raise InvalidValueError(f"n_group ({self.n_group}) must divide num_experts ({e})")
            per_group = e // self.n_group
            if self.top_k > self.topk_group * per_group:
                raise InvalidValueError(
                    f"top_k must be in 1..={self.topk_group * per_group} (topk_group * experts per group), "
                    f"got {self.top_k}"
                )
        return self

    @classmethod
    def of(cls, config: Union[RoutingConfig, str, None] = None, **fields: Any) -> RoutingConfig:
        """``config`` (a ``RoutingConfig``, a rule name, or None for the defaults) with ``fields`` set."""
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            hint = "; `scale` is now `routed_scaling_factor`" if "scale" in unknown else ""
            raise InvalidValueError(f"unknown routing fields {unknown}; the fields are {list(FIELDS)}{hint}")
        if isinstance(config, RoutingConfig):
            return dataclasses.replace(config, **fields) if fields else config
        if config is None:
            return cls(**fields)
        if not isinstance(config, str):
            raise InvalidValueError(
                f"a routing config must be a RoutingConfig or a rule name, got {config!r}"
            )
        return cls(rule=config, **fields)

    def __str__(self) -> str:
        rule = {
            "top_k": f"top_k={self.top_k}",
            "top_p": f"top_p={self.top_p}, min_k={self.min_k}, max_k={self.max_k}",
            "group_limited": f"top_k={self.top_k}, n_group={self.n_group}, topk_group={self.topk_group}",
        }[self.rule]
        extra = f", renormalize={self.renormalize}" if self.renormalize else ""
        if self.routed_scaling_factor != 1.0:
            extra += f", routed_scaling_factor={self.routed_scaling_factor}"
        return f"rule={self.rule!r}, {rule}{extra}"


FIELDS = tuple(f.name for f in dataclasses.fields(RoutingConfig))


def check_logits(logits: Tensor) -> Tensor:
    """Validate router logits and return them as a contiguous float32/float64 tensor."""
    if not isinstance(logits, Tensor):
        raise DTypeError(f"router logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ShapeError(f"router logits must be 2-D [tokens, experts], got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ShapeError("router logits need at least one expert (got shape [T, 0])")
    if logits.device.type not in ("cpu", "cuda"):
        raise DeviceError(f"the router runs on CPU (Rust) or CUDA tensors, got logits on {logits.device}")
    if not logits.dtype.is_floating_point:
        raise DTypeError(f"router logits must be floating point, got {logits.dtype}")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # float16 / bfloat16 are scored in float32
    return logits.contiguous()


def route(
    logits: Tensor,
    config: Union[RoutingConfig, str, None] = None,
    *,
    bias: Optional[Tensor] = None,
    **fields: Any,
) -> RouterOutput:
    """Route router ``logits`` [T, E] to experts (see the module docstring).

    ``config`` is a :class:`RoutingConfig`, or a rule name; keyword ``fields`` set or override its
    fields (``route(z, "top_k", top_k=4)``). ``bias`` [E] is the selection-only bias of
    ``"group_limited"``. CPU tensors run the Rust router, CUDA tensors the CUDA kernels: both are
    kernels of the op ``torch.ops.deepseek_rs.route``.
    """
    cfg = RoutingConfig.of(config, **fields)
    logits = check_logits(logits)
    e = logits.shape[1]
    cfg.check(e)
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise DTypeError(f"selection bias must be a torch.Tensor, got {type(bias).__name__}")
        if cfg.rule != "group_limited":
            raise InvalidValueError(
                f"a selection bias is only used by the 'group_limited' rule, not {cfg.rule!r}"
            )
        if bias.shape != (e,):
            raise ShapeError(f"selection bias must have shape [{e}], got {tuple(bias.shape)}")
        bias = bias.detach().to(device=logits.device, dtype=logits.dtype).contiguous()
    offsets, ids, weights, counts = ops.route(
        logits,
        bias,
        cfg.rule,
        cfg.top_k,
        cfg.top_p,
        cfg.min_k,
        e if cfg.max_k is None else cfg.max_k,
        cfg.n_group,
        cfg.topk_group,
        cfg.renormalize,
        cfg.routed_scaling_factor,
    )
    return RouterOutput(logits, offsets, ids, weights, counts)


def aux_losses(routing: RouterOutput, scoring: str = "softmax") -> RouterAuxLosses:
    """Auxiliary losses of ``routing`` computed from its logits (differentiable).

    ``scoring="sigmoid"`` (the ``group_limited`` rule) uses the sigmoid scores normalised per
    token as the distribution.
    """
    logits = routing.logits
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        return RouterAuxLosses(zero, zero, zero)
    if scoring == "sigmoid":
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    else:
        probs = torch.softmax(logits, dim=-1)
    e = logits.shape[1]
    share = routing.expert_counts.to(probs.dtype) / max(int(routing.expert_ids.numel()), 1)
    load_balancing = e * (share * probs.mean(dim=0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    entropy = -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=-1).mean()
    return RouterAuxLosses(load_balancing, z_loss, entropy)


class Router(nn.Module):
    """A linear router (``weight`` [E, H], no bias) followed by a :class:`RoutingConfig`.

    ``config`` is a ``RoutingConfig`` or a rule name, ``fields`` override its fields. For
    ``"group_limited"`` it owns the selection bias buffer ``e_score_correction_bias`` (the Hugging
    Face DeepSeek-V3 name) and :meth:`update_bias` balances it without an auxiliary loss.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        config: Union[RoutingConfig, str, None] = None,
        *,
        bias_update_rate: float = 1e-3,
        device=None,
        dtype=None,
        **fields: Any,
    ):
        super().__init__()
        if hidden_size < 1 or num_experts < 1:
            raise InvalidValueError(
                f"hidden_size and num_experts must be positive, got {hidden_size} and {num_experts}"
            )
        self.config = RoutingConfig.of(config, **fields).check(num_experts)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.bias_update_rate = bias_update_rate
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.config.rule == "group_limited":
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(num_experts, device=device, dtype=torch.float32)
            )
        else:
            self.e_score_correction_bias = None
        # The logits by a kernel whose rows do not depend on each other (see PEAMoE).
        self.batch_invariant = False

    @property
    def scoring(self) -> str:
        return self.config.scoring

    def forward(self, hidden_states: Tensor) -> RouterOutput:
        """Route ``hidden_states`` [T, H]."""
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            raise ShapeError(
                f"router input must be [tokens, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        linear = ops.linear_rows if self.batch_invariant else nn.functional.linear
        logits = linear(hidden_states.to(self.weight.dtype), self.weight)
        return self.route_logits(logits)

    def route_logits(self, logits: Tensor) -> RouterOutput:
        """Apply this router's config to precomputed ``logits`` [T, E]."""
        return route(logits, self.config, bias=self.e_score_correction_bias)

    def aux_losses(self, routing: RouterOutput) -> RouterAuxLosses:
        """Load-balancing, z- and entropy losses of ``routing`` under this router's scoring."""
        return aux_losses(routing, self.scoring)

    @torch.no_grad()
    def update_bias(self, expert_counts: Tensor, rate: Optional[float] = None) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: ``b_i += rate * sign(mean_load - load_i)``.

        Call it after each training step with the step's ``expert_counts`` (summed over
        micro-batches and ranks if you have them).
        """
        if self.e_score_correction_bias is None:
            raise InvalidValueError(
                f"update_bias needs the 'group_limited' rule; this router uses {self.rule!r}"
            )
        if expert_counts.shape != (self.num_experts,):
            raise ShapeError(
                f"expert_counts must have shape [{self.num_experts}], got {tuple(expert_counts.shape)}"
            )
        load = expert_counts.to(self.e_score_correction_bias)
        rate = self.bias_update_rate if rate is None else rate
        self.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, {self.config}"


def _config_field(name: str) -> property:
    def get(router: Router) -> Any:
        return getattr(router.config, name)

    def set_(router: Router, value: Any) -> None:
        raise InvalidValueError(
            f"a Router's routing is its frozen config: set router.config = "
            f"dataclasses.replace(router.config, {name}=...) instead of router.{name}"
        )

    return property(get, set_, doc=f"The config's ``{name}`` (read-only).")


# `router.top_k` and the other fields read through to the config.
for _name in FIELDS:
    setattr(Router, _name, _config_field(_name))


__all__ = [
    "RULES",
    "Router",
    "RouterAuxLosses",
    "RouterOutput",
    "RoutingConfig",
    "aux_losses",
    "check_logits",
    "route",
]
