"""USS: the loss against plain references (the article's formula with its encoder and decoder
defined), its properties, the shared space, and bad input."""

import math

import pytest
import torch
from deepseek_rs import (
    DeepseekError,
    DeviceError,
    DTypeError,
    InvalidValueError,
    ShapeError,
    UnifiedSemanticSpace,
    USSLoss,
)
from deepseek_rs.training.uss import symmetric_info_nce
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F


def reference_info_nce(a, b, scale):
    """Row by row: -log softmax of the positive, in both directions."""
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    n = a.shape[0]
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(n):
            logits = [scale * float(x[i] @ y[j]) for j in range(n)]
            m = max(logits)
            total += -(logits[i] - m - math.log(sum(math.exp(v - m) for v in logits)))
    return total / n


def article_uss_loss(text_emb, image_emb, encoder, decoder, scale, dim):
    """The article's uss_loss with its undefined pieces supplied: ``decoder(x, modality)`` and
    ``encoder(x, modality)``, a temperature, and the per-embedding squared distance."""
    sim_matrix = scale * torch.matmul(text_emb, image_emb.T)
    labels = torch.arange(text_emb.size(0), device=text_emb.device)
    loss_cl = F.cross_entropy(sim_matrix, labels) + F.cross_entropy(sim_matrix.T, labels)
    recon_text = decoder(image_emb, "text")
    recon_image = decoder(text_emb, "image")
    loss_sem = F.mse_loss(text_emb, encoder(recon_text, "text")) + F.mse_loss(
        image_emb, encoder(recon_image, "image")
    )
    return 0.7 * loss_cl + 0.3 * dim * loss_sem


def paired(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


@given(st.integers(1, 7), st.integers(1, 6), st.floats(0.5, 50.0), st.integers(0, 2**16))
def test_info_nce_matches_the_row_by_row_reference(n, d, scale, seed):
    a, b = paired(n, d, seed)
    got = symmetric_info_nce(a, b, torch.tensor(scale, dtype=torch.float64))
    assert got.item() == pytest.approx(reference_info_nce(a, b, scale), rel=1e-9, abs=1e-9)


@given(st.integers(2, 7), st.integers(0, 2**16))
def test_loss_is_invariant_to_row_order_scale_and_swapping_sides(n, seed):
    a, b = paired(n, 5, seed)
    loss = USSLoss(consistency_weight=0.0)
    base = loss(a, b)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss(a[perm], b[perm]), base)
    torch.testing.assert_close(loss(3.0 * a, 0.5 * b), base)
    torch.testing.assert_close(loss(b, a), base)


def test_aligned_separated_pairs_have_near_zero_contrastive_loss():
    e = torch.eye(6)
    assert USSLoss(consistency_weight=0.0, temperature=0.01)(e, e).item() < 1e-3
    assert USSLoss(consistency_weight=0.0, temperature=0.01)(e, e.roll(1, 0)).item() > 10


@pytest.mark.parametrize("depth", [0, 2])
def test_uss_loss_is_the_articles_formula_with_the_space_as_encoder_and_decoder(depth):
    torch.manual_seed(0)
    space = UnifiedSemanticSpace({"text": 7, "image": 11}, dim=9, depth=depth).double()
    loss_fn = USSLoss(space, temperature=0.2).double()
    t = space(torch.randn(5, 7, dtype=torch.float64), "text")
    i = space(torch.randn(5, 11, dtype=torch.float64), "image")
    out = loss_fn(t, i, return_parts=True)
    want = article_uss_loss(t, i, space.encode, space.decode, 1 / 0.2, 9)
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.loss, 0.7 * out.contrastive + 0.3 * out.consistency)


def test_weights_and_plain_contrastive():
    a, b = paired(4, 3, 0)
    plain = USSLoss(consistency_weight=0.0, contrastive_weight=1.0)(a, b, return_parts=True)
    assert plain.consistency.item() == 0.0 and torch.equal(plain.loss, plain.contrastive)


def test_gradients_reach_inputs_space_and_temperature_and_pass_gradcheck():
    torch.manual_seed(0)
    space = UnifiedSemanticSpace({"text": 3, "image": 4}, dim=5, depth=1, mlp_ratio=1).double()
    loss_fn = USSLoss(space).double()
    xt = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    xi = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss_fn(space(xt, "text"), space(xi, "image")).backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.abs() > 0
    assert all(p.grad is not None for p in space.parameters())
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(space(a, "text"), space(b, "image")), (xt, xi))


def test_temperature_is_learnable_capped_or_frozen():
    loss_fn = USSLoss(consistency_weight=0.0, temperature=0.07)
    assert loss_fn.temperature == pytest.approx(0.07)
    assert [p for p in loss_fn.parameters()] == [loss_fn.logit_scale]
    with torch.no_grad():
        loss_fn.logit_scale.fill_(10.0)  # beyond log(100)
    assert loss_fn.temperature == pytest.approx(0.01)
    a, b = paired(4, 3, 1, torch.float32)
    loss_fn(a, b).backward()
    assert loss_fn.logit_scale.grad.item() == 0.0  # the cap holds it
    frozen = USSLoss(consistency_weight=0.0, learnable_temperature=False)
    assert not frozen.logit_scale.requires_grad


