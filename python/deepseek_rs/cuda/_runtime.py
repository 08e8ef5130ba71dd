"""Finding, compiling and launching the CUDA kernels of ``cuda/*.cu`` through CuPy.

The sources live in the repository's ``cuda/`` folder and ship inside the wheel as
``deepseek_rs/cuda/sources/*.cu`` (never as a top-level ``cuda`` package, a name that belongs
to NVIDIA's bindings); :func:`kernel_dir` finds them either way. Each source is compiled
once per device by CuPy's ``RawModule`` (NVRTC, for the device's own architecture; CuPy caches
the binary on disk). The shared header is pasted into each source instead of passed with
``-I``, so that CuPy's cache, which keys on the source text, sees a header change.

Launches run on torch's current stream of the tensors' device, and tensors cross as DLPack
views (16-bit floats viewed as int16, which every DLPack consumer knows): no copies, no
stream synchronisation.
"""

from __future__ import annotations

import functools
import importlib.resources
import pathlib
import re
import threading
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import DeviceError

SOURCES = ("gemm.cu", "router.cu", "permute.cu")
HEADER = "common.cuh"
MIN_CAPABILITY = (8, 0)  # cp.async, bf16 mma.sync, ldmatrix

_INCLUDE = re.compile(r'^#include "common\.cuh"$', re.MULTILINE)
_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(')


def kernel_dir() -> pathlib.Path:
    """The folder holding the ``.cu`` sources: ``deepseek_rs/cuda/sources`` in the installed
    package (in a checkout, a link to the repository's ``cuda/``), else the checkout's ``cuda/``."""
    packaged = importlib.resources.files("deepseek_rs.cuda") / "sources"
    if packaged.joinpath(SOURCES[0]).is_file():
        return pathlib.Path(str(packaged))
    checkout = pathlib.Path(__file__).resolve().parents[3] / "cuda"
    if (checkout / SOURCES[0]).is_file():
        return checkout
    raise FileNotFoundError(
        f"the CUDA sources ({', '.join(SOURCES)}) are neither in the installed package ({packaged}) "
        f"nor in a source checkout ({checkout}); reinstall deepseek-rs"
    )


@functools.cache
def source(name: str) -> str:
    """The full text of kernel source ``name`` with the shared header pasted in."""
    d = kernel_dir()
    header = (d / HEADER).read_text()
    return _INCLUDE.sub(lambda _m: header, (d / name).read_text())


def kernel_names(name: str) -> Tuple[str, ...]:
    """The ``extern "C"`` kernels defined in source ``name`` (after macro expansion by name only)."""
    text = source(name)
    names = set(_KERNEL.findall(text))
    # Kernels stamped out by the *_KERNELS(NAME, DT) macros: `prefix_##NAME` for each instantiation.
    for macro, body in re.findall(r"#define (\w+_KERNELS)\(NAME, DT\)(.*?)\n\n", text, re.DOTALL):
        prefixes = re.findall(r"(\w+)_##NAME", body)
        for inst in re.findall(rf"^{macro}\((\w+), \w+\)$", text, re.MULTILINE):
            names.update(f"{p}_{inst}" for p in prefixes)
    names.discard("NAME")
    return tuple(sorted(n for n in names if not n.endswith("_")))


def _cupy():
    import cupy

    return cupy


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> Optional[str]:
    """Why the CUDA path cannot run here (``None`` when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    try:
        _cupy()
    except ImportError as e:
        return f"CuPy is not installed ({e}); install the extra: pip install 'deepseek-rs[gpu]'"
    try:
        kernel_dir()
    except FileNotFoundError as e:
        return str(e)
    return None


def is_available() -> bool:
    """Whether the CUDA kernels can run: a CUDA device, CuPy, and the kernel sources."""
    return unavailable_reason() is None


def require(device: torch.device) -> None:
    """Raise :class:`DeviceError` unless the CUDA kernels can run on ``device``."""
    reason = unavailable_reason()
    if reason is not None:
        raise DeviceError(f"the CUDA path of deepseek_rs cannot run: {reason}")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise DeviceError(
            f"the CUDA kernels of deepseek_rs need compute capability >= 8.0 (Ampere or newer); "
            f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}"
        )


_lock = threading.Lock()
_modules: Dict[Tuple[int, str], object] = {}
_functions: Dict[Tuple[int, str], object] = {}


def function(device: torch.device, module: str, name: str, shared_mem: int = 0):
    """The compiled kernel ``name`` of source ``module`` for ``device`` (compiled on first use).

    ``shared_mem`` above the default 48 KiB opts the kernel in to that much dynamic shared memory.
    """
    cp = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, name)
    with _lock, cp.cuda.Device(index):
        fn = _functions.get(key)
        if fn is None:
            mod = _modules.get((index, module))
            if mod is None:
                mod = cp.RawModule(code=source(module), options=("-std=c++17",))
                _modules[(index, module)] = mod
            fn = mod.get_function(name)
            _functions[key] = fn
        if shared_mem > 48 * 1024 and fn.max_dynamic_shared_size_bytes < shared_mem:
            fn.max_dynamic_shared_size_bytes = shared_mem
    return fn


class Null:
    """A null pointer argument."""


NULL = Null()


def i32(v: int) -> np.int32:
    return np.int32(v)


def i64(v: int) -> np.int64:
    return np.int64(v)


def f32(v: float) -> np.float32:
    return np.float32(v)


def f64(v: float) -> np.float64:
    return np.float64(v)


def _arg(cp, a):
    if isinstance(a, Tensor):
        if not a.is_contiguous():
            raise ValueError("internal error: a non-contiguous tensor reached a CUDA kernel")
        if a.dtype in (torch.float16, torch.bfloat16):
            a = a.view(torch.int16)
        return cp.from_dlpack(a.detach())
    if isinstance(a, Null):
        return np.uint64(0)
    if isinstance(a, np.generic):
        return a
    raise TypeError(f"internal error: kernel argument of type {type(a).__name__} needs an explicit C type")


def _cupy_stream(cp, stream: torch.cuda.Stream):
    """Torch's stream as a CuPy stream (the CUDA stream protocol where CuPy has it)."""
    if hasattr(cp.cuda.Stream, "from_external"):  # CuPy >= 14; ExternalStream is deprecated there
        return cp.cuda.Stream.from_external(stream)
    return cp.cuda.ExternalStream(stream.cuda_stream, stream.device.index)


def launch(
    device: torch.device,
    module: str,
    name: str,
    grid: Tuple[int, ...],
    block: Tuple[int, ...],
    args: tuple,
    shared_mem: int = 0,
) -> None:
    """Launch kernel ``name`` on torch's current stream of ``device``.

    Tensors must be contiguous and on ``device``; scalars must carry their C type (``i32``,
    ``i64``, ``f32``, ``f64``), and :data:`NULL` passes a null pointer.
    """
    if min(grid) <= 0:
        return
    cp = _cupy()
    fn = function(device, module, name, shared_mem)
    with cp.cuda.Device(device.index), _cupy_stream(cp, torch.cuda.current_stream(device)):
        fn(grid, block, tuple(_arg(cp, a) for a in args), shared_mem=shared_mem)
