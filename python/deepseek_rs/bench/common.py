"""What every benchmark shares: the machine it ran on, progress on stderr, its JSON file, and a
clear message naming the extra to install when an optional dependency is missing."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from typing import Any, Callable, Dict, Optional

import torch

import deepseek_rs

from ..errors import DeepseekError
from ..moe import backends
from ..moe.tuning import cpu_model

# The extra of pyproject.toml that installs each optional module a benchmark may need.
EXTRAS = {
    "transformers": "hf",
    "sklearn": "bench",
    "matplotlib": "bench",
    "datatrove": "bench-filter",
    "starlette": "serve",
    "uvicorn": "serve",
    "cupy": "gpu",
}


class MissingExtra(DeepseekError, ImportError):
    """An optional dependency of a benchmark is not installed (the message names its extra)."""

    def __init__(self, module: str, purpose: str, alternative: str = ""):
        extra = EXTRAS.get(module.split(".")[0])
        how = f"pip install 'deepseek-rs[{extra}]'" if extra else f"pip install {module}"
        alternative = f", or {alternative}" if alternative else ""
        super().__init__(f"{purpose} needs {module}, which is not installed: {how}{alternative}")
        self.module, self.extra = module, extra


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, purpose: str) -> None:
    """Raise :class:`MissingExtra` unless ``module`` can be imported."""
    if not has_module(module):
        raise MissingExtra(module, purpose)


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def _cpuinfo(key: str) -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_isa() -> str:
    """The widest SIMD tier in the CPU's flags: it names the CPU, not the kernel that ran (the
    experts' tier is ``backends.cpu_isa()``, the router picks its own)."""
    flags = set((_cpuinfo("flags") or _cpuinfo("Features") or "").split())
    if "avx512f" in flags:
        return "AVX-512"
    if {"avx2", "fma"} <= flags:
        return "AVX2+FMA"
    if "asimd" in flags or platform.machine() in ("arm64", "aarch64"):
        return "NEON"
    return "generic"


def gpu_name() -> Optional[str]:
    """The first CUDA device's name, or None without one."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


TORCH_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def machine_info() -> Dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "isa": cpu_isa(),
        "experts_isa": backends.cpu_isa(),
        "experts_isas": list(backends.cpu_isas()),
        # Set by `bench moe --isa` to run torch as on a CPU of a lower tier.
        "torch_caps": {k: os.environ[k] for k in TORCH_CAPS if os.environ.get(k)},
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "deepseek_rs": deepseek_rs.__version__,
        "build": "release build",
        "python": platform.python_version(),
    }


def format_machine(machine: Dict[str, Any], threads: bool = True) -> str:
    """One line: CPU count and model, ISA tier, torch threads (unless ``threads`` is False: a
    benchmark that sets them later says so itself), GPU, versions."""
    threads_text = f"{machine['torch_threads']} torch threads, " if threads else ""
    return (
        f"machine: {machine['cpus']} CPUs ({machine['cpu_model']}, {machine['isa']}), {threads_text}"
        f"GPU: {machine['gpu'] or 'none'}; "
        f"torch {machine['torch']}, python {machine['python']}, deepseek-rs {machine['deepseek_rs']}"
    )


# --------------------------------------------------------------------------------------------
# Options, progress and output
# --------------------------------------------------------------------------------------------


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``deepseek-rs bench NAME``, with the options every benchmark has."""
    p = argparse.ArgumentParser(
        prog=f"deepseek-rs bench {name}",
        description=doc.strip().split("\n\n")[0].replace("\n", " "),
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds to a minute")
    p.add_argument(
        "--progress", action="store_true", help="progress messages on stderr even when it is not a terminal"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    return p


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the machine and the results as JSON to PATH")


def add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        metavar="DIR",
        default=".",
        help="directory of the files the benchmark writes (plots); default: the current directory",
    )


def progress(name: str, args: argparse.Namespace) -> Callable[[str], None]:
    """``say(msg)``: a progress line on stderr, shown on a terminal or with ``--progress``."""
    show = not args.quiet and (args.progress or sys.stderr.isatty())

    def say(msg: str) -> None:
        if show:
            print(f"[bench {name}] {msg} ...", file=sys.stderr, flush=True)

    return say


def write_json(path: Optional[str], machine: Dict[str, Any], quick: bool, results: Dict[str, Any]) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"machine": machine, "quick": quick, **results}, f, indent=2, default=float)
        f.write("\n")


QUICK_NOTE = "quick run: tiny sizes, a smoke test; the targets apply to the full sizes only"


__all__ = [
    "EXTRAS",
    "MissingExtra",
    "QUICK_NOTE",
    "add_json",
    "add_out",
    "cpu_isa",
    "cpu_model",
    "format_machine",
    "gpu_name",
    "has_module",
    "machine_info",
    "parser",
    "progress",
    "require",
    "write_json",
]
