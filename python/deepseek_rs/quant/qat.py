"""INT8 quantization: quantization-aware training (QAT) and real int8 inference.

The scheme is the article's (``bit_width: 8``, ``activation_range: dynamic``):

* weights: symmetric, per output channel, int8 in ``[-127, 127]`` with one float32 scale per
  row (``absmax / 127``);
* activations: symmetric, per row (per token), the range taken from the data at run time,
  so no calibration set is needed.

``prepare_qat(model)`` swaps ``nn.Linear`` and ``SwiGLUExperts`` (the experts of ``PEAMoE``)
for fake-quantized twins that share the same Parameters: the forward pass sees exactly the
values the int8 model will compute with, and the straight-through estimator passes the
gradient to the float weights. ``convert_int8(model)`` then replaces them (or the float
modules directly: post-training quantization) with ``Int8Linear`` / ``Int8SwiGLUExperts``,
whose weights are int8 (a quarter of the float32 bytes) and whose products run as
int8 x int8 -> int32 matrix multiplications (``torch._int_mm``).

The router of ``PEAMoE`` is not quantized: expert selection is discrete, and a quantized
router would change which experts run, not just how precisely.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from ..errors import DTypeError, InvalidValueError, ShapeError
from ..moe import ops
from ..moe.layer import SwiGLUExperts

QMAX = 127  # symmetric int8: -128 is left unused so that q and -q are both representable


def _scale(absmax: Tensor) -> Tensor:
    # An all-zero row gets a tiny positive scale: it quantizes to zeros instead of NaN.
    return absmax.clamp(min=torch.finfo(torch.float32).tiny).div(QMAX)


def quantize_rows(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric int8 quantization of each row (the last dimension) of ``x``.

    Returns ``(q, scale)``: ``q`` int8 of the shape of ``x``, ``scale`` float32 of shape
    ``x.shape[:-1]``, with ``x ~= q * scale[..., None]`` and an error of at most half a step.
    """
    if not x.dtype.is_floating_point:
        raise DTypeError(f"only floating-point tensors are quantized, got {x.dtype}")
    x = x.float()
    scale = _scale(x.abs().amax(dim=-1))
    q = torch.round(x / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def fake_quantize(x: Tensor) -> Tensor:
    """Round ``x`` to its per-row int8 grid and back, in ``x``'s dtype.

    The straight-through estimator: the gradient passes unchanged (the absmax scale never
    clips, so no element is out of range), and the scale is treated as a constant.
    """
    if not x.dtype.is_floating_point:
        raise DTypeError(f"only floating-point tensors are fake-quantized, got {x.dtype}")
    with torch.no_grad():
        scale = _scale(x.detach().float().abs().amax(dim=-1, keepdim=True))
        grid = (torch.round(x.float() / scale).clamp_(-QMAX, QMAX) * scale).to(x.dtype)
    return x + (grid - x).detach()


class QATLinear(nn.Linear):
    """``nn.Linear`` that computes with int8-rounded weights (per output channel) and
    int8-rounded inputs (per row), training the float weights through the straight-through
    estimator. ``from_float`` shares the Parameters of an existing ``nn.Linear``."""

    @classmethod
    def from_float(cls, linear: nn.Linear) -> QATLinear:
        qat = cls.__new__(cls)
        nn.Module.__init__(qat)
        qat.in_features, qat.out_features = linear.in_features, linear.out_features
        qat.weight, qat.bias = linear.weight, linear.bias
        return qat

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(fake_quantize(x), fake_quantize(self.weight), self.bias)


class Int8Linear(nn.Module):
    """Inference-only int8 ``Linear``: int8 weights [out, in] with float32 scales [out]; each
    call quantizes its input per row and multiplies int8 x int8 -> int32."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ShapeError(f"a linear weight is 2-D [out, in], got shape {tuple(weight.shape)}")
        q, scale = quantize_rows(weight.detach())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"Int8Linear input must be [..., {self.in_features}], got {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features)
        y = int8_matmul(rows, self.weight_int8, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> Tensor:
        """The dequantized float32 weight, computed on each access: for code that reads a
        Linear's ``.weight`` (e.g. ``nn.TransformerEncoderLayer``'s fast-path checks)."""
        return self.weight_int8.float() * self.weight_scale.unsqueeze(-1)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, int8"


def int8_matmul(x: Tensor, weight_int8: Tensor, weight_scale: Tensor) -> Tensor:
    """``x [M, K] @ W.T`` for an int8 ``W [N, K]`` with row scales ``[N]``, as float32.

    ``x`` is quantized per row, multiplied in int8 with int32 accumulation (exact), and the
    product rescaled by both scales.
    """
    if x.shape[0] == 0:
        return x.new_zeros(0, weight_int8.shape[0], dtype=torch.float32)
    xq, x_scale = quantize_rows(x)
    acc = torch._int_mm(xq, weight_int8.t())
    return acc.float().mul_(x_scale.unsqueeze(1)).mul_(weight_scale)


class QATSwiGLUExperts(nn.Module):
    """Fake-quantized twin of ``SwiGLUExperts`` sharing its Parameters.

    Each expert's two products see int8-rounded weights (per output channel) and int8-rounded
    inputs (per token row), as ``Int8SwiGLUExperts`` computes them. It runs the experts with
    plain torch ops per expert segment so autograd covers the rounding; QAT fine-tuning is
    short, so this path favours exactness over speed.
    """

    def __init__(self, experts: SwiGLUExperts) -> None:
        super().__init__()
        self.num_experts, self.hidden_size = experts.num_experts, experts.hidden_size
        self.intermediate_size = experts.intermediate_size
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj

    def forward(self, hidden_states: Tensor, routing) -> Tensor:
        t, f = hidden_states.shape[0], self.intermediate_size
        perm = ops.sort_by_expert(routing.token_offsets, routing.expert_ids, self.num_experts)
        sorted_pair, sorted_token, pair_position, expert_offsets = perm
        x = hidden_states.to(self.gate_up_proj.dtype).contiguous()
        buf = ops.dispatch(x, sorted_token, pair_position, routing.token_offsets)
        gate_up, down = fake_quantize(self.gate_up_proj), fake_quantize(self.down_proj)
        bounds = expert_offsets.tolist()
        outs = []
        for e in range(self.num_experts):
            s, end = bounds[e], bounds[e + 1]
            if s == end:
                continue
            h = fake_quantize(buf[s:end]) @ gate_up[e].t()
            act = nn.functional.silu(h[:, :f]) * h[:, f:]
            outs.append(fake_quantize(act) @ down[e].t())
        out = torch.cat(outs) if outs else buf.new_zeros(0, self.hidden_size)
        y = ops.combine(out, routing.weights, sorted_pair, sorted_token, pair_position, routing.token_offsets)
        return y.view(t, self.hidden_size)

    def extra_repr(self) -> str:
        e, h, f = self.num_experts, self.hidden_size, self.intermediate_size
        return f"num_experts={e}, hidden_size={h}, intermediate_size={f}"


def _quantize_stacked(w: Tensor) -> Tuple[Tensor, Tensor]:
    """``quantize_rows`` of stacked expert weights [E, R, C], one expert at a time, so the
    float temporaries are one expert's size rather than the whole stack's."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    for e in range(w.shape[0]):
        q[e], scale[e] = quantize_rows(w[e])
    return q, scale


