import hashlib
import os
import subprocess
import sys

import deepseek_rs
import pytest
import reference
import torch
from deepseek_rs import DeviceError, DTypeError, InvalidValueError, PEAMoE, ShapeError, route
from deepseek_rs.moe.ops import combine, dispatch, sort_by_expert
from hypothesis import given
from hypothesis import strategies as st
from torch import nn


@st.composite
def routing_st(draw):
    t = draw(st.integers(0, 20))
    e = draw(st.integers(1, 8))
    k = draw(st.integers(1, e))
    h = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64)
    return route(logits, "top_k", top_k=k), h, g


@given(routing_st())
def test_dispatch_and_combine_match_torch(case):
    r, h, g = case
    t, e = r.logits.shape
    x = torch.randn(t, h, generator=g, dtype=torch.float64)
    sorted_pair, sorted_token, pair_position, expert_offsets = sort_by_expert(
        r.token_offsets, r.expert_ids, e
    )
    # The reference: a stable sort of the pairs by expert.
    want_pair = torch.sort(r.expert_ids, stable=True).indices
    assert torch.equal(sorted_pair, want_pair)
    assert torch.equal(expert_offsets.diff(), torch.bincount(r.expert_ids, minlength=e))
    pair_token = torch.repeat_interleave(torch.arange(t), r.token_offsets.diff())
    buf = dispatch(x, sorted_token, pair_position, r.token_offsets)
    assert torch.equal(buf, x[pair_token[want_pair]])
    y = combine(buf * 2, r.weights, sorted_pair, sorted_token, pair_position, r.token_offsets)
    want = torch.zeros(t, h, dtype=torch.float64).index_add_(
        0, pair_token, 2 * x[pair_token] * r.weights[:, None]
    )
    torch.testing.assert_close(y, want)


@given(routing_st())
def test_dispatch_and_combine_gradcheck(case):
    r, h, g = case
    e = r.logits.shape[1]
    perm = sort_by_expert(r.token_offsets, r.expert_ids, e)
    sorted_pair, sorted_token, pair_position, _ = perm
    x = torch.randn(r.logits.shape[0], h, generator=g, dtype=torch.float64, requires_grad=True)
    w = r.weights.detach().clone().requires_grad_()
    scale = torch.linspace(0.5, 1.5, h, dtype=torch.float64)

    def f(x, w):
        buf = dispatch(x, sorted_token, pair_position, r.token_offsets) * scale
        return combine(buf, w, sorted_pair, sorted_token, pair_position, r.token_offsets)

    assert torch.autograd.gradcheck(f, (x, w))


def make_moe(h=16, f=8, e=6, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = PEAMoE(h, f, e, dtype=dtype, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


ROUTERS = [
    dict(router="top_k", top_k=2),
    dict(router="top_k", top_k=3, renormalize=True),
    dict(router="top_p", top_p=0.6, max_k=4),
    dict(
        router="group_limited", top_k=2, n_group=3, topk_group=2, renormalize=True, routed_scaling_factor=2.0
    ),
]


@given(
    kw=st.sampled_from(ROUTERS),
    t=st.integers(0, 24),
    shared=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_layer_matches_dense_reference(kw, t, shared, seed):
    m = make_moe(seed=seed, shared_intermediate_size=5 if shared else 0, shared_expert_gate=shared, **kw)
    x = torch.randn(t, 16, dtype=torch.float64)
    y = m(x)
    r = m.last_routing
    want = reference.moe(
        x, r.token_offsets, r.expert_ids, r.weights, m.experts.gate_up_proj, m.experts.down_proj
    )
    if shared:
        want = want + torch.sigmoid(m.shared_expert_gate(x)) * m.shared_experts(x)
    torch.testing.assert_close(y, want.detach())


@pytest.mark.parametrize("kw", ROUTERS)
def test_layer_gradcheck(kw):
    """float64 gradcheck of the whole layer: input, router, expert and shared weights."""
    m = make_moe(h=6, f=4, e=6, shared_intermediate_size=3, **kw)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())

    def f(x, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


class ArticlePEALayer(nn.Module):
    """The article's PEALayer with its errors fixed (undefined ExpertModule and hidden_dim; the
    mask multiplied the input instead of selecting tokens). Its intent: the output is the sum
    over each token's top-k experts of softmax probability times expert output. It runs every
    expert on every token, which is what PEAMoE avoids."""

    def __init__(self, hidden_dim, expert_dim, num_experts, top_k=2):
        super().__init__()
        self.experts = nn.ModuleList(deepseek_rs.SwiGLU(hidden_dim, expert_dim) for _ in range(num_experts))
        self.top_k = top_k
        self.router = nn.Linear(hidden_dim, num_experts, bias=False)

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1)
        top_k_probs, top_k_indices = probs.topk(self.top_k, dim=-1)
        gate = torch.zeros_like(probs).scatter_(-1, top_k_indices, top_k_probs)
        return sum(expert(x) * gate[..., i : i + 1] for i, expert in enumerate(self.experts))


def test_article_pea_layer_is_a_configuration_of_peamoe():
    torch.manual_seed(0)
    article = ArticlePEALayer(16, 8, 5, top_k=2).double()
    m = PEAMoE(16, 8, 5, router="top_k", top_k=2, dtype=torch.float64)
    with torch.no_grad():
        m.gate.weight.copy_(article.router.weight)
        for e, ex in enumerate(article.experts):
            m.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
            m.experts.down_proj[e].copy_(ex.down_proj.weight)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), article(x))


