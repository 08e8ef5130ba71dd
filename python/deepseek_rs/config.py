"""The article's deployment configuration, read and applied.

The article deploys with this YAML block (shipped as ``deepseek_rs/data/optimization.yaml``)::

    optimization:
      quantization:
        method: QAT            # QAT (fake-quantized training, then int8) or PTQ (int8 now)
        bit_width: 8           # int8 is the only width with fast kernels here
        activation_range: dynamic   # per-row ranges measured at run time, no calibration
      batching:
        strategy: dynamic      # dynamic (a DynamicBatcher) or none
        min_size: 4            # requests a batch waits for, never past max_queue_delay_ms
        max_size: 32           # requests per batch at most
        max_queue_delay_ms: 5  # optional; how long a batch may wait for min_size
      hardware:
        target: nvidia_tesla_t4   # where the model runs: cpu, cuda, or an NVIDIA GPU name
        precision: mixed          # fp32, mixed, fp16 or bf16

``optimize(model, config)`` validates every field (an unknown key or value raises
``InvalidValueError`` naming it and the allowed values) and returns an ``OptimizedModel``;
its ``batcher()`` serves it through a ``DynamicBatcher`` configured by the ``batching``
section. Every section is optional.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch
from torch import nn

from . import _core
from .errors import DeviceError, InvalidValueError
from .moe import SwiGLUExperts
from .quant import convert_int8, prepare_qat

if TYPE_CHECKING:
    from .batching import DynamicBatcher

QUANT_METHODS = ("QAT", "PTQ")
BIT_WIDTHS = (8,)
ACTIVATION_RANGES = ("dynamic",)
BATCHING_STRATEGIES = ("dynamic", "none")
PRECISIONS = ("fp32", "mixed", "fp16", "bf16")
# NVIDIA targets run on CUDA; the name decides mixed precision's dtype (no bf16 before Ampere).
GPU_TARGETS = {
    "cuda": torch.bfloat16,
    "nvidia_tesla_t4": torch.float16,
    "nvidia_tesla_v100": torch.float16,
    "nvidia_a10": torch.bfloat16,
    "nvidia_a100": torch.bfloat16,
    "nvidia_l4": torch.bfloat16,
    "nvidia_h100": torch.bfloat16,
    "nvidia_h200": torch.bfloat16,
}
TARGETS = ("cpu", *GPU_TARGETS)


@dataclass(frozen=True)
class QuantizationConfig:
    method: str = "QAT"
    bit_width: int = 8
    activation_range: str = "dynamic"


@dataclass(frozen=True)
class BatchingConfig:
    strategy: str = "dynamic"
    min_size: int = 4
    max_size: int = 32
    max_queue_delay_ms: float = 5.0


@dataclass(frozen=True)
class HardwareConfig:
    target: str = "cpu"
    precision: str = "fp32"


@dataclass(frozen=True)
class OptimizationConfig:
    quantization: Optional[QuantizationConfig] = None
    batching: Optional[BatchingConfig] = None
    hardware: Optional[HardwareConfig] = None


def _choice(where: str, value: Any, allowed) -> Any:
    if value not in allowed:
        raise InvalidValueError(f"{where} must be one of {list(allowed)}, got {value!r}")
    return value


def _keys(where: str, section: Any, allowed) -> Mapping[str, Any]:
    if not isinstance(section, Mapping):
        raise InvalidValueError(f"{where} must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            raise InvalidValueError(f"unknown key {where}.{key}; allowed keys: {list(allowed)}")
    return section


def _int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidValueError(f"{where} must be an integer >= {low}, got {value!r}")
    return value


def parse_config(source: Union[str, Path, Mapping[str, Any]]) -> OptimizationConfig:
    """Read and validate a configuration: a YAML file path, a YAML string, or a mapping.

    The top level is ``{"optimization": {...}}`` as in the article; the inner mapping alone
    is accepted too.
    """
    if isinstance(source, Mapping):
        raw: Any = source
    else:
        import yaml

        text = source
        looks_like_path = isinstance(source, str) and "\n" not in source and (
            ":" not in source or Path(source).is_file()
        )
        if isinstance(source, Path) or looks_like_path:
            path = Path(source)
            if not path.is_file():
                raise InvalidValueError(f"optimization config file {str(path)!r} does not exist")
            text = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidValueError(f"optimization config is not valid YAML: {e}") from None
    if isinstance(raw, Mapping) and "optimization" in raw:
        _keys("the config", raw, ("optimization",))
        raw = raw["optimization"]
    raw = _keys("optimization", raw if raw is not None else {}, ("quantization", "batching", "hardware"))

    quantization = batching = hardware = None
    if raw.get("quantization") is not None:
        where = "optimization.quantization"
        q = _keys(where, raw["quantization"], ("method", "bit_width", "activation_range"))
        d = QuantizationConfig()
        bits = q.get("bit_width", d.bit_width)
        quantization = QuantizationConfig(
            method=_choice(f"{where}.method", q.get("method", d.method), QUANT_METHODS),
            bit_width=_choice(f"{where}.bit_width", _int(f"{where}.bit_width", bits, 1), BIT_WIDTHS),
            activation_range=_choice(
                f"{where}.activation_range", q.get("activation_range", d.activation_range), ACTIVATION_RANGES
            ),
        )
    if raw.get("batching") is not None:
        where = "optimization.batching"
        b = _keys(where, raw["batching"], ("strategy", "min_size", "max_size", "max_queue_delay_ms"))
        d2 = BatchingConfig()
        min_size = _int(f"{where}.min_size", b.get("min_size", d2.min_size), 1)
        max_size = _int(f"{where}.max_size", b.get("max_size", d2.max_size), 1)
        delay = b.get("max_queue_delay_ms", d2.max_queue_delay_ms)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < float("inf"):
            raise InvalidValueError(f"{where}.max_queue_delay_ms must be a number >= 0, got {delay!r}")
        # The scheduler owns the rules relating the sizes; its message gets the YAML path.
        try:
            _core.Scheduler(min_size=min_size, max_size=max_size, max_queue_delay=delay / 1000.0)
        except InvalidValueError as e:
            raise InvalidValueError(f"{where}: {e}") from None
        batching = BatchingConfig(
            strategy=_choice(f"{where}.strategy", b.get("strategy", d2.strategy), BATCHING_STRATEGIES),
            min_size=min_size,
            max_size=max_size,
            max_queue_delay_ms=float(delay),
        )
    if raw.get("hardware") is not None:
        where = "optimization.hardware"
        h = _keys(where, raw["hardware"], ("target", "precision"))
        d3 = HardwareConfig()
        hardware = HardwareConfig(
            target=_choice(f"{where}.target", h.get("target", d3.target), TARGETS),
            precision=_choice(f"{where}.precision", h.get("precision", d3.precision), PRECISIONS),
        )
    return OptimizationConfig(quantization, batching, hardware)


def sample_config_path() -> Path:
    """The article's example configuration, shipped with the package."""
    return Path(str(resources.files("deepseek_rs") / "data" / "optimization.yaml"))


