import dataclasses
import math

import deepseek_rs
import numpy as np
import pytest
import reference
import torch
from deepseek_rs import DeviceError, DTypeError, InvalidValueError, RoutingConfig, ShapeError, route
from hypothesis import assume, given
from hypothesis import strategies as st


@st.composite
def logits_st(draw, max_tokens=24, max_experts=12, dtype=None):
    """Logits on a coarse grid (so exact ties are common) in float32 or float64."""
    t = draw(st.integers(0, max_tokens))
    e = draw(st.integers(1, max_experts))
    grid = draw(st.lists(st.integers(-12, 12), min_size=t * e, max_size=t * e))
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    return torch.tensor(grid, dtype=dtype).reshape(t, e) * 0.25


def assert_routing(got, want_offsets, want_ids, want_w, *, rtol=1e-5):
    torch.testing.assert_close(got.token_offsets, want_offsets)
    torch.testing.assert_close(got.expert_ids, want_ids)
    torch.testing.assert_close(got.weights.double(), want_w, rtol=rtol, atol=1e-7)
    counts = torch.bincount(want_ids, minlength=got.logits.shape[1])
    torch.testing.assert_close(got.expert_counts, counts)


@given(logits=logits_st(), k=st.integers(1, 12), renormalize=st.booleans())
def test_top_k_matches_torch(logits, k, renormalize):
    k = min(k, logits.shape[1])
    got = route(logits, "top_k", top_k=k, renormalize=renormalize)
    assert got.weights.dtype == logits.dtype
    assert_routing(got, *reference.top_k(logits, k, renormalize))


@given(
    logits=logits_st(),
    p=st.floats(0.01, 1.0),
    min_k=st.integers(1, 4),
    extra=st.integers(0, 12),
    renormalize=st.booleans(),
)
def test_top_p_matches_torch(logits, p, min_k, extra, renormalize):
    e = logits.shape[1]
    min_k = min(min_k, e)
    max_k = min(min_k + extra, e)
    (offsets, ids, w), near = reference.top_p(logits, p, min_k, max_k, renormalize)
    assume(not near.any())
    got = route(logits, "top_p", top_p=p, min_k=min_k, max_k=max_k, renormalize=renormalize)
    assert_routing(got, offsets, ids, w)
    n = got.experts_per_token
    assert bool(((n >= min_k) & (n <= max_k)).all())