def test_variable_experts_per_token_and_training_step():
    m = make_moe(h=16, f=8, e=8, dtype=torch.float32, router="top_p", top_p=0.5, max_k=6)
    m.train()
    x = torch.randn(64, 16)
    y = m(x)
    n = m.last_routing.experts_per_token
    assert n.min() >= 1 and n.max() <= 6 and n.unique().numel() > 1
    aux = m.aux_losses
    assert aux is not None
    loss = y.square().mean() + 0.01 * aux.load_balancing + 1e-3 * aux.z_loss + 0.01 * aux.entropy
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    m.eval()
    with torch.no_grad():
        m(x)
    assert m.aux_losses is None
    _, aux = m(x, return_aux=True)
    assert aux.load_balancing.item() > 0


def test_edge_cases():
    m = make_moe(dtype=torch.float32, router="top_k", top_k=6, e=6)  # k = E
    x = torch.randn(0, 16, requires_grad=True)  # T = 0
    y = m(x)
    assert y.shape == (0, 16)
    y.sum().backward()
    one = make_moe(dtype=torch.float32, e=1, router="top_k", top_k=1)  # E = 1
    assert one(torch.randn(3, 16)).shape == (3, 16)
    # Non-contiguous input equals its contiguous copy.
    x = torch.randn(16, 10).t()
    torch.testing.assert_close(m(x), m(x.contiguous()))
    # bfloat16 end to end (experts in bf16, combine summed in float32).
    b = make_moe(dtype=torch.bfloat16, router="top_k", top_k=2, seed=3)
    f32 = make_moe(dtype=torch.float32, router="top_k", top_k=2, seed=3)
    f32.load_state_dict({k: v.float() for k, v in b.state_dict().items()})
    x = torch.randn(8, 16)
    torch.testing.assert_close(b(x.bfloat16()).float(), f32(x), rtol=0.05, atol=0.05)


def test_bad_input_errors():
    m = make_moe(dtype=torch.float32)
    with pytest.raises(ShapeError, match="16"):
        m(torch.randn(4, 15))
    with pytest.raises(DTypeError, match="floating point"):
        m(torch.ones(4, 16, dtype=torch.int64))
    with pytest.raises(DeviceError, match="meta"):
        m(torch.randn(4, 16, device="meta"))
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    with pytest.raises(InvalidValueError, match="finite"):
        m(x)
    with pytest.raises(InvalidValueError):
        PEAMoE(16, 8, 0)
    with pytest.raises(InvalidValueError):
        PEAMoE(16, 8, 4, shared_expert_gate=True)


