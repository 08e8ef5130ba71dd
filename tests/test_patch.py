"""deepseek_rs.patch on tiny randomly initialised Hugging Face MoE models (no download): four
families in detail, then every family of tests/hf_families.py patched or refused."""

import copy
import dataclasses

import pytest

transformers = pytest.importorskip("transformers")

import deepseek_rs  # noqa: E402
import deepseek_rs.moe.hf  # noqa: E402
import hf_families  # noqa: E402
import torch  # noqa: E402
from deepseek_rs import InvalidValueError, PEAMoE  # noqa: E402
from torch import nn  # noqa: E402

V, H = 64, 32
COMMON = dict(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def mixtral(**kw):
    cfg = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, **kw)
    return transformers.MixtralForCausalLM(cfg)


def qwen2_moe(**kw):
    cfg = transformers.Qwen2MoeConfig(
        **COMMON,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        **kw,
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


def qwen3_moe(**kw):
    cfg = transformers.Qwen3MoeConfig(
        **COMMON, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, **kw
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def deepseek_v3(**kw):
    kw = {"first_k_dense_replace": 0, **kw}
    cfg = transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4},
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        **kw,
    )
    return transformers.DeepseekV3ForCausalLM(cfg)


MODELS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "deepseek_v3": deepseek_v3}
BLOCKS = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "deepseek_v3": "DeepseekV3MoE",
}
SHARED = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}


def build(name, **kw):
    """A float32 eval-mode model whose MoE blocks matter: HF zero-initialises some routers and
    its 0.02 std makes the expert outputs vanish next to the residual stream."""
    torch.manual_seed(0)
    model = MODELS[name](**kw).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.1)
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(std=0.1)
    return model


def input_ids():
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def moe_blocks(model, cls_name):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == cls_name}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", MODELS)
def test_patched_model_matches_and_reuses_parameters(name):
    model = build(name)
    ids = input_ids()
    want = logits(model, ids)
    old_blocks = moe_blocks(model, BLOCKS[name])
    assert len(old_blocks) == 2
    old_state = {p: b.state_dict(keep_vars=True) for p, b in old_blocks.items()}
    keys = list(model.state_dict())

    assert deepseek_rs.patch(model) is model

    assert not moe_blocks(model, BLOCKS[name])
    for path, old in old_blocks.items():
        new = model.get_submodule(path)
        assert isinstance(new, PEAMoE) and not new.training
        assert new.experts.gate_up_proj is old.experts.gate_up_proj
        assert new.experts.down_proj is old.experts.down_proj
        assert new.gate.weight is old.gate.weight
        if name == "deepseek_v3":
            assert new.gate.rule == "group_limited"
            assert new.gate.e_score_correction_bias is old.gate.e_score_correction_bias
        if name in SHARED:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert (
                    getattr(new, SHARED[name]).get_submodule(proj).weight
                    is getattr(old, SHARED[name]).get_submodule(proj).weight
                )
        if name == "qwen2_moe":
            assert new.shared_expert_gate.weight is old.shared_expert_gate.weight
        new_state = new.state_dict(keep_vars=True)
        assert new_state.keys() == old_state[path].keys()
        assert all(new_state[k] is t for k, t in old_state[path].items())
    assert sorted(model.state_dict()) == sorted(keys) and len(model.state_dict()) == len(keys)
    model.load_state_dict(model.state_dict(), strict=True)

    got = logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # The comparison is sensitive to the MoE blocks: without them, or with the routing weights
    # (renormalisation) or, for DeepSeek-V3, the selection bias changed, the logits move.
    blocks = [model.get_submodule(p) for p in old_blocks]
    hooks = [b.register_forward_hook(lambda m, i, out: torch.zeros_like(out)) for b in blocks]
    assert (logits(model, ids) - want).abs().max() > 1e-2
    for h in hooks:
        h.remove()
    for b in blocks:
        b.gate.config = dataclasses.replace(b.gate.config, renormalize=not b.gate.config.renormalize)
    assert (logits(model, ids) - want).abs().max() > 1e-3
    for b in blocks:
        b.gate.config = dataclasses.replace(b.gate.config, renormalize=not b.gate.config.renormalize)
    if name == "deepseek_v3":
        bias = [b.gate.e_score_correction_bias.clone() for b in blocks]
        for b in blocks:
            b.gate.e_score_correction_bias.zero_()
        assert (logits(model, ids) - want).abs().max() > 1e-3
        for b, v in zip(blocks, bias):
            b.gate.e_score_correction_bias.copy_(v)
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_patched_model_trains(name):
    model = deepseek_rs.patch(build(name))
    model.train()
    ids = input_ids()
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    blocks = [m for m in model.modules() if isinstance(m, PEAMoE)]
    assert len(blocks) == 2
    for b in blocks:
        params = [b.experts.gate_up_proj, b.experts.down_proj, b.gate.weight]
        if name in SHARED:
            params.append(getattr(b, SHARED[name]).down_proj.weight)
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        assert b.aux_losses is not None and all(torch.isfinite(v) for v in b.aux_losses)


