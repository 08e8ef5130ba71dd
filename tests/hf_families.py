"""Tiny randomly initialised transformers MoE models of many families, built from their configs
(no download): shared by test_experts_interface.py and test_patch.py."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

V, H = 64, 32
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

# family -> (config class, config fields): every family whose experts run on our kernels
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            **MLA,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            **MLA,
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "granitemoe": (
        "GraniteMoeConfig",
        dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=24),
    ),
    "jamba": (
        "JambaConfig",
        dict(
            intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_dt_rank=4,
        ),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        dict(
            moe_intermediate_size=16,
            moe_num_experts=4,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=0,
            moe_layer_end_index=1,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            head_dim=8,
        ),
    ),
    "dots1": (
        "Dots1Config",
        dict(
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            layer_types=["full_attention"] * 2,
        ),
    ),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        dict(intermediate_size=16, num_experts=4, moe_topk=2, head_dim=8),
    ),
    "minimax": (
        "MiniMaxConfig",
        dict(
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["full_attention", "linear_attention"],
            block_size=4,
        ),
    ),
    "solar_open": (
        "SolarOpenConfig",
        dict(
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            head_dim=8,
        ),
    ),
    "exaone_moe": (
        "ExaoneMoeConfig",
        dict(
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            num_shared_experts=1,
            first_k_dense_replace=0,
            layer_types=["sliding_attention", "full_attention"],
            mlp_layer_types=["sparse", "sparse"],
            head_dim=8,
        ),
    ),
    # stored transposed ([E, H, 2F], [E, F, H]): taken as views
    "aria_text": (
        "AriaTextConfig",
        dict(intermediate_size=16, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1, head_dim=8),
    ),
}
# families whose expert math is not our SwiGLU kernel's: transformers' own experts run
FALLBACK = {
    # biases, an interleaved gate/up layout and a clamped "swiglu + 1" gate
    "gpt_oss": (
        "GptOssConfig",
        dict(
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    # a GELU gate: only the numerical probe of the gate function tells
    "mixtral_gelu": (
        "MixtralConfig",
        dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, hidden_act="gelu"),
    ),
}


def build(name, **overrides):
    """A float32 eval-mode model whose MoE blocks matter: HF zero-initialises some routers and
    its 0.02 std makes the expert outputs vanish next to the residual stream."""
    cls, fields = {**FAMILIES, **FALLBACK}[name]
    config = getattr(transformers, cls)(**{**COMMON, "intermediate_size": 48, **fields, **overrides})
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # inside the tiny vocabulary
        if getattr(config, key, None) is not None:
            setattr(config, key, 0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.1)
        for m in model.modules():
            bias = getattr(m, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.normal_(std=0.1)
    model.set_experts_implementation("eager")
    return model


def input_ids():
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
