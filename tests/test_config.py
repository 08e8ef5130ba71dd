import pytest
import torch
from deepseek_rs import DeviceError, InvalidValueError, PEAMoE
from deepseek_rs.config import (
    BatchingConfig,
    HardwareConfig,
    OptimizationConfig,
    QuantizationConfig,
    parse_config,
    sample_config_path,
)
from deepseek_rs.optimization import optimize
from deepseek_rs.quant import Int8Linear, QATLinear
from torch import nn

ARTICLE = """
optimization:
  quantization:
    method: QAT
    bit_width: 8
    activation_range: dynamic
  batching:
    strategy: dynamic
    min_size: 4
    max_size: 32
  hardware:
    target: nvidia_tesla_t4
    precision: mixed
"""


def test_the_articles_block_parses_and_equals_the_shipped_sample():
    want = OptimizationConfig(
        QuantizationConfig("QAT", 8, "dynamic"),
        BatchingConfig("dynamic", 4, 32, 5.0),
        HardwareConfig("nvidia_tesla_t4", "mixed"),
    )
    assert parse_config(ARTICLE) == want
    assert parse_config(sample_config_path()) == want
    assert parse_config(str(sample_config_path())) == want


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "optimization: {quantisation: {}}",
            r"unknown key optimization\.quantisation; allowed keys: \['batching', 'hardware', 'quant"
        ),
        ("optimization: {quantization: {method: AWQ}}", r"quantization\.method: .*'QAT' or 'PTQ', got 'AWQ'"),
        (
            "optimization: {quantization: {bit_width: 4}}",
            r"quantization\.bit_width: input should be 8, got 4",
        ),
        (
            "optimization: {quantization: {activation_range: static}}",
            r"activation_range: input should be 'dyn",
        ),
        (
            "optimization: {batching: {min_size: 0}}",
            r"batching\.min_size: .*greater than or equal to 1, got 0",
        ),
        (
            "optimization: {batching: {min_size: 8, max_size: 4}}",
            r"optimization\.batching: min_size must be in 1\.\.=max_size \(4\)",
        ),
        (
            "optimization: {batching: {max_size: 0}}",
            r"batching\.max_size: .*greater than or equal to 1, got 0",
        ),
        ("optimization: {batching: {min_size: -1}}", r"batching\.min_size: .*greater than or equal to 1"),
        ("optimization: {quantization: {bit_width: 8.0}}", r"bit_width must be an integer, got 8\.0"),
        (
            "optimization: {batching: {strategy: greedy}}",
            r"batching\.strategy: input should be 'dynamic' or 'none'",
        ),
        (
            "optimization: {batching: {max_queue_delay_ms: -1}}",
            r"max_queue_delay_ms: .*greater than or equal to 0",
        ),
        ("optimization: {hardware: {target: tpu}}", r"hardware\.target: input should be 'cpu', 'cuda'"),
        ("optimization: {hardware: {precision: int4}}", r"hardware\.precision: input should be 'fp32'"),
        ("optimization: {hardware: {target: cpu, cores: 2}}", r"unknown key optimization\.hardware\.cores"),
        ("optimization: [1, 2]", r"optimization: input should be a mapping"),
        ("optimization: {batching: {max_size: 3.5}}", r"max_size: input should be a valid integer, got 3\.5"),
        ("optimization: {quantization: {method: [}", r"not valid YAML"),
        # booleans are not numbers, strings are not numbers
        (
            "optimization: {batching: {min_size: true}}",
            r"batching\.min_size: input should be a valid integer, got True",
        ),
        (
            "optimization: {batching: {max_queue_delay_ms: true}}",
            r"max_queue_delay_ms: .*valid number, got True",
        ),
        ("optimization: {batching: {max_size: '8'}}", r"batching\.max_size: .*valid integer, got '8'"),
        (
            "optimization: {batching: {max_queue_delay_ms: .inf}}",
            r"max_queue_delay_ms: input should be a finite",
        ),
    ],
)
def test_every_bad_field_is_named(text, match):
    with pytest.raises(InvalidValueError, match=match):
        parse_config(text)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InvalidValueError, match="does not exist"):
        parse_config(tmp_path / "nope.yaml")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), PEAMoE(16, 8, 4, router="top_k", top_k=2), nn.Linear(16, 2))