@pytest.mark.parametrize("name", MODELS)
def test_patched_block_gradients_match_hf(name):
    hf = build(name).model.layers[1].mlp.train()
    ours = deepseek_rs.patch(copy.deepcopy(hf))
    assert isinstance(ours, PEAMoE) and ours.training
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, H, generator=g)
    dy = torch.randn(2, 12, H, generator=g)
    outs, grads = [], []
    for block in (hf, ours):
        xi = x.clone().requires_grad_()
        y = block(xi)
        (y * dy).sum().backward()
        outs.append(y.detach())
        grads.append({"input": xi.grad, **{n: p.grad for n, p in block.named_parameters()}})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert grads[1].keys() == grads[0].keys()
    for k, want in grads[0].items():
        assert want is not None and want.abs().sum() > 0, k
        torch.testing.assert_close(grads[1][k], want, rtol=1e-4, atol=1e-5, msg=k)


def test_shared_block_gets_one_replacement():
    block = build("qwen3_moe").model.layers[0].mlp
    holder = nn.ModuleDict({"a": block, "b": block})
    deepseek_rs.patch(holder)
    assert isinstance(holder["a"], PEAMoE) and holder["a"] is holder["b"]
    assert holder["a"].gate.weight is block.gate.weight


def test_output_router_logits_is_turned_off_with_a_warning():
    model = build("mixtral", output_router_logits=True)
    with pytest.warns(UserWarning, match="output_router_logits"):
        deepseek_rs.patch(model)
    assert model.config.output_router_logits is False
    ids = input_ids()
    assert torch.isfinite(model.train()(ids, labels=ids).loss)


@pytest.mark.parametrize(
    "model",
    [lambda: nn.Sequential(nn.Linear(4, 4)), lambda: build("deepseek_v3", first_k_dense_replace=2)],
    ids=["linear", "dense_deepseek_v3"],
)
def test_model_without_moe_blocks_raises(model):
    with pytest.raises(InvalidValueError, match="no supported MoE block"):
        deepseek_rs.patch(model())


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("mixtral", {"hidden_act": "gelu"}, "GELU"),
        ("qwen2_moe", {"hidden_act": "relu"}, "ReLU"),
        ("mixtral", {"router_jitter_noise": 0.1}, "jitter"),
    ],
)
def test_unsupported_blocks_raise_and_leave_the_model_untouched(name, kw, match):
    model = build(name, **kw)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(InvalidValueError, match=match):
        deepseek_rs.patch(model)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_expert_bias_raises():
    block = build("qwen3_moe").model.layers[0].mlp
    e, two_f, _ = block.experts.gate_up_proj.shape
    block.experts.gate_up_proj_bias = nn.Parameter(torch.zeros(e, two_f))
    with pytest.raises(InvalidValueError, match="gate_up_proj_bias"):
        deepseek_rs.patch(block)


# ---------------------------------------------------------------------------------------------
# Every family found through transformers' experts interface
# ---------------------------------------------------------------------------------------------

# softmax or sigmoid top-k routers with SwiGLU experts: patched, same logits
PATCHED = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "deepseek_v2",
    "deepseek_v3",
    "olmoe",
    "granitemoe",
    "granitemoeshared",
    "jamba",
    "glm4_moe",
    "dots1",
    "minimax",
    "solar_open",
    "exaone_moe",
]
# what PEAMoE does not compute, and the message that says so
REFUSED = {
    "ernie4_5_moe": "moe_statics.e_score_correction_bias",  # softmax plus a correction bias
    "phimoe": "router_jitter_noise",  # sparsemixer routing with jitter
    "hunyuan_v1_moe": "no linear router",  # the router's weight sits one module deeper
    "aria_text": "stored transposed",
    "gpt_oss": "expert biases",
    "mixtral_gelu": "GELUActivation",
}