@given(
    logits=logits_st(max_experts=1).filter(lambda z: z.shape[1] == 1) | logits_st(),
    data=st.data(),
    renormalize=st.booleans(),
    scale=st.sampled_from([1.0, 2.5]),
)
def test_group_limited_matches_deepseek_v3(logits, data, renormalize, scale):
    e = logits.shape[1]
    n_group = data.draw(st.sampled_from([g for g in range(1, e + 1) if e % g == 0]))
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, topk_group * (e // n_group)))
    bias = (
        torch.tensor(data.draw(st.lists(st.integers(-4, 4), min_size=e, max_size=e)), dtype=logits.dtype)
        * 0.125
    )
    got = route(
        logits,
        "group_limited",
        top_k=k,
        bias=bias,
        n_group=n_group,
        topk_group=topk_group,
        renormalize=renormalize,
        routed_scaling_factor=scale,
    )
    assert_routing(got, *reference.group_limited(logits, bias, k, n_group, topk_group, renormalize, scale))


def distinct_logits(t, e, seed):
    """Well-separated logits, so a finite-difference step never changes the selection."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g) for _ in range(t)]).double() * 0.3


@pytest.mark.parametrize("rule", ["top_k", "top_p", "group_limited"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_weight_gradient_gradcheck(rule, renormalize):
    z = distinct_logits(5, 8, seed=1).requires_grad_()
    kw = dict(top_k=3, top_p=0.6, max_k=5, renormalize=renormalize)
    if rule == "group_limited":
        bias = torch.linspace(-0.1, 0.1, 8, dtype=torch.float64)
        kw.update(n_group=2, topk_group=2, routed_scaling_factor=2.5, bias=bias)
    assert torch.autograd.gradcheck(lambda z: route(z, rule, **kw).weights, (z,))


@given(logits=logits_st(max_tokens=8), k=st.integers(1, 12))
def test_weight_gradient_matches_torch_autograd(logits, k):
    """The Rust backward equals autograd through the plain-torch formula, for any selection."""
    k = min(k, logits.shape[1])
    z = logits.double().requires_grad_()
    got = route(z, "top_k", top_k=k, renormalize=True)
    g = torch.linspace(-1, 1, got.weights.numel(), dtype=torch.float64)
    (grad,) = (
        torch.autograd.grad((got.weights * g).sum(), z) if got.weights.numel() else (torch.zeros_like(z),)
    )
    z2 = logits.double().requires_grad_()
    ids = got.expert_ids.view(-1, k)
    w = torch.softmax(z2, -1).gather(1, ids)
    w = (w / w.sum(-1, keepdim=True)).flatten()
    (want,) = torch.autograd.grad((w * g).sum(), z2) if w.numel() else (torch.zeros_like(z2),)
    torch.testing.assert_close(grad, want)


def test_edge_cases():
    # T = 0
    r = route(torch.zeros(0, 4), "top_p", top_p=0.5)
    assert r.token_offsets.tolist() == [0] and r.expert_ids.numel() == 0
    # E = 1 and k = E
    r = route(torch.randn(3, 1), "top_k", top_k=1, renormalize=True)
    assert r.expert_ids.tolist() == [0, 0, 0] and torch.allclose(r.weights, torch.ones(3))
    r = route(torch.randn(2, 5), "top_k", top_k=5)
    assert torch.allclose(r.weights.view(2, 5).sum(-1), torch.ones(2))
    # all-equal logits: ties go to the lower index; top-p takes ceil(p * E) experts
    r = route(torch.zeros(2, 8), "top_k", top_k=3)
    assert r.expert_ids.tolist() == [0, 1, 2] * 2
    r = route(torch.zeros(1, 8), "top_p", top_p=0.3)
    assert r.expert_ids.tolist() == [0, 1, 2]
    # non-contiguous input gives the same routing as its contiguous copy
    z = torch.randn(16, 6).t()
    a, b = route(z, "top_k", top_k=2), route(z.contiguous(), "top_k", top_k=2)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)
    # float16 / bfloat16 are scored in float32; gradients reach the half-precision logits
    for dtype in (torch.float16, torch.bfloat16):
        z = torch.randn(4, 6).to(dtype).requires_grad_()
        r = route(z, "top_p", top_p=0.5)
        assert r.weights.dtype == torch.float32
        r.weights.sum().backward()
        assert z.grad is not None and z.grad.dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_are_a_clear_error(bad):
    z = torch.zeros(3, 4)
    z[2, 1] = bad
    with pytest.raises(InvalidValueError, match="token 2, expert 1"):
        route(z, "top_k", top_k=2)


def test_bad_input_errors():
    with pytest.raises(ShapeError, match="2-D"):
        route(torch.zeros(4), "top_k")
    with pytest.raises(ShapeError, match="at least one expert"):
        route(torch.zeros(3, 0), "top_k")
    with pytest.raises(DTypeError, match="floating point"):
        route(torch.zeros(3, 4, dtype=torch.int64), "top_k")
    with pytest.raises(DTypeError):
        route([[0.0, 1.0]], "top_k")
    with pytest.raises(DeviceError, match="meta"):
        route(torch.zeros(3, 4, device="meta"), "top_k")
    with pytest.raises(InvalidValueError, match="top_k"):
        route(torch.zeros(3, 4), "top_k", top_k=5)
    with pytest.raises(InvalidValueError, match="top_p"):
        route(torch.zeros(3, 4), "top_p", top_p=0.0)
    with pytest.raises(InvalidValueError, match="min_k"):
        route(torch.zeros(3, 4), "top_p", min_k=3, max_k=2)
    with pytest.raises(InvalidValueError, match="n_group"):
        route(torch.zeros(3, 6), "group_limited", top_k=2, n_group=4)
    with pytest.raises(InvalidValueError, match="rule"):
        route(torch.zeros(3, 6), "top_q")
    with pytest.raises(ShapeError, match="bias"):
        route(torch.zeros(3, 6), "group_limited", bias=torch.zeros(5))
    with pytest.raises(DTypeError, match="bias"):
        route(torch.zeros(3, 6), "group_limited", bias=[0.0] * 6)
    # Every error is also the builtin a torch user expects.
    assert issubclass(ShapeError, ValueError) and issubclass(DTypeError, TypeError)
    assert issubclass(InvalidValueError, deepseek_rs.DeepseekError)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(rule="top_q"), "rule"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_k=3, max_k=2), "min_k"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor"),
        (dict(renormalize=1), "renormalize"),
        (dict(rule="group_limited", n_group=512, topk_group=1), "n_group must be at most 256"),
    ],
)
def test_routing_config_refuses_bad_values_at_construction(fields, match):
    with pytest.raises(InvalidValueError, match=match):
        RoutingConfig(**fields)


@pytest.mark.parametrize(
    "fields, experts, match",
    [
        (dict(rule="top_k", top_k=5), 4, "^top_k"),
        (dict(rule="top_p", max_k=5), 4, "^max_k"),
        (dict(rule="top_p", min_k=5), 4, "^min_k"),
        (dict(rule="group_limited", n_group=4, top_k=1), 6, "^n_group"),
        (dict(rule="group_limited", n_group=4, topk_group=1, top_k=3), 8, "^top_k"),
    ],
)
def test_layers_refuse_a_config_that_does_not_fit_their_experts_at_construction(fields, experts, match):
    config = RoutingConfig(**fields)
    with pytest.raises(InvalidValueError, match=match):
        config.check(experts)
    with pytest.raises(InvalidValueError, match=match):
        deepseek_rs.Router(8, experts, config)
    with pytest.raises(InvalidValueError, match=match):
        deepseek_rs.PEAMoE(8, 4, experts, router=config)
    with pytest.raises(InvalidValueError, match=match):
        route(torch.zeros(2, experts), config)


def test_one_config_object_and_one_default():
    config = RoutingConfig("top_k", top_k=3, renormalize=True, routed_scaling_factor=2.0)
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    by_object = route(z, config)
    by_fields = route(z, "top_k", top_k=3, renormalize=True, routed_scaling_factor=2.0)
    assert torch.equal(by_object.expert_ids, by_fields.expert_ids)
    assert torch.equal(by_object.weights, by_fields.weights)
    torch.testing.assert_close(by_object.weights.view(5, 3).sum(-1), torch.full((5,), 2.0))
    # Fields given beside a config override it; the config itself is frozen.
    assert route(z, config, top_k=1).expert_ids.numel() == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 1
    layer = deepseek_rs.PEAMoE(6, 4, 6, router=config)
    assert layer.gate.config is config
    # route, Router and PEAMoE share one default rule.
    assert RoutingConfig().rule == "top_p"
    assert deepseek_rs.Router(4, 6).config == RoutingConfig() == deepseek_rs.PEAMoE(4, 2, 6).gate.config
    peaked = torch.tensor([[9.0, 0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 0]])
    assert route(peaked).experts_per_token.tolist() == [1, 3]  # top_p=0.5: 1 expert, then 3 of 6
    with pytest.raises(InvalidValueError, match="RoutingConfig"):
        route(z, 3)


def test_routing_fields_numpy_scalars_unknown_names_and_the_router_view():
    config = RoutingConfig("top_k", top_k=np.int64(3), routed_scaling_factor=np.float32(2.0))
    assert type(config.top_k) is int and type(config.routed_scaling_factor) is float
    assert config == RoutingConfig("top_k", top_k=3, routed_scaling_factor=2.0)
    with pytest.raises(InvalidValueError, match="`scale` is now `routed_scaling_factor`"):
        route(torch.zeros(2, 4), "top_k", scale=2.0)
    with pytest.raises(InvalidValueError, match="unknown routing fields"):
        deepseek_rs.PEAMoE(8, 4, 4, top_n=2)
    router = deepseek_rs.Router(8, 4, config)
    assert (router.rule, router.top_k, router.routed_scaling_factor) == ("top_k", 3, 2.0)
    with pytest.raises(InvalidValueError, match="dataclasses.replace"):
        router.top_k = 1
    router.config = dataclasses.replace(router.config, top_k=1)
    assert router(torch.randn(5, 8)).expert_ids.numel() == 5


def test_aux_losses():
    # Perfectly balanced routing with uniform probabilities: load-balancing loss is exactly 1,
    # entropy is log(E), z-loss is log(E)^2.
    e = 4
    r = route(torch.zeros(8, e), "top_k", top_k=e)
    aux = deepseek_rs.aux_losses(r)
    assert math.isclose(aux.load_balancing.item(), 1.0, rel_tol=1e-6)
    assert math.isclose(aux.entropy.item(), math.log(e), rel_tol=1e-6)
    assert math.isclose(aux.z_loss.item(), math.log(e) ** 2, rel_tol=1e-6)
    # Collapsed routing is penalised and the losses are differentiable.
    z = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 8, requires_grad=True)
    aux = deepseek_rs.aux_losses(route(z, "top_k", top_k=1))
    assert aux.load_balancing.item() > 3.5
    (aux.load_balancing + aux.z_loss + aux.entropy).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # No tokens: zeros, not NaN.
    aux = deepseek_rs.aux_losses(route(torch.zeros(0, 4), "top_k"))
    assert all(v.item() == 0.0 for v in aux)


def test_update_bias_moves_toward_mean_load():
    router = deepseek_rs.Router(8, 4, "group_limited", top_k=1, bias_update_rate=0.01)
    router.update_bias(torch.tensor([10, 2, 5, 3]))  # mean load 5
    assert router.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.01])
    with pytest.raises(InvalidValueError):
        deepseek_rs.Router(8, 4, "top_k").update_bias(torch.zeros(4))
    with pytest.raises(ShapeError):
        router.update_bias(torch.zeros(3))