def test_space_embeds_any_leading_shape_onto_the_unit_sphere_and_decodes_back():
    space = UnifiedSemanticSpace({"text": 6, "audio": 2}, dim=8)
    e = space(torch.randn(2, 3, 6), "text")
    assert e.shape == (2, 3, 8)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2, 3))
    assert space.decode(e, "audio").shape == (2, 3, 2)
    assert set(space.modality_dims) == {"text", "audio"}


def test_space_state_dict_round_trip():
    a = UnifiedSemanticSpace({"text": 4, "image": 5}, dim=6)
    b = UnifiedSemanticSpace({"text": 4, "image": 5}, dim=6)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5)
    torch.testing.assert_close(a(x, "image"), b(x, "image"))


def test_training_aligns_the_pairs():
    torch.manual_seed(0)
    labels = torch.arange(32) % 8
    xt = F.one_hot(labels, 8).float() + 0.05 * torch.randn(32, 8)
    xi = torch.randn(8, 16)[labels] + 0.05 * torch.randn(32, 16)
    space = UnifiedSemanticSpace({"text": 8, "image": 16}, dim=16, depth=1)
    loss_fn = USSLoss(space)
    opt = torch.optim.Adam([*space.parameters(), *loss_fn.parameters()], lr=3e-3)
    first = None
    for _ in range(60):
        loss = loss_fn(space(xt, "text"), space(xi, "image"))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    with torch.no_grad():
        sim = space(xt, "text") @ space(xi, "image").T
    assert (labels[sim.argmax(1)] == labels).float().mean() > 0.9


def test_bad_input_names_the_problem():
    space = UnifiedSemanticSpace({"text": 4, "image": 5}, dim=6)
    with pytest.raises(InvalidValueError, match="unknown modality 'audio'"):
        space(torch.randn(2, 4), "audio")
    with pytest.raises(ShapeError, match=r"\[..., 4\]"):
        space(torch.randn(2, 5), "text")
    with pytest.raises(DTypeError, match="floating"):
        space(torch.ones(2, 4, dtype=torch.long), "text")
    with pytest.raises(ShapeError, match=r"\[..., 6\]"):
        space.decode(torch.randn(2, 4), "text")
    loss_fn = USSLoss(space)
    with pytest.raises(ShapeError, match="paired"):
        loss_fn(torch.randn(3, 6), torch.randn(2, 6))
    with pytest.raises(ShapeError, match="paired"):
        loss_fn(torch.randn(0, 6), torch.randn(0, 6))
    with pytest.raises(DTypeError):
        loss_fn(torch.ones(2, 6, dtype=torch.long), torch.randn(2, 6))
    with pytest.raises(InvalidValueError, match="modalities"):
        loss_fn(torch.randn(2, 6), torch.randn(2, 6), modalities=("text",))
    with pytest.raises(InvalidValueError, match="unknown modality"):
        loss_fn(torch.randn(2, 6), torch.randn(2, 6), modalities=("text", "video"))


def _space():
    return UnifiedSemanticSpace({"text": 4, "image": 5}, dim=6)


