"""The CUDA path of the MoE layer: routing, permutation and expert FFN on the device, with autograd.

``deepseek_rs.router.route`` and ``SwiGLUExperts.forward`` call :func:`route` and
:func:`experts_forward` when their input is a CUDA tensor, so ``PEAMoE`` needs no change of
its own. The steps and their results are those of the CPU path (same selection, ties to the
lower expert index, same stable order of the expert-sorted buffer); only floating-point
rounding differs (FP16/BF16 tensor-core GEMMs with f32 accumulation).

Host synchronisation: one small device-to-host copy per routing (the number of routed pairs
and the first token with a non-finite logit, so that bad input raises here rather than
producing garbage), plus torch's own for the variable-width top-p compaction.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import DTypeError, InvalidValueError, ShapeError
from ..router import RouterOutput
from . import kernels

SCORING = {"top_k": "softmax", "top_p": "softmax", "group_limited": "sigmoid"}


# --------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------


def route_weights_backward(
    logits: Tensor,
    pair_token: Tensor,
    expert_ids: Tensor,
    grad_weights: Tensor,
    scoring: str,
    renormalize: bool,
    scale: float,
) -> Tensor:
    """Gradient of the logits [T, E] from the gradient of the (scaled) routing weights [N].

    The math of the Rust ``route_backward``, as dense torch operations (any device).
    """
    t, e = logits.shape
    z = logits.detach()
    g = z.new_zeros(t, e)
    g[pair_token, expert_ids] = grad_weights.to(z.dtype) * scale
    sel = z.new_zeros(t, e)
    sel[pair_token, expert_ids] = 1.0
    if scoring == "softmax":
        p = torch.softmax(z, dim=-1)
        if renormalize:
            # The renormalised weights are a softmax over the selected logits.
            w = p * sel / (p * sel).sum(dim=-1, keepdim=True)
            return w * (g - (g * w).sum(dim=-1, keepdim=True))
        return p * (g - (g * p).sum(dim=-1, keepdim=True))
    s = torch.sigmoid(z)
    ds = s * (1 - s)
    if renormalize:
        denom = (s * sel).sum(dim=-1, keepdim=True) + 1e-20
        dot = (g * s * sel).sum(dim=-1, keepdim=True) / denom
        return sel * (g - dot) / denom * ds
    return g * ds


class _RouteWeights(torch.autograd.Function):
    """The routing weights as a differentiable function of the logits (selection is constant)."""

    @staticmethod
    def forward(ctx, logits, weights, pair_token, expert_ids, scoring, renormalize, scale):
        ctx.save_for_backward(logits, pair_token, expert_ids)
        ctx.scoring, ctx.renormalize, ctx.scale = scoring, renormalize, scale
        return weights.clone()

    @staticmethod
    def backward(ctx, grad_weights):
        logits, pair_token, expert_ids = ctx.saved_tensors
        grad = route_weights_backward(
            logits, pair_token, expert_ids, grad_weights, ctx.scoring, ctx.renormalize, ctx.scale
        )
        return grad, None, None, None, None, None, None


def check_group_limited(e: int, top_k: int, n_group: int, topk_group: int) -> None:
    """The argument checks the Rust router makes for the ``group_limited`` rule."""
    if n_group < 1 or n_group > 256 or e % n_group:
        raise InvalidValueError(f"n_group ({n_group}) must divide num_experts ({e}) and be at most 256")
    if not 1 <= topk_group <= n_group:
        raise InvalidValueError(f"topk_group must be in 1..={n_group}, got {topk_group}")
    per_group = e // n_group
    if not 1 <= top_k <= topk_group * per_group:
        raise InvalidValueError(
            f"top_k must be in 1..={topk_group * per_group} (topk_group * experts per group), got {top_k}"
        )


def _non_finite(logits: Tensor, bias: Optional[Tensor], token: int) -> InvalidValueError:
    row = logits[token]
    bad = (~torch.isfinite(row)).nonzero()
    if bad.numel():
        expert = int(bad[0, 0])
        return InvalidValueError(
            f"router logits must be finite, found {float(row[expert])} at token {token}, expert {expert}"
        )
    expert = int((~torch.isfinite(bias)).nonzero()[0, 0]) if bias is not None else -1
    value = float(bias[expert]) if bias is not None else float("nan")
    return InvalidValueError(f"selection bias must be finite, found {value} at expert {expert}")


def route(
    logits: Tensor,
    bias: Optional[Tensor],
    rule: str,
    top_k: int,
    top_p: float,
    min_k: int,
    max_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
) -> RouterOutput:
    """Route CUDA ``logits`` [T, E] by ``rule`` on the device (arguments checked by
    :func:`deepseek_rs.router.route`, which calls this). Scored in float32."""
    logits = logits.float().contiguous()
    t, e = logits.shape
    kernels.check_router_experts(e)
    if t >= 2**31 - 1:
        raise ShapeError(f"the CUDA router takes fewer than 2^31 - 1 tokens, got {t}")
    if rule == "group_limited":
        check_group_limited(e, top_k, n_group, topk_group)
        if bias is None:
            bias = torch.zeros(e, dtype=torch.float32, device=logits.device)
        bias = bias.detach().to(device=logits.device, dtype=torch.float32).contiguous()
    width = max_k if rule == "top_p" else top_k
    with torch.no_grad():
        ids, weights, counts, bad = kernels.route_padded(
            logits.detach(),
            rule,
            width=width,
            top_p=top_p,
            min_k=min_k,
            renormalize=renormalize,
            scale=scale,
            bias=bias,
            n_group=n_group,
            topk_group=topk_group,
        )
        device = logits.device
        if rule == "top_p":
            offsets = torch.zeros(t + 1, dtype=torch.int64, device=device)
            torch.cumsum(counts, 0, out=offsets[1:])
            _pairs, first_bad = torch.stack([offsets[-1], bad[0].long()]).tolist()
            if first_bad < t:
                raise _non_finite(logits, bias, first_bad)
            keep = torch.arange(width, device=device) < counts[:, None]
            ids, weights = ids[keep], weights[keep]
        else:
            first_bad = int(bad.item())
            if first_bad < t:
                raise _non_finite(logits, bias, first_bad)
            offsets = torch.arange(t + 1, dtype=torch.int64, device=device) * width
            ids, weights = ids.view(-1), weights.view(-1)
        pair_token = kernels.pair_tokens(offsets, ids.shape[0])
        expert_counts = torch.bincount(ids, minlength=e)
    weights = _RouteWeights.apply(logits, weights, pair_token, ids, SCORING[rule], renormalize, scale)
    return RouterOutput(logits, offsets, ids, weights, expert_counts)


# --------------------------------------------------------------------------------------------
# Dispatch, expert FFN, combine
# --------------------------------------------------------------------------------------------


class _Dispatch(torch.autograd.Function):
    """Token rows [T, H] -> the expert-sorted buffer [N, H]; the backward is an unweighted combine."""

    @staticmethod
    def forward(ctx, x, sorted_token, pair_position, token_offsets):
        ctx.save_for_backward(pair_position, token_offsets)
        return kernels.gather_rows(x, sorted_token)

    @staticmethod
    def backward(ctx, grad_buf):
        pair_position, token_offsets = ctx.saved_tensors
        return kernels.combine_rows(grad_buf.contiguous(), pair_position, token_offsets), None, None, None


class _Combine(torch.autograd.Function):
    """Expert outputs [N, H] -> token order [T, H], weighted by the routing weights."""

    @staticmethod
    def forward(ctx, buf, weights, sorted_pair, sorted_token, pair_position, pair_token, token_offsets):
        ctx.save_for_backward(buf, weights, sorted_pair, sorted_token, pair_position, pair_token)
        return kernels.combine_rows(buf, pair_position, token_offsets, weights)

    @staticmethod
    def backward(ctx, grad_out):
        buf, weights, sorted_pair, sorted_token, pair_position, pair_token = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_buf = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_buf = kernels.gather_rows(grad_out, sorted_token, weights, sorted_pair)
        if ctx.needs_input_grad[1]:
            grad_w = kernels.combine_weight_grad(grad_out, buf, pair_position, pair_token).to(weights.dtype)
        return grad_buf, grad_w, None, None, None, None, None


class _ExpertFFN(torch.autograd.Function):
    """SwiGLU experts over the expert-sorted buffer: two grouped GEMMs (SwiGLU fused in the first).

    Backward: the data gradients are grouped GEMMs with the weights untransposed, the weight
    gradients grouped ``x_e^T @ y_e`` GEMMs, the SwiGLU derivative one elementwise kernel.
    """

    @staticmethod
    def forward(ctx, buf, gate_up_proj, down_proj, expert_offsets, save_h):
        tiles = kernels.grouped_tiles(expert_offsets)
        act, h = kernels.grouped_swiglu(buf, gate_up_proj, expert_offsets, save_h=save_h, tiles=tiles)
        out = kernels.grouped_gemm(act, down_proj, expert_offsets, w_transposed=True, tiles=tiles)
        ctx.save_for_backward(buf, gate_up_proj, down_proj, expert_offsets, tiles, h)
        ctx.save_h = save_h
        return out

    @staticmethod
    def backward(ctx, grad_out):
        buf, gate_up_proj, down_proj, offs, tiles, h = ctx.saved_tensors
        if not ctx.save_h:
            raise RuntimeError("the expert FFN ran without keeping its activations, so it has no backward")
        grad_out = grad_out.contiguous()
        grad_act = kernels.grouped_gemm(grad_out, down_proj, offs, w_transposed=False, tiles=tiles)
        grad_h, act = kernels.swiglu_backward(h, grad_act)
        grad_buf = grad_gate_up = grad_down = None
        if ctx.needs_input_grad[0]:
            grad_buf = kernels.grouped_gemm(grad_h, gate_up_proj, offs, w_transposed=False, tiles=tiles)
        if ctx.needs_input_grad[1]:
            grad_gate_up = kernels.grouped_wgrad(grad_h, buf, offs)
        if ctx.needs_input_grad[2]:
            grad_down = kernels.grouped_wgrad(grad_out, act, offs)
        return grad_buf, grad_gate_up, grad_down, None, None


def check_experts(gate_up_proj: Tensor, down_proj: Tensor) -> None:
    """Raise unless the CUDA kernels can run these expert weights."""
    if gate_up_proj.dtype not in kernels.HALF:
        raise DTypeError(
            "the CUDA path of PEAMoE runs float16 or bfloat16 experts, got "
            f"{gate_up_proj.dtype}; convert the module with .half() or .bfloat16()"
        )
    e, h, f = down_proj.shape
    if h % 8 or f % 8:
        raise ShapeError(
            "the CUDA path of PEAMoE needs hidden_size and intermediate_size to be multiples of 8, "
            f"got {h} and {f}"
        )


def experts_forward(
    gate_up_proj: Tensor, down_proj: Tensor, hidden_states: Tensor, routing: RouterOutput
) -> Tensor:
    """``SwiGLUExperts.forward`` on CUDA tensors: [T, H] tokens through their routed experts."""
    kernels._check_device("PEAMoE", hidden_states, gate_up_proj, down_proj, routing.expert_ids)
    check_experts(gate_up_proj, down_proj)
    e = gate_up_proj.shape[0]
    x = hidden_states.to(gate_up_proj.dtype).contiguous()
    ids, offsets = routing.expert_ids, routing.token_offsets
    pair_token = kernels.pair_tokens(offsets, ids.shape[0])
    sorted_pair, sorted_token, pair_position, expert_offsets, _bad = kernels.sort_by_expert(
        ids, pair_token, e
    )
    save_h = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_states, gate_up_proj, down_proj, routing.weights)
    )
    buf = _Dispatch.apply(x, sorted_token, pair_position, offsets)
    out = _ExpertFFN.apply(buf, gate_up_proj.contiguous(), down_proj.contiguous(), expert_offsets, save_h)
    return _Combine.apply(out, routing.weights, sorted_pair, sorted_token, pair_position, pair_token, offsets)


__all__ = ["check_experts", "check_group_limited", "experts_forward", "route", "route_weights_backward"]
