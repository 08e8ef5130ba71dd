"""deepseek-rs: the techniques of the DeepSeek models as fast, drop-in PyTorch components.

Hot paths run in Rust (``deepseek_rs._core``) on the CPU and in CUDA kernels on the GPU; the
subpackages expose them as torch modules and custom ops (``torch.ops.deepseek_rs.*``, registered
when :mod:`deepseek_rs.moe` is first imported):

* :mod:`.moe`: routing, the ``PEAMoE`` layer, the Hugging Face integration;
* :mod:`.attention`: Dynamic Attention Routing;
* :mod:`.serving`: the dynamic batcher and the HTTP server;
* :mod:`.datafilter`: the pre-training data filter;
* :mod:`.training`: GVRT and the unified semantic space loss;
* :mod:`.quant`: INT8 quantization-aware training and int8 inference;
* :mod:`.cuda`: the CUDA kernels; :mod:`.bench`: the benchmarks;
* :mod:`.config` and :mod:`.optimization`: the article's YAML and ``optimize``.

Every public name below is importable from ``deepseek_rs``; each subpackage is imported on first
use, so ``import deepseek_rs`` (and ``deepseek-rs --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, List

from .errors import (
    DeepseekError,
    DeviceError,
    DTypeError,
    InvalidValueError,
    QueueFullError,
    RequestTimeoutError,
    ShapeError,
    ShardError,
    ShutdownError,
)

try:
    __version__ = version("deepseek-rs")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

# public name -> the subpackage that defines it
_EXPORTS = {
    **dict.fromkeys(
        [
            "BlockGate",
            "DynamicAttention",
            "block_sparse_attention",
            "dense_warmup",
            "dynamic_attention",
            "gate_losses",
            "gate_parameters",
            "gate_warmup",
            "patch_attention",
        ],
        "attention",
    ),
    **dict.fromkeys(["FilterConfig", "run_filter"], "datafilter"),
    **dict.fromkeys(
        [
            "PEAMoE",
            "Router",
            "RouterAuxLosses",
            "RouterOutput",
            "RoutingConfig",
            "SwiGLU",
            "SwiGLUExperts",
            "aux_losses",
            "patch",
            "route",
        ],
        "moe",
    ),
    **dict.fromkeys(["OptimizedModel", "optimize"], "optimization"),
    **dict.fromkeys(["convert_int8", "prepare_qat"], "quant"),
    "DynamicBatcher": "serving",
    **dict.fromkeys(["GVRT", "GVRTStats", "USSLoss", "UnifiedSemanticSpace"], "training"),
}
_SUBPACKAGES = ("attention", "bench", "config", "cuda", "datafilter", "moe", "optimization")
_SUBPACKAGES += ("quant", "serving", "training")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from . import cuda, datafilter
    from .attention import (
        BlockGate,
        DynamicAttention,
        block_sparse_attention,
        dense_warmup,
        dynamic_attention,
        gate_losses,
        gate_parameters,
        gate_warmup,
        patch_attention,
    )
    from .datafilter import FilterConfig, run_filter
    from .moe import (
        PEAMoE,
        Router,
        RouterAuxLosses,
        RouterOutput,
        RoutingConfig,
        SwiGLU,
        SwiGLUExperts,
        aux_losses,
        patch,
        route,
    )
    from .optimization import OptimizedModel, optimize
    from .quant import convert_int8, prepare_qat
    from .serving import DynamicBatcher
    from .training import GVRT, GVRTStats, UnifiedSemanticSpace, USSLoss

__all__ = [
    "BlockGate",
    "DTypeError",
    "DeepseekError",
    "DeviceError",
    "DynamicAttention",
    "DynamicBatcher",
    "FilterConfig",
    "GVRT",
    "GVRTStats",
    "InvalidValueError",
    "OptimizedModel",
    "PEAMoE",
    "QueueFullError",
    "RequestTimeoutError",
    "Router",
    "RouterAuxLosses",
    "RouterOutput",
    "RoutingConfig",
    "ShapeError",
    "ShardError",
    "ShutdownError",
    "SwiGLU",
    "SwiGLUExperts",
    "USSLoss",
    "UnifiedSemanticSpace",
    "aux_losses",
    "block_sparse_attention",
    "convert_int8",
    "cuda",
    "datafilter",
    "dense_warmup",
    "dynamic_attention",
    "gate_losses",
    "gate_parameters",
    "gate_warmup",
    "optimize",
    "patch",
    "patch_attention",
    "prepare_qat",
    "route",
    "run_filter",
    "__version__",
]