def test_the_family_lists_cover_every_family_built():
    assert sorted(PATCHED + list(REFUSED)) == sorted({**hf_families.FAMILIES, **hf_families.FALLBACK})


@pytest.mark.parametrize("name", PATCHED)
def test_family_is_patched_with_its_own_tensors_and_same_logits(name):
    model = hf_families.build(name)
    ids = hf_families.input_ids()
    want = logits(model, ids)
    blocks = {p: m for p, m in model.named_modules() if deepseek_rs.moe.hf.is_moe_block(m)}
    assert blocks
    old_state = {p: b.state_dict(keep_vars=True) for p, b in blocks.items()}
    keys = sorted(model.state_dict())

    deepseek_rs.patch(model)

    for path, state in old_state.items():
        new = model.get_submodule(path)
        assert isinstance(new, PEAMoE)
        new_state = new.state_dict(keep_vars=True)
        assert new_state.keys() == state.keys() and all(new_state[k] is t for k, t in state.items())
    assert sorted(model.state_dict()) == keys
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-4, atol=1e-4)
    # the blocks matter: with their outputs zeroed the logits move
    for path in blocks:
        model.get_submodule(path).register_forward_hook(lambda m, i, out: torch.zeros_like(out))
    assert (logits(model, ids) - want).abs().max() > 1e-3


@pytest.mark.parametrize("name", REFUSED)
def test_family_patch_cannot_reproduce_is_refused_untouched(name):
    model = hf_families.build(name)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(InvalidValueError, match=REFUSED[name]):
        deepseek_rs.patch(model)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_a_router_named_router_keeps_its_name():
    model = hf_families.build("granitemoe")
    weight = model.model.layers[0].block_sparse_moe.router.weight
    deepseek_rs.patch(model)
    block = model.model.layers[0].block_sparse_moe
    assert isinstance(block, PEAMoE) and block.router is block.gate and block.gate.weight is weight
    assert "model.layers.0.block_sparse_moe.router.weight" in model.state_dict()
    assert not any(".block_sparse_moe.gate." in k for k in model.state_dict())


def test_second_patch_is_a_no_op_that_says_so():
    model = deepseek_rs.patch(build("qwen3_moe"))
    modules = dict(model.named_modules())
    with pytest.warns(UserWarning, match="already patched"):
        assert deepseek_rs.patch(model) is model
    assert dict(model.named_modules()) == modules
    block = model.model.layers[0].mlp
    with pytest.warns(UserWarning, match="already patched"):
        assert deepseek_rs.patch(block) is block


def test_patch_with_progressive_top_p_routing():
    model = build("qwen3_moe")
    ids = input_ids()
    deepseek_rs.patch(model, router="top_p", top_p=0.6, max_k=4)
    blocks = [m for m in model.modules() if isinstance(m, PEAMoE)]
    assert len(blocks) == 2
    for b in blocks:
        assert b.gate.config.rule == "top_p" and b.gate.config.top_p == 0.6 and b.gate.config.max_k == 4
        assert b.gate.config.renormalize  # kept from the block (norm_topk_prob=True)
    assert torch.isfinite(logits(model, ids)).all()
    used = torch.cat([b.last_routing.experts_per_token for b in blocks])
    assert used.min() >= 1 and used.max() <= 4 and used.unique().numel() > 1  # input-dependent


@pytest.mark.parametrize(
    "name, routing, match",
    [
        ("mixtral", dict(top_q=0.5), "unknown routing fields"),
        ("mixtral", dict(top_p=1.5), "top_p"),
        ("deepseek_v3", dict(router="top_p"), "selection bias"),
    ],
)
def test_patch_refuses_a_bad_routing_before_touching_the_model(name, routing, match):
    model = build(name)
    with pytest.raises(InvalidValueError, match=match):
        deepseek_rs.patch(model, **routing)
    assert not any(isinstance(m, PEAMoE) for m in model.modules())
