"""deepseek_rs.patch_attention on tiny randomly initialised Hugging Face models (no download)."""

import copy
import warnings

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from deepseek_rs import (  # noqa: E402
    DynamicAttention,
    InvalidValueError,
    dense_warmup,
    gate_warmup,
    patch_attention,
)
from deepseek_rs.attention import gate_losses  # noqa: E402

V = 97
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def llama(**kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, **kw))


def qwen2(**kw):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, **kw))


def qwen3(**kw):
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=8, **kw))


MODELS = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}


def batch(t=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, t), generator=gen)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_block_selected_computes_the_original_model(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids, mask = batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    patched = patch_attention(copy.deepcopy(model), block_size=8, top_k=5)
    dars = [m for m in patched.modules() if isinstance(m, DynamicAttention)]
    assert len(dars) == 2 and patched.config._attn_implementation == "deepseek_rs_dar"
    with torch.no_grad():
        got = patched(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_greedy_generation_with_kv_cache_matches_the_original():
    torch.manual_seed(1)
    model = llama().eval()
    ids, mask = batch(t=21)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        got = patch_attention(copy.deepcopy(model), block_size=4, top_k=100).generate(ids, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sparse_model_fine_tunes_with_the_gate_loss(name):
    torch.manual_seed(2)
    # top_k=2: the sparse KL runs over the selected routable blocks, so one routed block gives it nothing
    model = patch_attention(MODELS[name](), block_size=4, top_k=2, local_blocks=0, sink_block=True).train()
    ids, mask = batch(t=48)
    dar = next(m for m in model.modules() if isinstance(m, DynamicAttention))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        gate = gate_losses(model)
        assert gate.item() > 0
        opt.zero_grad()
        (out.loss + gate).backward()
        assert dar.gate.q_proj.grad is not None and dar.gate.q_proj.grad.abs().sum() > 0
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    sel = dar.last_selection.block_indices
    assert sel.shape[-1] <= 4  # own + sink + two routed blocks
    model.eval()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_dense_warmup_computes_the_original_model_and_trains_the_gates():
    torch.manual_seed(3)
    model = llama().eval()
    ids, mask = batch(t=48)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    patched = patch_attention(copy.deepcopy(model), block_size=4, top_k=1, local_blocks=1).train()
    with dense_warmup(patched):
        got = patched(ids, attention_mask=mask).logits
        gate = gate_losses(patched)
        gate.backward()
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    dars = [m for m in patched.modules() if isinstance(m, DynamicAttention)]
    assert gate.item() > 0 and all(m.gate.k_proj.grad.abs().sum() > 0 for m in dars)
    assert not any(m.warmup for m in dars)
    with torch.no_grad():
        sparse = patched(ids, attention_mask=mask).logits
    assert not torch.allclose(sparse[real], want[real], rtol=1e-4, atol=1e-4)


def test_state_dict_gains_only_the_gates():
    model = llama()
    before = set(model.state_dict())
    patch_attention(model)
    added = set(model.state_dict()) - before
    assert added == {
        f"model.layers.{i}.self_attn.dynamic_attention.gate.{p}"
        for i in range(2)
        for p in ("q_proj", "k_proj")
    }


def test_refusals():
    with pytest.raises(InvalidValueError, match="no supported attention"):
        patch_attention(torch.nn.Linear(2, 2))
    model = llama(attention_dropout=0.1)
    with pytest.raises(InvalidValueError, match="attention_dropout"):
        patch_attention(model)
    assert not any(isinstance(m, DynamicAttention) for m in model.modules())
    with pytest.raises(InvalidValueError, match="rule"):
        patch_attention(llama(), rule="dense")


def test_sparse_cached_decoding_equals_the_full_forward_and_is_causal():
    torch.manual_seed(3)
    model = patch_attention(llama(), block_size=4, top_k=1, local_blocks=0, sink_block=False).eval()
    ids = batch(t=40)[0][:1]
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :20], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(20, 40):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
        changed = ids.clone()
        changed[0, 39] = (ids[0, 39] + 1) % V  # the last token may not change any earlier logit
        assert torch.equal(model(changed).logits[:, :39], full[:, :39])


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_the_gates_or_warns(reentrant):
    torch.manual_seed(4)
    model = patch_attention(llama(), block_size=4, top_k=2, local_blocks=0, sink_block=True).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids, _ = batch(t=48)
    with gate_warmup(model) as gates:
        model(ids)
        if reentrant:  # the checkpointed forward ran under no_grad: no gate loss, and a warning
            with pytest.warns(RuntimeWarning, match="reentrant"):
                assert gate_losses(model).item() == 0.0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                loss = gate_losses(model)
            loss.backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
