"""experts_implementation="deepseek_rs": transformers' ExpertsInterface on deepseek-rs's ops.

Tiny randomly initialised models of many transformers families, built from their configs (no
download), float32: logits and gradients against experts_implementation="eager", and a count
of the deepseek_rs ops that ran (forward and backward), so a silent fallback cannot pass.
"""

import copy
import logging
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from deepseek_rs.moe import hf_experts  # noqa: E402
from hf_families import FALLBACK, FAMILIES, H, build, input_ids  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts the torch.ops.deepseek_rs ops that run (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("deepseek_rs::"):
            op = name.split("::")[1]
            self.calls[op] = self.calls.get(op, 0) + 1
        return func(*args, **(kwargs or {}))


def experts_modules(model):
    return [m for m in model.modules() if hf_experts.uses_experts_interface(m)]


def logits_and_grads(model):
    """Logits and the gradients of a loss on them w.r.t. every parameter."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids()).logits
    (logits.square().mean() + logits[..., :3].sum() * 1e-2).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def compare(name):
    """(eager logits, grads), (deepseek_rs logits, grads), op counts, experts modules."""
    eager = build(name)
    want = logits_and_grads(eager)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("deepseek_rs")
    assert ours.config._experts_implementation == "deepseek_rs"
    with CountOps() as counter:
        got = logits_and_grads(ours)
    return want, got, counter.calls, experts_modules(ours)


def assert_match(want, got):
    (want_logits, want_grads), (got_logits, got_grads) = want, got
    assert (got_logits - want_logits).abs().max() <= 1e-4
    assert got_grads.keys() == want_grads.keys()
    routed = [n for n in want_grads if "experts" in n and want_grads[n] is not None]
    assert routed and all(want_grads[n].abs().sum() > 0 for n in routed)  # the experts train
    for n, g in want_grads.items():
        if g is None:
            assert got_grads[n] is None, n
        else:
            torch.testing.assert_close(got_grads[n], g, rtol=1e-3, atol=1e-3, msg=n)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_runs_on_our_ops_and_matches_eager(name):
    want, got, calls, modules = compare(name)
    assert_match(want, got)
    assert modules and all(hf_experts.unsupported_reason(m) is None for m in modules)
    n = len(modules)  # each experts module ran once forward, once backward, on our ops
    for op in ("sort_by_expert", "dispatch", "expert_ffn", "combine", "expert_ffn_backward"):
        assert calls.get(op) == n, (op, calls)


@pytest.mark.parametrize("name", FALLBACK)
def test_other_expert_math_falls_back_to_transformers_once_logged(name, caplog, monkeypatch):
    monkeypatch.setattr(hf_experts, "_LOGGED", set())
    with caplog.at_level(logging.WARNING, logger=hf_experts.__name__):
        want, got, calls, modules = compare(name)
    assert_match(want, got)
    assert not calls  # none of our ops ran
    assert all(hf_experts.unsupported_reason(m) for m in modules)
    records = [r for r in caplog.records if r.name == hf_experts.__name__]
    assert len(records) == 1, [r.getMessage() for r in records]  # two modules, two calls: one line
    message = records[0].getMessage()
    assert type(modules[0]).__name__ in message and "eager" in message
    if name == "gpt_oss":
        assert "expert biases" in message and "interleaved" in message
    else:
        assert "GELUActivation" in message and "silu(gate) * up" in message


def test_a_clamped_gate_is_detected_by_the_probe():
    """DeepSeek-V4's experts clamp the gate and up projections at swiglu_limit: the flags of
    the interface say nothing, the probe of the gate function does; the fallback still equals
    the experts' eager forward."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    config = transformers.DeepseekV4Config(
        hidden_size=H, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, swiglu_limit=10.0
    )
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    experts = DeepseekV4Experts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=1.0)
    assert "silu(gate) * up" in hf_experts.unsupported_reason(experts)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, H, generator=g) * 3
    idx = torch.randint(0, 4, (10, 2), generator=g)
    w = torch.rand(10, 2, generator=g)
    want = experts(x, idx, w)
    config._experts_implementation = "deepseek_rs"
    with CountOps() as counter:
        got = experts(x, idx, w)
    assert not counter.calls
    torch.testing.assert_close(got, want)


def test_from_pretrained_with_experts_implementation_deepseek_rs(tmp_path):
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="deepseek_rs")
    assert loaded.config._experts_implementation == "deepseek_rs"
    with torch.no_grad(), CountOps() as counter:
        got = loaded.float().eval()(input_ids()).logits
        want = model(input_ids()).logits
    assert counter.calls.get("expert_ffn") == len(experts_modules(loaded))
    assert "expert_ffn_backward" not in counter.calls
    assert (got - want).abs().max() <= 1e-4


def test_inference_keeps_no_pre_activations(monkeypatch):
    """Under no_grad the expert FFN runs with save_h=False (no [N, 2F] buffer kept)."""
    model = build("mixtral")
    model.set_experts_implementation("deepseek_rs")
    seen = []
    expert_ffn = hf_experts.ops.expert_ffn

    def spy(*args):
        seen.append(args[4])
        return expert_ffn(*args)

    monkeypatch.setattr(hf_experts.ops, "expert_ffn", spy)
    with torch.no_grad():
        model(input_ids())
    model(input_ids()).logits.sum().backward()
    assert seen == [False, False, True, True]


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_registration_is_lazy_and_works_in_either_import_order():
    code = """
import sys
import deepseek_rs
assert "torch" not in sys.modules and "transformers" not in sys.modules
deepseek_rs.PEAMoE                       # imports deepseek_rs.moe
assert "transformers" not in sys.modules  # registering does not import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
assert "deepseek_rs" in ALL_EXPERTS_FUNCTIONS
assert not any(type(h).__name__ == "_RegisterOnImport" for h in sys.meta_path)  # the hook is gone
print("ok")
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    code = """
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
assert "deepseek_rs" not in ALL_EXPERTS_FUNCTIONS
import deepseek_rs.moe
assert "deepseek_rs" in ALL_EXPERTS_FUNCTIONS
print("ok")
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_without_transformers_registration_is_skipped_silently():
    code = """
import sys
sys.modules["transformers"] = None   # as if it were not installed
import deepseek_rs.moe
from deepseek_rs.moe import hf_experts
assert hf_experts.register() is False
assert not any(type(h).__name__ == "_RegisterOnImport" for h in sys.meta_path)
print("ok")
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok" and not proc.stderr, proc.stderr