# Each bad call, the DeepseekError it raises and what its message says.
BAD_CALLS = {
    "features not a tensor": (
        lambda s, f: s([[0.0] * 4] * 2, "text"),
        DTypeError,
        "features must be a torch",
    ),
    "modality not a str": (
        lambda s, f: s(torch.randn(2, 4), ["text"]),
        InvalidValueError,
        "unknown modality",
    ),
    "float64 features, float32 space": (
        lambda s, f: s(torch.randn(2, 4, dtype=torch.float64), "text"),
        DTypeError,
        "features is torch.float64 but the space's parameters are torch.float32",
    ),
    "features on another device": (
        lambda s, f: s(torch.randn(2, 4, device="meta"), "text"),
        DeviceError,
        "features is on meta, the space's parameters on cpu",
    ),
    "embedding not a tensor": (lambda s, f: s.decode(None, "text"), DTypeError, "embedding must be a torch"),
    "integer embedding": (
        lambda s, f: s.decode(torch.ones(2, 6, dtype=torch.int32), "image"),
        DTypeError,
        "embedding must be floating point",
    ),
    "a not a tensor": (lambda s, f: f([[0.0] * 6] * 2, torch.randn(2, 6)), DTypeError, "a must be a torch"),
    "integer b": (
        lambda s, f: f(torch.randn(2, 6), torch.ones(2, 6, dtype=torch.long)),
        DTypeError,
        "b must be floating point, got torch.int64",
    ),
    "a and b of two dtypes": (
        lambda s, f: f(torch.randn(2, 6), torch.randn(2, 6, dtype=torch.float64)),
        DTypeError,
        "a and b must have one dtype",
    ),
    "a and b float64, space float32": (
        lambda s, f: f(torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)),
        DTypeError,
        "but the space's parameters are torch.float32",
    ),
    "mismatched batch sizes": (lambda s, f: f(torch.randn(3, 6), torch.randn(2, 6)), ShapeError, "paired"),
    "1-D embeddings": (lambda s, f: f(torch.randn(6), torch.randn(6)), ShapeError, "paired"),
    "embeddings not of the space's width": (
        lambda s, f: f(torch.randn(2, 7), torch.randn(2, 7)),
        ShapeError,
        r"embeddings of the space, \[B, 6\]",
    ),
    "a and b on two devices": (
        lambda s, f: f(torch.randn(2, 6), torch.randn(2, 6, device="meta")),
        DeviceError,
        "a is on cpu and b on meta",
    ),
    "a and b on another device than the space": (
        lambda s, f: f(torch.randn(2, 6, device="meta"), torch.randn(2, 6, device="meta")),
        DeviceError,
        "the space's parameters on cpu",
    ),
    "a and b on another device than the temperature": (
        lambda s, f: f.to("meta")(torch.randn(2, 6), torch.randn(2, 6)),
        DeviceError,
        "the temperature is on meta",
    ),
    "a modality that is not a str": (
        lambda s, f: f(torch.randn(2, 6), torch.randn(2, 6), modalities=(["text"], "image")),
        InvalidValueError,
        "modalities must be a pair",
    ),
    "info_nce of unpaired embeddings": (
        lambda s, f: symmetric_info_nce(torch.randn(2, 6), torch.randn(3, 6), torch.tensor(1.0)),
        ShapeError,
        "paired",
    ),
    "info_nce of integers": (
        lambda s, f: symmetric_info_nce(
            torch.ones(2, 6, dtype=torch.long), torch.randn(2, 6), torch.tensor(1.0)
        ),
        DTypeError,
        "a must be floating point",
    ),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_every_bad_call_is_a_deepseek_error_naming_the_problem(case):
    call, error, match = BAD_CALLS[case]
    space = _space()
    with pytest.raises(error, match=match) as e:
        call(space, USSLoss(space))
    assert isinstance(e.value, DeepseekError)


def test_autocast_inputs_of_another_dtype_are_accepted():
    space = _space()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = space(torch.randn(2, 4, dtype=torch.bfloat16), "text")
    assert emb.shape == (2, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"consistency_weight": 0.3}, "needs the UnifiedSemanticSpace"),
        ({"consistency_weight": 0.0, "contrastive_weight": 0.0}, "both 0"),
        ({"consistency_weight": 0.0, "temperature": float("nan")}, "temperature"),
        ({"consistency_weight": 0.0, "temperature": "0.07"}, "temperature"),
        ({"consistency_weight": 0.0, "max_logit_scale": float("nan")}, "max_logit_scale"),
        ({"consistency_weight": 0.0, "learnable_temperature": "yes"}, "learnable_temperature"),
        ({"consistency_weight": "0.3"}, "consistency_weight"),
        ({"consistency_weight": 0.0, "contrastive_weight": -1}, "contrastive_weight"),
        ({"consistency_weight": float("nan")}, "consistency_weight"),
        ({"consistency_weight": 0.0, "temperature": 0.0}, "temperature"),
        ({"consistency_weight": 0.0, "temperature": float("inf")}, "temperature"),
        ({"consistency_weight": 0.0, "max_logit_scale": 1.0}, "max_logit_scale"),
    ],
)
def test_bad_loss_arguments(kwargs, match):
    with pytest.raises(InvalidValueError, match=match):
        USSLoss(**kwargs)


def test_the_space_must_be_a_space():
    with pytest.raises(DTypeError, match="space must be a UnifiedSemanticSpace or None, got str"):
        USSLoss("space", consistency_weight=0.0)


@pytest.mark.parametrize(
    "args, match",
    [
        (({},), "non-empty"),
        (({"text": 0},), "modality_dims"),
        (({"two words": 3},), "identifier"),
        (({"text": 3}, 0), "dim"),
        (({"text": 3}, 4, -1), "depth"),
        (({"text": 3}, 4, 1, 0), "mlp_ratio"),
        (({"text": 3}, 4, 1, 1, 1.0), "dropout"),
        (({"text": 3}, 4, 1, 1, float("nan")), "dropout"),
        (({"text": 3}, 4, 1, 1, "0.1"), "dropout"),
        (({"text": 3.0},), "modality_dims"),
    ],
)
def test_bad_space_arguments(args, match):
    with pytest.raises(InvalidValueError, match=match):
        UnifiedSemanticSpace(*args)
