"""Plain-torch references that the Rust kernels are checked against (float64, no cleverness)."""

import torch
from torch import Tensor


def ranked(scores: Tensor) -> Tensor:
    """Expert indices of each row by descending score, ties to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def csr(ids_per_token, weights_per_token):
    offsets = [0]
    for ids in ids_per_token:
        offsets.append(offsets[-1] + len(ids))
    ids = torch.tensor([int(i) for row in ids_per_token for i in row], dtype=torch.int64)
    w = torch.tensor([float(v) for row in weights_per_token for v in row], dtype=torch.float64)
    return torch.tensor(offsets, dtype=torch.int64), ids, w


def top_k(logits: Tensor, k: int, renormalize: bool):
    probs = torch.softmax(logits.double(), dim=-1)
    ids = ranked(logits.double())[:, :k]
    w = probs.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return csr(ids.tolist(), w.tolist())


def top_p(logits: Tensor, p: float, min_k: int, max_k: int, renormalize: bool):
    """Returns the CSR and, per token, whether its cumulative mass comes within 1e-5 of p
    (where float32 and float64 arithmetic may legitimately disagree on the count)."""
    probs = torch.softmax(logits.double(), dim=-1)
    order = ranked(logits.double())
    sorted_probs = probs.gather(1, order)
    exclusive = sorted_probs.cumsum(-1) - sorted_probs
    count = (exclusive < p).sum(-1).clamp(min_k, max_k)
    near = ((sorted_probs.cumsum(-1) - p).abs() < 1e-5).any(-1)
    ids, ws = [], []
    for t in range(logits.shape[0]):
        n = int(count[t])
        w = sorted_probs[t, :n]
        ids.append(order[t, :n].tolist())
        ws.append((w / w.sum() if renormalize else w).tolist())
    return csr(ids, ws), near


def group_limited(
    logits: Tensor, bias: Tensor, k: int, n_group: int, topk_group: int, renormalize: bool, scale: float
):
    """DeepSeek-V3's router (transformers' DeepseekV3TopkRouter) with stable tie-breaking."""
    z = logits.double()
    t, e = z.shape
    s = torch.sigmoid(z)
    choice = s + bias.double()
    per_group = choice.view(t, n_group, e // n_group)
    best_two = torch.sort(per_group, dim=-1, descending=True, stable=True).values[..., : min(2, e // n_group)]
    groups = ranked(best_two.sum(-1))[:, :topk_group]
    mask = torch.zeros(t, n_group, dtype=torch.bool).scatter(1, groups, True)
    mask = mask.repeat_interleave(e // n_group, dim=1)
    ids = ranked(choice.masked_fill(~mask, float("-inf")))[:, :k]
    w = s.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return csr(ids.tolist(), (w * scale).tolist())


def swiglu_experts_dense(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """Every expert on every token: [E, T, H]."""
    f = down_proj.shape[2]
    h = torch.einsum("th,efh->etf", x, gate_up_proj)
    act = torch.nn.functional.silu(h[..., :f]) * h[..., f:]
    return torch.einsum("etf,ehf->eth", act, down_proj)


def moe(
    x: Tensor, token_offsets: Tensor, expert_ids: Tensor, weights: Tensor, gate_up_proj, down_proj
) -> Tensor:
    """Combine of the dense expert outputs with the routing as a [T, E] gate matrix."""
    t, e = x.shape[0], gate_up_proj.shape[0]
    token = torch.repeat_interleave(torch.arange(t), token_offsets.diff())
    gate = torch.zeros(t, e, dtype=weights.dtype).index_put((token, expert_ids), weights)
    return torch.einsum("te,eth->th", gate.to(x.dtype), swiglu_experts_dense(x, gate_up_proj, down_proj))
