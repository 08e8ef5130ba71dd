"""Apply the article's optimization YAML (:mod:`deepseek_rs.config`) to a model.

``optimize(model, config)`` quantizes (QAT or PTQ), places the model and sets its precision, and
returns an ``OptimizedModel``; its ``batcher()`` serves it through a ``DynamicBatcher``
configured by the ``batching`` section.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .config import GPU_TARGETS, BatchingConfig, HardwareConfig, OptimizationConfig, choice, parse_config
from .errors import DeviceError, InvalidValueError
from .moe.layer import SwiGLUExperts
from .quant import QATLinear, QATSwiGLUExperts, convert_int8, prepare_qat
from .serving.batcher import DynamicBatcher


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
    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"optimize needs an nn.Module, got {type(model).__name__}")
    # A hand-built OptimizationConfig goes through the same validation as a YAML file.
    cfg = parse_config(_as_mapping(config) if isinstance(config, OptimizationConfig) else config)
    choice("stage", stage, ("auto", "train", "deploy"))
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


__all__ = ["OptimizedModel", "optimize"]