class Int8SwiGLUExperts(nn.Module):
    """Inference-only int8 ``SwiGLUExperts``: int8 stacked weights with one float32 scale per
    expert output channel; every expert product is int8 x int8 -> int32 on its segment of
    the expert-sorted token buffer."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.num_experts, self.hidden_size = experts.num_experts, experts.hidden_size
        self.intermediate_size = experts.intermediate_size
        gate_up, gate_up_scale = _quantize_stacked(experts.gate_up_proj.detach())
        down, down_scale = _quantize_stacked(experts.down_proj.detach())
        self.register_buffer("gate_up_int8", gate_up)  # [E, 2F, H]
        self.register_buffer("gate_up_scale", gate_up_scale)  # [E, 2F]
        self.register_buffer("down_int8", down)  # [E, H, F]
        self.register_buffer("down_scale", down_scale)  # [E, H]

    def forward(self, hidden_states: Tensor, routing) -> Tensor:
        t, f = hidden_states.shape[0], self.intermediate_size
        perm = ops.sort_by_expert(routing.token_offsets, routing.expert_ids, self.num_experts)
        sorted_pair, sorted_token, pair_position, expert_offsets = perm
        x = hidden_states.float().contiguous()
        buf = ops.dispatch(x, sorted_token, pair_position, routing.token_offsets)
        out = torch.empty_like(buf)
        bounds = expert_offsets.tolist()
        for e in range(self.num_experts):
            s, end = bounds[e], bounds[e + 1]
            if s == end:
                continue
            h = int8_matmul(buf[s:end], self.gate_up_int8[e], self.gate_up_scale[e])
            act = nn.functional.silu(h[:, :f]).mul_(h[:, f:])
            out[s:end] = int8_matmul(act, self.down_int8[e], self.down_scale[e])
        weights = routing.weights.float()
        y = ops.combine(out, weights, sorted_pair, sorted_token, pair_position, routing.token_offsets)
        return y.view(t, self.hidden_size)

    def extra_repr(self) -> str:
        e, h, f = self.num_experts, self.hidden_size, self.intermediate_size
        return f"num_experts={e}, hidden_size={h}, intermediate_size={f}, int8"


def _swap(model: nn.Module, make) -> nn.Module:
    """Replace, depth first, every submodule for which ``make`` returns a module.

    ``nn.MultiheadAttention`` is left alone: it reads its ``out_proj.weight`` directly instead
    of calling the Linear (torch marks it ``NonDynamicallyQuantizableLinear`` for this reason),
    so a swapped ``out_proj`` would be silently skipped in training and break inference.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            continue
        new = make(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _swap(child, make)
    return model


def prepare_qat(model: nn.Module) -> nn.Module:
    """Make ``model`` (in place) train with int8 fake quantization: every ``nn.Linear``
    becomes a ``QATLinear`` and every ``SwiGLUExperts`` a ``QATSwiGLUExperts``, sharing the
    same Parameters, so the optimizer and the ``state_dict`` keys are unchanged."""
    if not isinstance(model, nn.Module):
        raise DTypeError(f"prepare_qat needs an nn.Module, got {type(model).__name__}")

    def make(m: nn.Module):
        if isinstance(m, (QATLinear, QATSwiGLUExperts, Int8Linear, Int8SwiGLUExperts)):
            return m
        if isinstance(m, nn.Linear):
            return QATLinear.from_float(m)
        if isinstance(m, SwiGLUExperts):
            return QATSwiGLUExperts(m)
        return None

    if isinstance(model, (nn.Linear, SwiGLUExperts)):
        raise InvalidValueError("prepare_qat swaps submodules: wrap a bare Linear in a container first")
    return _swap(model, make)


def convert_int8(model: nn.Module) -> nn.Module:
    """Replace (in place) every ``nn.Linear``/``QATLinear`` with an ``Int8Linear`` and every
    ``SwiGLUExperts``/``QATSwiGLUExperts`` with an ``Int8SwiGLUExperts``, and put the model
    in eval mode. On a float model this is post-training quantization; after
    ``prepare_qat`` and fine-tuning it deploys the QAT model, computing what it trained with."""
    if not isinstance(model, nn.Module):
        raise DTypeError(f"convert_int8 needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.Linear, SwiGLUExperts, QATSwiGLUExperts)):
        raise InvalidValueError("convert_int8 swaps submodules: wrap a bare layer in a container first")

    def make(m: nn.Module):
        if isinstance(m, (Int8Linear, Int8SwiGLUExperts)):
            return m
        if isinstance(m, nn.Linear):  # QATLinear included
            return Int8Linear.from_float(m)
        if isinstance(m, (SwiGLUExperts, QATSwiGLUExperts)):
            return Int8SwiGLUExperts(m)
        return None

    return _swap(model, make).eval()


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model`` (each storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


__all__ = [
    "Int8Linear",
    "Int8SwiGLUExperts",
    "QATLinear",
    "QATSwiGLUExperts",
    "convert_int8",
    "fake_quantize",
    "int8_matmul",
    "model_bytes",
    "prepare_qat",
    "quantize_rows",
]
