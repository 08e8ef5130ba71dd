"""Compile the kernel sources with NVRTC alone, no GPU and no CuPy needed.

Used by the tests (and scripts) to check that every
kernel compiles for a given architecture on machines without a device. NVRTC is found where
pip's NVIDIA wheels put it (``nvidia/*/lib``, installed with torch's CUDA builds), in
``CUDA_HOME``, or on the loader's path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import site
import sys
from typing import List, Optional, Tuple


def _candidates() -> List[str]:
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found: List[str] = []
    for root in roots:
        for pattern in ("nvidia/*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            found += sorted(glob.glob(os.path.join(root, pattern)), reverse=True)
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        found += sorted(glob.glob(os.path.join(cuda_home, "lib64", "libnvrtc.so*")), reverse=True)
    name = ctypes.util.find_library("nvrtc")
    if name:
        found.append(name)
    # The builtins library is loaded by libnvrtc itself, not by us.
    return [f for f in found if "builtins" not in os.path.basename(f) and not f.endswith(".alt")]


_lib: Optional[ctypes.CDLL] = None


def library() -> Optional[ctypes.CDLL]:
    """The NVRTC shared library, or ``None`` if none is installed."""
    global _lib
    if _lib is None:
        for path in _candidates():
            try:
                _lib = ctypes.CDLL(path)
                break
            except OSError:
                continue
    return _lib


def version() -> Tuple[int, int]:
    lib = library()
    if lib is None:
        raise OSError("NVRTC is not installed")
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_cubin(
    source: str, name: str, arch: str, options: Tuple[str, ...] = ("-std=c++17",)
) -> Tuple[bool, str, bytes]:
    """Compile ``source`` for ``sm_<arch>``; returns ``(ok, log, cubin)``."""
    lib = library()
    if lib is None:
        raise OSError("NVRTC is not installed")
    prog = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if status != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed with status {status}")
    try:
        opts = [o.encode() for o in options + (f"--gpu-architecture=sm_{arch}",)]
        argv = (ctypes.c_char_p * len(opts))(*opts)
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if status != 0:
            return False, log.value.decode(errors="replace"), b""
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return True, log.value.decode(errors="replace"), cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
