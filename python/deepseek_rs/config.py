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

``parse_config`` validates every field against :class:`OptimizationFile` (pydantic v2; an unknown
key, a wrong type or value raises ``InvalidValueError`` naming the field's path and what it
takes); :func:`deepseek_rs.optimize` applies a config to a model. Every section is optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Union

import torch
from pydantic import Field, field_validator, model_validator

from . import _core
from .errors import InvalidValueError
from .schema import Section, validate

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


class QuantizationSection(Section):
    method: Literal["QAT", "PTQ"] = "QAT"
    bit_width: Literal[8] = 8
    activation_range: Literal["dynamic"] = "dynamic"

    @field_validator("bit_width", mode="before")
    @classmethod
    def _integer(cls, v: Any) -> Any:
        if type(v) is not int:  # a Literal would take 8.0
            raise ValueError(f"bit_width must be an integer, got {v!r}")
        return v


class BatchingSection(Section):
    strategy: Literal["dynamic", "none"] = "dynamic"
    min_size: Annotated[int, Field(ge=1)] = 4
    max_size: Annotated[int, Field(ge=1)] = 32
    max_queue_delay_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 5.0

    @model_validator(mode="after")
    def _sizes(self) -> BatchingSection:
        # The scheduler owns the rules relating the sizes.
        try:
            delay = self.max_queue_delay_ms / 1000.0
            _core.Scheduler(min_size=self.min_size, max_size=self.max_size, max_queue_delay=delay)
        except InvalidValueError as e:
            raise ValueError(str(e)) from None
        return self


class HardwareSection(Section):
    target: Literal[TARGETS] = "cpu"  # type: ignore[valid-type]
    precision: Literal[PRECISIONS] = "fp32"  # type: ignore[valid-type]


class OptimizationSection(Section):
    """The ``optimization:`` block of the article's YAML; every section optional."""

    quantization: Optional[QuantizationSection] = None
    batching: Optional[BatchingSection] = None
    hardware: Optional[HardwareSection] = None


class OptimizationFile(Section):
    """The optimization YAML as the article writes it: ``{optimization: {...}}``
    (``deepseek-rs config schema optimize`` prints its JSON Schema)."""

    optimization: OptimizationSection = OptimizationSection()


def parse_config(source: Union[str, Path, Mapping[str, Any]]) -> OptimizationConfig:
    """Read and validate a configuration: a YAML file path, a YAML string, or a mapping.

    The top level is ``{"optimization": {...}}`` as in the article; the inner mapping alone
    is accepted too. Validation is :class:`OptimizationFile`'s (pydantic): an unknown key, a
    wrong type or a value out of range raises ``InvalidValueError`` naming the field's path.
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
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidValueError(f"the optimization config must be a mapping, got {type(raw).__name__}")
    if "optimization" not in raw:
        raw = {"optimization": raw}
    if raw["optimization"] is None:
        raw = {**raw, "optimization": {}}
    f = validate(OptimizationFile, dict(raw)).optimization
    q, b, h = f.quantization, f.batching, f.hardware
    return OptimizationConfig(
        quantization=None if q is None else QuantizationConfig(q.method, q.bit_width, q.activation_range),
        batching=None
        if b is None
        else BatchingConfig(b.strategy, b.min_size, b.max_size, float(b.max_queue_delay_ms)),
        hardware=None if h is None else HardwareConfig(h.target, h.precision),
    )


def sample_config_path() -> Path:
    """The article's example configuration, shipped with the package."""
    return Path(str(resources.files("deepseek_rs") / "data" / "optimization.yaml"))


__all__ = [
    "BatchingConfig",
    "BatchingSection",
    "HardwareSection",
    "OptimizationFile",
    "OptimizationSection",
    "QuantizationSection",
    "HardwareConfig",
    "OptimizationConfig",
    "QuantizationConfig",
    "choice",
    "parse_config",
    "sample_config_path",
]
