"""deepseek-rs: the techniques of the DeepSeek models as fast, drop-in PyTorch components.

Hot paths run in Rust (``deepseek_rs._core``); this package exposes them as torch modules and
custom ops (``torch.ops.deepseek_rs.*``).
"""

from importlib.metadata import PackageNotFoundError, version

from . import datafilter
from .config import OptimizedModel, optimize
from .datafilter import FilterConfig, run_filter
from .errors import DeepseekError, DeviceError, DTypeError, InvalidValueError, ShapeError, ShardError
from .moe import PEAMoE, SwiGLU, SwiGLUExperts
from .patch import patch
from .quant import convert_int8, prepare_qat
from .router import Router, RouterAuxLosses, RouterOutput, aux_losses, route

try:
    __version__ = version("deepseek-rs")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = [
    "DTypeError",
    "DeepseekError",
    "DeviceError",
    "FilterConfig",
    "InvalidValueError",
    "OptimizedModel",
    "PEAMoE",
    "Router",
    "RouterAuxLosses",
    "RouterOutput",
    "ShapeError",
    "ShardError",
    "SwiGLU",
    "SwiGLUExperts",
    "__version__",
    "aux_losses",
    "convert_int8",
    "datafilter",
    "optimize",
    "patch",
    "prepare_qat",
    "route",
    "run_filter",
]
