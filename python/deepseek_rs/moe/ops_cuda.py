"""The CUDA kernels of the MoE ops, registered on the same ``torch.ops.deepseek_rs`` ops as the
Rust CPU kernels (:mod:`.ops`), so the dispatcher chooses by the tensors' device and the ops'
fake implementations and autograd formulas serve both.

The results are those of the CPU kernels (same selection, ties to the lower expert index, same
stable order of the expert-sorted buffer); only floating-point rounding differs (FP16/BF16
tensor-core GEMMs with f32 accumulation). The kernels themselves are in :mod:`deepseek_rs.cuda`
(CuPy is imported only when one runs).

Host synchronisation: one small device-to-host copy per routing (the number of routed pairs and
the first token with a non-finite logit, so that bad input raises here rather than producing
garbage), plus torch's own for the variable-width top-p compaction.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..cuda import kernels, require
from ..errors import DTypeError, InvalidValueError, ShapeError
from . import ops
from .routing import RoutingConfig


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


@ops.route.register_kernel("cuda")
def _route(logits, bias, rule, top_k, top_p, min_k, max_k, n_group, topk_group, renormalize, scale):
    require(logits.device)  # a clear error when CuPy or a usable GPU is missing
    dtype = logits.dtype
    logits = logits.float().contiguous()  # scored in float32
    t, e = logits.shape
    kernels.check_router_experts(e)
    if t >= 2**31 - 1:
        raise ShapeError(f"the CUDA router takes fewer than 2^31 - 1 tokens, got {t}")
    # The checks the Rust router makes, for a caller of the op itself (route() made them already).
    RoutingConfig(rule, top_k, top_p, min_k, max_k, renormalize, n_group, topk_group, scale).check(e)
    if rule == "group_limited":
        if bias is None:
            bias = torch.zeros(e, dtype=torch.float32, device=logits.device)
        bias = bias.to(dtype=torch.float32).contiguous()
    width = max_k if rule == "top_p" else top_k
    ids, weights, counts, bad = kernels.route_padded(
        logits,
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
        first_bad = int(bad[0])
        if first_bad < t:
            raise _non_finite(logits, bias, first_bad)
        keep = torch.arange(width, device=device) < counts[:, None]
        ids, weights = ids[keep], weights[keep]
    else:
        first_bad = int(bad.item())
        if first_bad < t:
            raise _non_finite(logits, bias, first_bad)
        offsets = torch.arange(t + 1, dtype=torch.int64, device=device) * width
        ids, weights = ids.reshape(-1), weights.reshape(-1)
    expert_counts = torch.bincount(ids, minlength=e)
    return offsets, ids, weights.to(dtype), expert_counts


@ops.route_backward.register_kernel("cuda")
def _route_backward(logits, token_offsets, expert_ids, grad_weights, scoring, renormalize, scale):
    pair_token = kernels.pair_tokens(token_offsets, expert_ids.shape[0])
    grad = route_weights_backward(logits, pair_token, expert_ids, grad_weights, scoring, renormalize, scale)
    return grad.to(logits.dtype)


@ops.sort_by_expert.register_kernel("cuda")
def _sort_by_expert(token_offsets, expert_ids, num_experts):
    pair_token = kernels.pair_tokens(token_offsets, expert_ids.shape[0])
    sorted_pair, sorted_token, pair_position, expert_offsets, bad = kernels.sort_by_expert(
        expert_ids, pair_token, num_experts
    )
    if int(bad.item()):  # those pairs were left out: the buffers would hold garbage
        raise InvalidValueError(f"expert_ids must be in 0..{num_experts - 1} (the experts)")
    return sorted_pair, sorted_token, pair_position, expert_offsets


@ops.gather_rows.register_kernel("cuda")
def _gather_rows(src, index, scale, scale_index):
    if scale is not None and scale_index is None:  # the kernel always reads scale[scale_index[r]]
        scale_index = torch.arange(index.shape[0], device=index.device)
    return kernels.gather_rows(src, index, scale, scale_index)


@ops.combine_rows.register_kernel("cuda")
def _combine_rows(buf, pair_position, token_offsets, weights):
    return kernels.combine_rows(buf, pair_position, token_offsets, weights)


@ops.combine_weight_grad.register_kernel("cuda")
def _combine_weight_grad(grad_out, buf, pair_position, token_offsets):
    pair_token = kernels.pair_tokens(token_offsets, pair_position.shape[0])
    return kernels.combine_weight_grad(grad_out, buf.to(grad_out.dtype), pair_position, pair_token)


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


@ops.expert_ffn.register_kernel("cuda")
def _expert_ffn(buf, gate_up_proj, down_proj, expert_offsets, save_h, backend="auto"):
    """Two grouped GEMMs, SwiGLU fused in the first (one CUDA path: ``backend`` names CPU ones)."""
    check_experts(gate_up_proj, down_proj)
    tiles = kernels.grouped_tiles(expert_offsets)
    gate_up_proj, down_proj = gate_up_proj.contiguous(), down_proj.contiguous()
    act, h = kernels.grouped_swiglu(buf, gate_up_proj, expert_offsets, save_h=save_h, tiles=tiles)
    out = kernels.grouped_gemm(act, down_proj, expert_offsets, w_transposed=True, tiles=tiles)
    return out, h


@ops.expert_ffn_backward.register_kernel("cuda")
def _expert_ffn_backward(
    grad_out, buf, gate_up_proj, down_proj, expert_offsets, h, weight_grads, backend="auto"
):
    """The data gradients are grouped GEMMs with the weights untransposed, the weight gradients
    grouped ``x_e^T @ y_e`` GEMMs, the SwiGLU derivative one elementwise kernel."""
    if h.shape[0] != buf.shape[0]:
        raise InvalidValueError(
            "expert_ffn ran with save_h=False, so it has no backward; run it with save_h=True"
        )
    gate_up_proj, down_proj = gate_up_proj.contiguous(), down_proj.contiguous()
    tiles = kernels.grouped_tiles(expert_offsets)
    grad_out = grad_out.contiguous()
    grad_act = kernels.grouped_gemm(grad_out, down_proj, expert_offsets, w_transposed=False, tiles=tiles)
    grad_h, act = kernels.swiglu_backward(h, grad_act)
    grad_buf = kernels.grouped_gemm(grad_h, gate_up_proj, expert_offsets, w_transposed=False, tiles=tiles)
    if not weight_grads:  # frozen experts: skip the two largest GEMMs
        return grad_buf, gate_up_proj.new_empty(0), down_proj.new_empty(0)
    grad_gate_up = kernels.grouped_wgrad(grad_h, buf, expert_offsets)
    grad_down = kernels.grouped_wgrad(grad_out, act, expert_offsets)
    return grad_buf, grad_gate_up, grad_down


__all__ = ["check_experts", "route_weights_backward"]