def test_qat_config_trains_then_deploys_int8():
    cfg = {"quantization": {"method": "QAT"}, "hardware": {"target": "cpu", "precision": "fp32"}}
    model = _model()
    trained = optimize(model, cfg, stage="train")
    assert isinstance(model[0], QATLinear) and trained.module is model
    x = torch.randn(10, 8)
    trained(x).sum().backward()
    with torch.no_grad():
        ref = trained(x)
    deployed = optimize(model, cfg, stage="deploy")
    assert isinstance(model[0], Int8Linear)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), ref, rtol=1e-4, atol=1e-5)


def test_qat_deploy_without_training_is_refused_and_ptq_is_not():
    with pytest.raises(InvalidValueError, match="stage='train'"):
        optimize(_model(), {"quantization": {"method": "QAT"}}, stage="deploy")
    model = _model()
    opt = optimize(model, {"quantization": {"method": "PTQ"}})
    assert isinstance(model[2], Int8Linear) and not opt.training


def test_auto_stage_trains_then_deploys_a_qat_config():
    # The literal call, optimize(model, "optimization.yaml"), applies QAT first; the same
    # call after fine-tuning deploys int8.
    model = _model().train()
    cfg = {"quantization": {"method": "QAT"}}
    optimize(model, cfg)
    assert isinstance(model[0], QATLinear) and model.training
    opt = optimize(model, cfg)
    assert isinstance(model[0], Int8Linear) and not opt.module.training


def test_deploy_without_quantization_is_in_eval_mode():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)).train()
    opt = optimize(model, {"hardware": {"target": "cpu"}}, stage="deploy")
    assert not opt.module.training


def test_a_hand_built_config_is_validated():
    from deepseek_rs.config import OptimizationConfig, QuantizationConfig

    with pytest.raises(InvalidValueError, match=r"quantization\.method: .*'QAT' or 'PTQ', got 'AWQ'"):
        optimize(_model(), OptimizationConfig(QuantizationConfig(method="AWQ", bit_width=4)))


def test_mixed_precision_on_the_cpu_is_bfloat16():
    opt = optimize(_model(), {"hardware": {"target": "cpu", "precision": "mixed"}})
    assert opt.autocast_dtype == torch.bfloat16
    with torch.no_grad():
        y = opt(torch.randn(4, 8))
    assert y.shape == (4, 2) and y.dtype == torch.bfloat16  # float32 if autocast were off


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a CUDA device")
def test_a_gpu_target_without_a_gpu_is_a_clear_error_unless_overridden():
    with pytest.raises(DeviceError, match="nvidia_tesla_t4.*device='cpu'"):
        optimize(_model(), sample_config_path(), stage="train")
    opt = optimize(_model(), sample_config_path(), stage="train", device="cpu")
    assert opt.device.type == "cpu" and opt.autocast_dtype == torch.bfloat16


def test_the_batching_section_configures_the_batcher():
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    cfg = {"batching": {"strategy": "dynamic", "min_size": 2, "max_size": 6, "max_queue_delay_ms": 20}}
    opt = optimize(model, cfg)
    with opt.batcher(max_queue_size=50) as batcher:
        assert batcher.config()["min_size"] == 2 and batcher.config()["max_size"] == 6
        assert batcher.config()["max_queue_delay"] == pytest.approx(0.02)
        assert batcher.config()["max_queue_size"] == 50
        xs = [torch.randn(8) for _ in range(12)]
        outs = [f.result(timeout=30) for f in [batcher.submit(x) for x in xs]]
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(outs), model(torch.stack(xs)))
    assert max(n for n, c in enumerate(batcher.metrics()["batch_sizes"]) if c) <= 6
    with optimize(model, {"batching": {"strategy": "none"}}).batcher() as batcher:
        assert batcher.config()["max_size"] == 1
    with optimize(model, {}).batcher() as batcher:  # no section: the article's defaults
        assert (batcher.config()["min_size"], batcher.config()["max_size"]) == (4, 32)


def test_an_int8_model_is_served_through_its_batcher():
    # A fully quantized model has no float parameters left; the batcher still takes float input.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(6, 8)
    opt = optimize(model, {"quantization": {"method": "PTQ"}, "batching": {"min_size": 1, "max_size": 4}})
    with torch.no_grad():
        want = opt(x)
    with opt.batcher() as batcher:
        got = torch.stack([f.result(timeout=30) for f in [batcher.submit(row) for row in x]])
    torch.testing.assert_close(got, want)
