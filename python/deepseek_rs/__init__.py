"""deepseek-rs: the techniques of the DeepSeek models as fast, drop-in PyTorch components.

Hot paths run in Rust (``deepseek_rs._core``); this package exposes them as torch modules and
custom ops (``torch.ops.deepseek_rs.*``).
"""

from importlib.metadata import PackageNotFoundError, version

from . import cuda, datafilter  # cuda: the GPU path (CuPy is imported only when a kernel runs)
from .attention import (
    BlockGate,
    DynamicAttention,
    block_sparse_attention,
    dense_warmup,
    dynamic_attention,
    gate_losses,
    gate_parameters,
    gate_warmup,
)
from .attention_patch import patch_attention
from .batching import DynamicBatcher
from .config import OptimizedModel, optimize
from .datafilter import FilterConfig, run_filter
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
from .gvrt import GVRT, GVRTStats
from .moe import PEAMoE, SwiGLU, SwiGLUExperts
from .patch import patch
from .quant import convert_int8, prepare_qat
from .router import Router, RouterAuxLosses, RouterOutput, aux_losses, route
from .uss import UnifiedSemanticSpace, USSLoss

try:
    __version__ = version("deepseek-rs")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

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
