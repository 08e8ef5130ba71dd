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

``parse_config`` validates every field (an unknown key or value raises ``InvalidValueError``
naming it and the allowed values); :func:`deepseek_rs.optimize` applies a config to a model.
Every section is optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from . import _core
from .errors import InvalidValueError

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


def choice(where: str, value: Any, allowed) -> Any:
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
            method=choice(f"{where}.method", q.get("method", d.method), QUANT_METHODS),
            bit_width=choice(f"{where}.bit_width", _int(f"{where}.bit_width", bits, 1), BIT_WIDTHS),
            activation_range=choice(
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
            strategy=choice(f"{where}.strategy", b.get("strategy", d2.strategy), BATCHING_STRATEGIES),
            min_size=min_size,
            max_size=max_size,
            max_queue_delay_ms=float(delay),
        )
    if raw.get("hardware") is not None:
        where = "optimization.hardware"
        h = _keys(where, raw["hardware"], ("target", "precision"))
        d3 = HardwareConfig()
        hardware = HardwareConfig(
            target=choice(f"{where}.target", h.get("target", d3.target), TARGETS),
            precision=choice(f"{where}.precision", h.get("precision", d3.precision), PRECISIONS),
        )
    return OptimizationConfig(quantization, batching, hardware)


def sample_config_path() -> Path:
    """The article's example configuration, shipped with the package."""
    return Path(str(resources.files("deepseek_rs") / "data" / "optimization.yaml"))


__all__ = [
    "BatchingConfig",
    "HardwareConfig",
    "OptimizationConfig",
    "QuantizationConfig",
    "choice",
    "parse_config",
    "sample_config_path",
]