DETERMINISM_SCRIPT = """
import hashlib, torch, deepseek_rs
torch.manual_seed(0)
m = deepseek_rs.PEAMoE(64, 32, 16, router="top_p", top_p=0.5, max_k=6)
x = torch.randn(700, 64, requires_grad=True)
y = m(x)
(y * torch.linspace(-1, 1, 64)).sum().backward()
h = hashlib.sha256()
for t in (y, x.grad, m.gate.weight.grad, m.experts.gate_up_proj.grad, m.experts.down_proj.grad):
    h.update(t.detach().numpy().tobytes())
print(h.hexdigest())
"""


def test_bitwise_identical_across_rayon_thread_counts():
    digests = set()
    for threads in ("1", "2"):
        # The rust backend: the tuner may choose differently in each process (its timings differ).
        env = dict(os.environ, RAYON_NUM_THREADS=threads, OMP_NUM_THREADS="1")
        env["DEEPSEEK_RS_EXPERTS_BACKEND"] = "rust"
        out = subprocess.run(
            [sys.executable, "-c", DETERMINISM_SCRIPT], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1
    assert len(next(iter(digests))) == len(hashlib.sha256().hexdigest())


def test_torch_compile_traces_around_the_custom_ops():
    torch._dynamo.reset()
    for kw in (dict(router="top_k", top_k=2), dict(router="top_p", top_p=0.5, max_k=4)):
        m = make_moe(dtype=torch.float32, **kw)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        x = torch.randn(10, 16, requires_grad=True)
        y = compiled(x)
        torch.testing.assert_close(y, m(x))
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_custom_ops_pass_opcheck():
    r = route(torch.randn(6, 5, dtype=torch.float64), "top_k", top_k=2)
    perm = sort_by_expert(r.token_offsets, r.expert_ids, 5)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.deepseek_rs.sort_by_expert.default, (r.token_offsets, r.expert_ids, 5))
    torch.library.opcheck(torch.ops.deepseek_rs.dispatch.default, (x, perm[1], perm[2], r.token_offsets))
    buf = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    w = r.weights.detach().clone().requires_grad_()
    torch.library.opcheck(
        torch.ops.deepseek_rs.combine.default, (buf, w, perm[0], perm[1], perm[2], r.token_offsets)
    )
    # gather_rows reads its scale through scale_index (the combine backward's weights by pair).
    src = torch.randn(6, 4, dtype=torch.float64)
    got = torch.ops.deepseek_rs.gather_rows(src, perm[1], w.detach(), perm[0])
    torch.testing.assert_close(got, w.detach()[perm[0], None] * src[perm[1]])
    torch.library.opcheck(torch.ops.deepseek_rs.gather_rows.default, (src, perm[1], w.detach(), perm[0]))


@pytest.mark.parametrize("weight_grads", [True, False])
def test_expert_ffn_backward_passes_opcheck_and_skips_frozen_weights(weight_grads):
    from deepseek_rs.moe import ops

    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([0, 3, 3, 7])
    buf, gu, dn = (torch.randn(*s, generator=g) for s in [(7, 8), (3, 12, 8), (3, 8, 6)])
    out, h = ops.expert_ffn(buf, gu, dn, offs, True)
    args = (torch.randn_like(out), buf, gu, dn, offs, h, weight_grads)
    torch.library.opcheck(torch.ops.deepseek_rs.expert_ffn_backward.default, args)
    grads = ops.expert_ffn_backward(*args)
    assert grads[1].numel() == (gu.numel() if weight_grads else 0)
    # Frozen experts: the layer trains the router and the input without weight gradients.
    layer = PEAMoE(8, 6, 3, router="top_k", top_k=2)
    layer.experts.requires_grad_(weight_grads)
    x = torch.randn(5, 8, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.gate.weight.grad is not None
    assert (layer.experts.gate_up_proj.grad is None) == (not weight_grads)


def test_a_trained_layer_can_be_copied_and_pickled():
    import copy
    import io

    layer = PEAMoE(8, 4, 4, router="top_p", top_p=0.6).train()
    x = torch.randn(6, 8)
    layer(x).sum().backward()
    assert layer.aux_losses is not None and layer.aux_losses.load_balancing.requires_grad
    twin = copy.deepcopy(layer)
    assert twin.aux_losses is None
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), layer.eval()(x))
        torch.testing.assert_close(loaded.eval()(x), layer(x))