class OptimizedModel(nn.Module):
    """A model prepared by ``optimize``: it runs ``module`` under the configured precision.

    ``config`` is the validated configuration, ``device`` where the module lives and
    ``autocast_dtype`` the reduced precision of ``mixed`` (None: full precision).
    """

    def __init__(self, module: nn.Module, config: OptimizationConfig, device: torch.device, autocast_dtype):
        super().__init__()
        self.module, self.config, self.device = module, config, device
        self.autocast_dtype = autocast_dtype
        self.train(module.training)  # a deployed (eval) model gives an eval wrapper

    def precision(self):
        """The autocast context of the configured precision (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision():
            return self.module(*args, **kwargs)

    def batcher(self, **kwargs: Any) -> DynamicBatcher:
        """A ``DynamicBatcher`` serving this model as the config's ``batching`` section says
        (the article's defaults, min 4 / max 32 / 5 ms, when the section is absent).

        Keyword arguments set the options the YAML does not have (``collate``, ``item_shape``,
        ``max_queue_size``, ``timeout``, ...) or override it. Use it as a context manager.
        """
        from .batching import DynamicBatcher

        return DynamicBatcher.from_config(self, self.config.batching or BatchingConfig(), **kwargs)


def _resolve_hardware(hw: HardwareConfig, device: Optional[Union[str, torch.device]]):
    if device is not None:
        dev = torch.device(device)
    elif hw.target == "cpu":
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"optimization.hardware.target {hw.target!r} needs a CUDA device and none is available; "
            "pass device='cpu' to optimize() to run this config on the CPU"
        )
    if hw.precision == "fp32":
        dtype = None
    elif hw.precision == "fp16":
        dtype = torch.float16
    elif hw.precision == "bf16":
        dtype = torch.bfloat16
    elif dev.type == "cuda":  # mixed
        dtype = GPU_TARGETS.get(hw.target, torch.bfloat16)
    else:
        dtype = torch.bfloat16  # CPU autocast computes in bfloat16
    return dev, dtype


def optimize(
    model: nn.Module,
    config: Union[str, Path, Mapping[str, Any], OptimizationConfig],
    *,
    stage: str = "auto",
    device: Optional[Union[str, torch.device]] = None,
) -> OptimizedModel:
    """Apply an optimization config to ``model`` (modified in place) and wrap it.

    ``stage="train"`` prepares the model for quantization-aware training (fake-quantized
    ``QATLinear`` / experts; train it, then call ``optimize`` again with ``stage="deploy"``).
    ``stage="deploy"`` converts it to int8 inference modules and puts it in eval mode: after
    QAT this deploys what was trained; on a float model with ``method: PTQ`` it is
    post-training quantization, and with ``method: QAT`` it refuses, because QAT means the
    model must be trained first. ``stage="auto"`` (the default) is ``train`` for a ``QAT``
    config on a model not yet prepared for QAT and ``deploy`` otherwise, so the same call
    before and after fine-tuning does each step.
    ``device`` overrides the device of ``hardware.target`` (e.g. run a T4 config on the CPU).
    Quantized int8 products run on the CPU (``torch._int_mm``); mixed precision then applies
    to the layers that stay in floating point.
    """
    from .quant import QATLinear, QATSwiGLUExperts

    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"optimize needs an nn.Module, got {type(model).__name__}")
    # A hand-built OptimizationConfig goes through the same validation as a YAML file.
    cfg = parse_config(_as_mapping(config) if isinstance(config, OptimizationConfig) else config)
    _choice("stage", stage, ("auto", "train", "deploy"))
    hw = cfg.hardware or HardwareConfig()
    dev, dtype = _resolve_hardware(hw, device)
    q = cfg.quantization
    has_qat = any(isinstance(m, (QATLinear, QATSwiGLUExperts)) for m in model.modules())
    if stage == "auto":
        stage = "train" if q is not None and q.method == "QAT" and not has_qat else "deploy"
    if q is not None:
        # Fake quantization of Linear layers is plain torch and trains on any device; the
        # experts' fake quantization and every int8 product run on the CPU.
        on_cpu_only = stage == "deploy" or any(isinstance(m, SwiGLUExperts) for m in model.modules())
        if dev.type != "cpu" and on_cpu_only:
            what = "int8 inference" if stage == "deploy" else "QAT of MoE experts"
            raise DeviceError(f"{what} runs on the CPU here, not on {dev}: pass device='cpu'")
        if stage == "train":
            if q.method != "QAT":
                raise InvalidValueError(f"stage='train' is for method QAT, the config says {q.method!r}")
            prepare_qat(model)
        elif q.method == "QAT" and not has_qat:
            raise InvalidValueError(
                "method QAT deploys a model trained with fake quantization: run optimize(model, config, "
                "stage='train') and fine-tune first, or use method PTQ to quantize the float model as is"
            )
        else:
            convert_int8(model)
    if stage == "deploy":
        model.eval()
    model.to(dev)
    return OptimizedModel(model, cfg, dev, dtype)


def _as_mapping(cfg: OptimizationConfig) -> Mapping[str, Any]:
    return {name: dataclasses.asdict(section) for name, section in vars(cfg).items() if section is not None}


__all__ = [
    "BatchingConfig",
    "HardwareConfig",
    "OptimizationConfig",
    "OptimizedModel",
    "QuantizationConfig",
    "optimize",
    "parse_config",
    "sample_config_path",
]
