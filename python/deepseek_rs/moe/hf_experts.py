"""deepseek-rs as a transformers experts implementation: ``experts_implementation="deepseek_rs"``.

transformers (>= 5) runs the experts of its MoE families through ``ExpertsInterface``: each
experts class decorated with ``@use_experts_implementation`` looks up
``config._experts_implementation`` in that registry at every forward. Importing
:mod:`deepseek_rs.moe` registers :func:`experts_forward` there under :data:`NAME`, so

    AutoModelForCausalLM.from_pretrained(..., experts_implementation="deepseek_rs")
    model.set_experts_implementation("deepseek_rs")

run the experts on deepseek-rs's ops: ``sort_by_expert`` -> ``dispatch`` -> ``expert_ffn`` ->
``combine`` (forward and backward through their registered autograd). Importing transformers
costs seconds, so it is not imported for this: when it is already imported the registration
happens at once, otherwise when ``transformers.integrations.moe`` is first imported (a
post-import hook on ``sys.meta_path``, removed once it has run). Without transformers nothing
happens.

Our ``expert_ffn`` computes ``down_e(silu(gate_e x) * up_e x)`` with ``gate_up_proj``
[E, 2F, H] (gate rows first) and ``down_proj`` [E, H, F]. An experts module runs on it when:
it has a gate (``has_gate``), no biases, no post-expert norm, the concatenated [gate; up]
layout (``is_concatenated``; the transposed layout ``is_transposed`` is taken as a view), no
expert parallelism, and its gate function (``_apply_gate``, with its ``act_fn``) is SwiGLU.
That last point is checked numerically, once per module at its first call: the gate function
is run on a probe of values from 1e-3 to 1e4 in magnitude and must equal
``silu(gate) * up``, so a non-SiLU activation, a clamp (gpt-oss, DeepSeek-V4 and other
"swiglu_limit" families), a ``+ 1`` or a softcap is detected without a list of families.
Any other experts module runs transformers' own implementation instead (its eager forward on
the CPU, where torch's grouped GEMM needs 16-byte aligned strides and its backward fails for
some weight layouts with torch 2.15; ``grouped_mm`` on other devices), and a log message says
so once per class and reason. On CUDA, our kernels run
float16 / bfloat16 experts with H and F multiples of 8; anything else falls back the same way.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import weakref
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from . import ops, ops_cuda

NAME = "deepseek_rs"  # the key in transformers' ExpertsInterface
_INTERFACE_MODULE = "transformers.integrations.moe"
# The flags that @use_experts_implementation sets on every instance of a decorated class.
_FLAGS = ("has_gate", "has_bias", "has_post_expert_norm", "is_transposed", "is_concatenated")

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Which experts modules our kernels compute exactly
# --------------------------------------------------------------------------------------------


def uses_experts_interface(module: Any) -> bool:
    """True if ``module`` is an instance of a class decorated with ``@use_experts_implementation``."""
    return (
        isinstance(module, nn.Module)
        and all(hasattr(module, flag) for flag in _FLAGS)
        and callable(getattr(module, "_apply_gate", None))
    )


def _probe(f: int, device: torch.device) -> Tensor:
    """[rows, 2F] gate/up pre-activations from 1e-3 to 1e4 in magnitude, both signs, 0, and
    random values: a clamp at any limit below 1e4 changes some of the outputs."""
    ladder = torch.logspace(-3, 4, 29, dtype=torch.float64)
    values = torch.cat([-ladder.flip(0), torch.zeros(1, dtype=torch.float64), ladder])
    gate = torch.cat([values, values, values.flip(0)])
    up = torch.cat([values.flip(0), values, values])
    rows = torch.stack([gate, up], dim=1).repeat_interleave(f, dim=1)  # each row: F gates, F ups
    noise = torch.randn(32, 2 * f, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    return torch.cat([rows, noise]).to(device=device, dtype=torch.float32)


def _gate_is_swiglu(module: Any, f: int, device: torch.device) -> Optional[str]:
    """None if ``module._apply_gate`` computes ``silu(gate) * up`` on the probe, else why not."""
    z = _probe(f, device)
    try:
        with torch.no_grad():
            got = module._apply_gate(z)
    except Exception as exc:  # a gate function that needs more than a [rows, 2F] tensor
        return f"its gate function could not be probed ({type(exc).__name__}: {exc})"
    want = nn.functional.silu(z[:, :f]) * z[:, f:]
    if not isinstance(got, Tensor) or got.shape != want.shape:
        return "its gate function does not map [rows, 2F] to [rows, F]"
    if not torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6):
        act = type(getattr(module, "act_fn", None)).__name__
        return (
            f"its gate function ({type(module).__name__}._apply_gate with act_fn {act}) is not "
            "silu(gate) * up"
        )
    return None


# module -> None (runs on our kernels) or why not; decided at its first call
_STATIC_REASONS: weakref.WeakKeyDictionary[nn.Module, Optional[str]] = weakref.WeakKeyDictionary()


def _static_reason(module: Any) -> Optional[str]:
    """Why the module's expert math is not our SwiGLU kernel's (None if it is); cached."""
    try:
        return _STATIC_REASONS[module]
    except KeyError:
        pass
    reasons = []
    if not module.has_gate:
        reasons.append(f"no gate (up_proj then {type(getattr(module, 'act_fn', None)).__name__})")
    if module.has_bias:
        reasons.append("expert biases")
    if module.has_post_expert_norm:
        reasons.append("a norm after each expert")
    if module.has_gate and not module.is_concatenated:
        reasons.append("an interleaved gate/up layout")
    if not reasons:
        gate_up = module.gate_up_proj
        f = module.down_proj.shape[1 if module.is_transposed else 2]
        if gate_up.dim() != 3 or gate_up.shape[2 if module.is_transposed else 1] != 2 * f:
            reasons.append(f"gate_up_proj of shape {tuple(gate_up.shape)}")
        else:
            why = _gate_is_swiglu(module, f, gate_up.device)
            if why:
                reasons.append(why)
    reason = "; ".join(reasons) or None
    _STATIC_REASONS[module] = reason
    return reason


def unsupported_reason(module: Any, hidden_states: Optional[Tensor] = None) -> Optional[str]:
    """Why ``module`` (an experts module of transformers' interface) cannot run on our kernels,
    or None if it can. With ``hidden_states``, the input's device and dtype are checked too."""
    if not uses_experts_interface(module):
        return f"{type(module).__name__} is not an experts module of transformers' ExpertsInterface"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    reason = _static_reason(module)
    if reason:
        return reason
    device = module.gate_up_proj.device
    if device.type == "cuda":
        try:
            down = module.down_proj.transpose(1, 2) if module.is_transposed else module.down_proj
            ops_cuda.check_experts(module.gate_up_proj, down)
        except Exception as exc:  # DTypeError / ShapeError: float32, or sizes not multiples of 8
            return f"the CUDA kernels do not take these experts ({exc})"
    elif device.type != "cpu":
        return f"no deepseek-rs kernels on {device.type}"
    if hidden_states is not None and hidden_states.device != device:
        return f"input on {hidden_states.device}, experts on {device}"
    return None


# --------------------------------------------------------------------------------------------
# The implementation registered in ExpertsInterface
# --------------------------------------------------------------------------------------------


def _ours(module: Any, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    gate_up, down = module.gate_up_proj, module.down_proj
    if module.is_transposed:  # [E, H, 2F], [E, F, H]: views in our layout, no copy here
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    shape = hidden_states.shape  # [T, H] in every family seen; other leading shapes flattened
    k = top_k_index.shape[-1]
    hidden_states = hidden_states.reshape(-1, shape[-1])
    t = hidden_states.shape[0]
    device = hidden_states.device
    # Every token has exactly k pairs: CSR offsets 0, k, 2k, ...
    token_offsets = torch.arange(0, t * k + 1, k, dtype=torch.int64, device=device)
    expert_ids = top_k_index.reshape(-1).to(torch.int64).contiguous()
    weights = top_k_weights.reshape(-1).contiguous()
    sorted_pair, sorted_token, pair_position, expert_offsets = ops.sort_by_expert(
        token_offsets, expert_ids, gate_up.shape[0]
    )
    x = hidden_states.to(gate_up.dtype).contiguous()
    buf = ops.dispatch(x, sorted_token, pair_position, token_offsets)
    save_h = torch.is_grad_enabled() and any(
        p.requires_grad for p in (hidden_states, gate_up, down, top_k_weights)
    )
    out, _ = ops.expert_ffn(buf, gate_up, down, expert_offsets, save_h)
    y = ops.combine(out, weights, sorted_pair, sorted_token, pair_position, token_offsets)
    return y.to(hidden_states.dtype).view(shape)


_LOGGED: Set[Tuple[str, str]] = set()
_WRAPPER_CODE: Dict[str, Any] = {}  # "code": the code object of the interface's forward wrapper
_GROUPED_MM: Dict[str, Callable] = {}  # "fn": transformers' grouped_mm experts forward


def _eager_forward(cls: Any) -> Callable:
    """The class's own forward, under the interface's dispatching wrapper(s)."""
    fn = cls.forward
    while getattr(fn, "__code__", None) is _WRAPPER_CODE.get("code") and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _fallback(module: Any, reason: str, *args: Any, **kwargs: Any) -> Tensor:
    cpu = module.gate_up_proj.device.type == "cpu" if hasattr(module, "gate_up_proj") else True
    grouped = None if cpu else _GROUPED_MM.get("fn")
    key = (type(module).__qualname__, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning(
            "experts_implementation=%r: %s runs transformers' %s experts instead of deepseek-rs's "
            "kernels: %s",
            NAME,
            type(module).__name__,
            "eager" if grouped is None else "grouped_mm",
            reason,
        )
    forward = _eager_forward(type(module)) if grouped is None else grouped
    return forward(module, *args, **kwargs)


def experts_forward(
    self: Any, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *args: Any, **kwargs: Any
) -> Tensor:
    """The ``"deepseek_rs"`` experts implementation: ``hidden_states`` [T, H], ``top_k_index``
    and ``top_k_weights`` [T, k] -> [T, H], on deepseek-rs's ops where the module's expert math
    is SwiGLU (see the module docstring), else on transformers' own implementation."""
    reason = unsupported_reason(self, hidden_states)
    if reason is None and (args or kwargs):
        reason = "extra arguments to the experts forward"
    if reason is not None:
        return _fallback(self, reason, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    return _ours(self, hidden_states, top_k_index, top_k_weights)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def _register(interface_module: Any) -> None:
    interface = interface_module.ExpertsInterface
    if "code" not in _WRAPPER_CODE:

        class _Probe(nn.Module):
            def __init__(self, config: Any) -> None:
                super().__init__()

            def forward(self, x: Tensor) -> Tensor:
                return x

        wrapped = interface_module.use_experts_implementation(_Probe)
        _WRAPPER_CODE["code"] = wrapped.forward.__code__
    grouped = interface._global_mapping.get("grouped_mm")
    if grouped is not None:
        _GROUPED_MM["fn"] = grouped
    interface.register(NAME, experts_forward)


class _LoaderThenRegister(importlib.abc.Loader):
    """Runs the real loader of ``transformers.integrations.moe``, then registers."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        try:
            _register(module)
        except Exception as exc:  # never break transformers' import
            logger.warning("could not register %r in transformers' ExpertsInterface: %r", NAME, exc)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` entry that wraps the loader of ``transformers.integrations.moe``."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _INTERFACE_MODULE:
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)  # the other finders, without this one
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderThenRegister(spec.loader)
        return spec


_HOOK = _RegisterOnImport()


def _remove_hook() -> None:
    while _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def register() -> bool:
    """Register :data:`NAME` in transformers' ``ExpertsInterface``: now if
    ``transformers.integrations.moe`` is imported, else when it is. Returns False (and does
    nothing) if transformers is not installed."""
    loaded = sys.modules.get(_INTERFACE_MODULE)
    if loaded is not None:
        _register(loaded)
        return True
    try:
        installed = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # a broken or stubbed-out transformers
        installed = False
    if not installed:
        return False
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
    return True


__all__ = ["NAME", "experts_forward", "register", "unsupported_reason", "uses_experts_interface"]
