"""Gradient variance reduction training (the article's GVRT): adaptive clipping and learning rate.

``GVRT(optimizer)`` wraps any ``torch.optim.Optimizer``. Each ``step()`` it

1. measures the global gradient norm (``torch.nn.utils.clip_grad_norm_`` semantics: one norm over
   every gradient of every parameter group, DTensor gradients of FSDP2 reduced over their mesh,
   and, with ``process_group``, plain sharded gradients (FSDP1, ZeRO) summed across ranks);
2. keeps running statistics of that norm: after a warm-up of ``warmup_steps`` steps the mean and
   variance start from the warm-up norms' median and scaled median absolute deviation (robust to
   a spike during the warm-up), then follow exponential moving averages with decay ``alpha``.
   During the warm-up a norm more than ``warmup_clip_factor`` times the median so far is
   clipped to that bound: too few norms for a variance, but a 50x spike is still caught;
3. clips outliers as ZClip does (Kumar et al. 2025, arXiv:2504.02507): a norm whose z-score
   ``z = (g - mean) / std`` exceeds ``z_threshold`` is scaled down to ZClip's default
   ``mean + z_threshold**2 * std / z``, which pulls larger outliers further down
   (``clip="adaptive"``), to ``mean + z_threshold * std`` (``clip="zscore"``), or to the mean
   (``clip="mean"``); the statistics then absorb the clipped norm, so a spike does not inflate
   the threshold that follows it;
4. lowers the learning rate while the variance spikes: a fast moving variance (decay
   ``lr_beta``) of the norm, each step's norm capped at ``mean + 2 * z_threshold * std``, is
   compared with the slow one; while the ratio exceeds ``lr_tolerance`` every group's rate is
   multiplied by ``sqrt(lr_tolerance / ratio)`` (at least ``min_lr_factor``) for this step
   only, and restored right after it. A learning-rate scheduler therefore always reads and
   writes its own values: the factor composes with any scheduler.

Non-finite norms (an overflowed half-precision step, a corrupted batch) skip the step without
touching the statistics (``nonfinite="skip"``, like ``GradScaler``) or raise
(``nonfinite="raise"``).

Under DDP every rank holds the same all-reduced gradients, so every rank computes the same norm
and takes the same decisions; no communication is needed. One host synchronisation per step
reads the norm (as ``clip_grad_norm_(error_if_nonfinite=True)`` does).
"""

from __future__ import annotations

import math
import numbers
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import DTypeError, InvalidValueError

CLIP_MODES = ("zscore", "adaptive", "mean")
NONFINITE_MODES = ("skip", "raise")
# Each step adds at most (LR_Z_CAP * z_threshold)**2 slow variances to the fast variance: a lone
# outlier (already clipped) lowers the rate for a few steps only, a sustained rise keeps it low.
LR_Z_CAP = 2.0
MAD_TO_STD = 1.4826  # the standard deviation of a normal distribution is 1.4826 times its MAD
_COUNTS = ("step", "count", "clipped_steps", "skipped_steps")  # the integer statistics


@dataclass
class GVRTStats:
    """What the last ``GVRT.step()`` saw and did."""

    step: int  #: optimizer steps taken (skipped steps not counted)
    grad_norm: float  #: global gradient norm before clipping
    clip_threshold: Optional[float]  #: the norm the gradients were clipped to, None if not clipped
    lr_factor: float  #: multiplier applied to every group's learning rate for that step
    mean: Optional[float]  #: running mean of the gradient norm (None during warm-up)
    std: Optional[float]  #: running standard deviation of the gradient norm (None during warm-up)
    clipped_steps: int  #: steps whose gradients were clipped so far
    skipped_steps: int  #: steps skipped for a non-finite norm so far


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InvalidValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_norm_type(norm_type: float) -> None:
    if not (_is_real(norm_type) and (math.isinf(norm_type) or norm_type > 0)):
        raise InvalidValueError(f"norm_type must be > 0 or inf, got {norm_type!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _checked_stats(stats: Any, names: List[str]) -> Dict[str, Any]:
    """A copy of the ``"gvrt"`` entry of a state dict, checked: every statistic in ``names``
    present, counts integers >= 0, the others finite numbers (variances >= 0)."""
    if not isinstance(stats, Mapping):
        raise InvalidValueError(f"the 'gvrt' state must be a mapping, got {type(stats).__name__}")
    missing = set(names) - set(stats)
    if missing:
        raise InvalidValueError(f"the 'gvrt' state lacks {sorted(missing)}")
    out = dict(stats)
    norms = out["warmup_norms"]
    if not (isinstance(norms, (list, tuple)) and all(_is_real(x) and math.isfinite(x) for x in norms)):
        raise InvalidValueError(
            f"the 'gvrt' state's warmup_norms must be a list of finite numbers, got {norms!r}"
        )
    out["warmup_norms"] = list(norms)
    for name in names:
        value = out[name]
        if name == "warmup_norms":
            continue
        if name in _COUNTS:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
            want = "an integer >= 0"
        else:
            low = 0.0 if name in ("var", "var_fast") else -math.inf
            ok = _is_real(value) and low <= value < math.inf
            want = "a finite number" + (" >= 0" if low == 0 else "")
        if not ok:
            raise InvalidValueError(f"the 'gvrt' state's {name} must be {want}, got {value!r}")
    return out


def _check_unit(name: str, value: float, *, closed_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and (0 <= value < 1 if closed_low else 0 < value < 1)
    if not ok:
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise InvalidValueError(f"{name} must be in {interval}, got {value!r}")


def global_grad_norm(
    grads: List[Tensor], norm_type: float = 2.0, process_group: Optional[Any] = None
) -> Tensor:
    """The ``norm_type``-norm of all of ``grads`` taken together, as a scalar tensor (float32, or
    float64 for float64 gradients).

    DTensor gradients (FSDP2, tensor parallel) are reduced over their device mesh. Plain
    gradients that are shards of one model across the ranks of ``process_group`` (FSDP1,
    ZeRO) have their ``norm**p`` summed (maximum for the infinity norm) across it. Leave
    ``process_group`` None for DDP and single-process training.
    """
    _check_norm_type(norm_type)
    for g in grads:
        if not isinstance(g, Tensor):
            raise DTypeError(f"grads must be tensors, got a {type(g).__name__}")
    grads = [g for g in grads if g.numel() > 0]  # an empty gradient adds nothing, even to the max
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    wide = all(g.dtype in (torch.float32, torch.float64) for g in grads)
    if wide and hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach, DTensor aware
        total = torch.nn.utils.get_total_norm(grads, norm_type)
    else:  # half-precision gradients: accumulate in float32 so that a large norm does not overflow
        norms = [
            torch.linalg.vector_norm(g, norm_type, dtype=torch.promote_types(g.dtype, torch.float32))
            for g in grads
        ]
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)
    if hasattr(total, "full_tensor"):  # a DTensor with a partial placement: finish the reduction
        total = total.full_tensor()
    if process_group is not None:
        import torch.distributed as dist

        if math.isinf(norm_type):
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=process_group)
        else:
            total = total.pow(norm_type)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
            total = total.pow(1.0 / norm_type)
    return total


class GVRT(Optimizer):
    """Wrap ``optimizer`` with gradient-norm statistics, z-score clipping and a learning-rate
    factor that drops while the gradient-norm variance spikes.

    Use it in place of the wrapped optimizer, schedulers included::

        opt = GVRT(torch.optim.AdamW(model.parameters(), lr=3e-4))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
        loss.backward(); opt.step(); sched.step(); opt.zero_grad()

    The wrapper's ``param_groups`` and ``state`` are the wrapped optimizer's (the same
    objects), so a scheduler built on either one drives the same learning rates.

    Args:
        optimizer: any torch optimizer (not LBFGS, whose step re-evaluates the closure and so
            recomputes the gradients after they were clipped).
        alpha: decay of the slow moving mean and variance of the norm (ZClip: 0.97).
        z_threshold: a norm more than this many standard deviations above the mean is clipped.
        warmup_steps: steps whose norms initialise the statistics; nothing is adapted before.
        clip: ``"zscore"``, ``"adaptive"`` or ``"mean"`` (see the module docstring).
        max_norm: an optional fixed ceiling on the norm, applied at every step, warm-up included.
        warmup_clip_factor: during the warm-up, a norm above this multiple of the median of the
            warm-up norms so far is clipped to it (None: no adaptive clipping in the warm-up).
        adapt_lr: lower the learning rate while the variance spikes.
        lr_beta: decay of the fast moving variance that detects a spike.
        lr_tolerance: fast / slow variance ratio tolerated before the rate is lowered.
        min_lr_factor: the lowest learning-rate factor.
        norm_type: the p of the p-norm (``float("inf")`` allowed).
        process_group: ranks over which the gradients are shards of one model (FSDP1, ZeRO);
            None for DDP, FSDP2 (DTensor gradients) and single-process training.
        nonfinite: ``"skip"`` the step or ``"raise"`` ``InvalidValueError`` on a NaN or
            infinite norm.
        eps: relative floor of the standard deviation (times the mean), so that constant norms
            do not divide by zero.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        clip: str = "adaptive",
        max_norm: Optional[float] = None,
        warmup_clip_factor: Optional[float] = 10.0,
        adapt_lr: bool = True,
        lr_beta: float = 0.8,
        lr_tolerance: float = 2.0,
        min_lr_factor: float = 0.1,
        norm_type: float = 2.0,
        process_group: Optional[Any] = None,
        nonfinite: str = "skip",
        eps: float = 1e-6,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise DTypeError(f"GVRT wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, (GVRT, torch.optim.LBFGS)):
            raise DTypeError(f"GVRT cannot wrap {type(optimizer).__name__}")
        _check_unit("alpha", alpha)
        _check_unit("lr_beta", lr_beta)
        _check_positive("z_threshold", z_threshold)
        _check_positive("lr_tolerance", lr_tolerance)
        _check_positive("eps", eps)
        if not (isinstance(min_lr_factor, (int, float)) and 0 < min_lr_factor <= 1):
            raise InvalidValueError(f"min_lr_factor must be in (0, 1], got {min_lr_factor!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 2:
            raise InvalidValueError(f"warmup_steps must be an integer >= 2, got {warmup_steps!r}")
        if clip not in CLIP_MODES:
            raise InvalidValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
        if nonfinite not in NONFINITE_MODES:
            raise InvalidValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if max_norm is not None:
            _check_positive("max_norm", max_norm)
        if warmup_clip_factor is not None and not (
            isinstance(warmup_clip_factor, (int, float)) and 1 <= warmup_clip_factor < math.inf
        ):
            raise InvalidValueError(
                f"warmup_clip_factor must be a finite number >= 1 or None, got {warmup_clip_factor!r}"
            )
        _check_norm_type(norm_type)
        if not isinstance(adapt_lr, bool):
            raise InvalidValueError(f"adapt_lr must be a bool, got {adapt_lr!r}")
        if adapt_lr and any("lr" not in group for group in optimizer.param_groups):
            raise InvalidValueError(
                f"adapt_lr scales each parameter group's 'lr', and {type(optimizer).__name__} has a "
                "group without one: pass adapt_lr=False"
            )
        # Optimizer.__init__ sets up the step hooks; once the wrapped optimizer is attached,
        # param_groups and state are the wrapped optimizer's own (see the properties below).
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.__dict__.pop("_init_param_groups")
        self.__dict__.pop("_init_state")
        self.alpha, self.z_threshold, self.warmup_steps = float(alpha), float(z_threshold), warmup_steps
        self.clip, self.max_norm, self.adapt_lr = clip, max_norm, adapt_lr
        self.warmup_clip_factor = warmup_clip_factor
        self.lr_beta, self.lr_tolerance = float(lr_beta), float(lr_tolerance)
        self.min_lr_factor, self.norm_type = float(min_lr_factor), float(norm_type)
        self.process_group, self.nonfinite, self.eps = process_group, nonfinite, float(eps)
        self._stats: Dict[str, Any] = self._initial_stats()
        self.last: Optional[GVRTStats] = None

    @staticmethod
    def _initial_stats() -> Dict[str, Any]:
        return {
            "step": 0,  # steps taken
            "count": 0,  # norms seen (warm-up ends at warmup_steps)
            "warmup_norms": [],  # the norms seen during the warm-up
            "mean": 0.0,
            "var": 0.0,
            "mean_fast": 0.0,  # fast moving mean and variance (decay lr_beta) of the capped raw norm
            "var_fast": 0.0,
            "clipped_steps": 0,
            "skipped_steps": 0,
        }

    # -- the statistics -------------------------------------------------------------------
    @property
    def warming_up(self) -> bool:
        """True until ``warmup_steps`` norms have been seen."""
        return self._stats["count"] < self.warmup_steps

    def _std(self) -> float:
        s = self._stats
        return max(math.sqrt(s["var"]), self.eps * abs(s["mean"]), torch.finfo(torch.float32).tiny)

    def _threshold(self, norm: float) -> Optional[float]:
        """The norm to clip to, or None; also applies ``max_norm``."""
        threshold = None
        if self.warming_up:
            seen = self._stats["warmup_norms"]
            if self.warmup_clip_factor is not None and seen:
                bound = self.warmup_clip_factor * statistics.median(seen)
                threshold = bound if norm > bound else None
        else:
            mean, std = self._stats["mean"], self._std()
            z = (norm - mean) / std
            if z > self.z_threshold:
                if self.clip == "zscore":
                    threshold = mean + self.z_threshold * std
                elif self.clip == "adaptive":
                    threshold = mean + self.z_threshold**2 * std / z
                else:
                    threshold = mean
        if self.max_norm is not None and norm > self.max_norm:
            threshold = self.max_norm if threshold is None else min(threshold, self.max_norm)
        return threshold

    def _lr_factor(self) -> float:
        if not self.adapt_lr or self.warming_up:
            return 1.0
        ratio = self._stats["var_fast"] / self._std() ** 2
        if ratio <= self.lr_tolerance:
            return 1.0
        return max(self.min_lr_factor, math.sqrt(self.lr_tolerance / ratio))

    def _observe(self, norm: float, effective: float) -> None:
        """Fold one step's raw and clipped norms into the statistics."""
        s = self._stats
        s["count"] += 1
        if s["count"] <= self.warmup_steps:
            s["warmup_norms"].append(effective)
            if s["count"] == self.warmup_steps:
                # Robust start: the median and the scaled median absolute deviation, so that a
                # spike during the warm-up does not inflate the first thresholds.
                median = statistics.median(s["warmup_norms"])
                mad = statistics.median(abs(x - median) for x in s["warmup_norms"])
                s["mean"], s["var"] = median, (MAD_TO_STD * mad) ** 2
                s["mean_fast"], s["var_fast"] = s["mean"], s["var"]
                s["warmup_norms"] = []
            return
        # The fast statistics see the raw norm (capped): a short-window variance around its own
        # mean, so a slow drift of the norm (it shrinks as training converges) is not a spike.
        capped = min(norm, s["mean"] + LR_Z_CAP * self.z_threshold * self._std())
        delta = capped - s["mean_fast"]
        s["mean_fast"] += (1 - self.lr_beta) * delta
        s["var_fast"] = self.lr_beta * (s["var_fast"] + (1 - self.lr_beta) * delta * delta)
        delta = effective - s["mean"]  # exponentially weighted mean and variance (West 1979)
        s["mean"] += (1 - self.alpha) * delta
        s["var"] = self.alpha * (s["var"] + (1 - self.alpha) * delta * delta)

    # -- the step -------------------------------------------------------------------------
    def _grads(self) -> List[Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Clip the gradients, adapt the learning rate, and step the wrapped optimizer.

        ``closure`` (optional) is evaluated once, with gradients enabled, before the norm is
        measured; its value is returned.
        """
        loss = None
        if closure is not None:
            if not callable(closure):
                raise DTypeError(f"closure must be callable or None, got {type(closure).__name__}")
            with torch.enable_grad():
                loss = closure()
        grads = self._grads()
        norm = global_grad_norm(grads, self.norm_type, self.process_group).item()
        s = self._stats
        if not math.isfinite(norm):
            if self.nonfinite == "raise":
                raise InvalidValueError(f"the gradient norm is {norm} at step {s['step']}")
            s["skipped_steps"] += 1
            self.last = self._report(norm, None, 0.0)
            return loss
        threshold = self._threshold(norm)
        if threshold is not None:
            # threshold < norm whenever it is set (and so norm > 0); relative, unlike
            # clip_grad_norm_'s max_norm / (norm + 1e-6), so tiny norms are not over-clipped.
            coef = threshold / norm
            if coef < 1.0:
                _scale_(grads, coef)
                s["clipped_steps"] += 1
            else:
                threshold = None
        self._observe(norm, norm if threshold is None else threshold)
        factor = self._lr_factor()  # after observing: a spike lowers the rate of its own step
        self._step_with_lr_factor(factor)
        s["step"] += 1
        self.last = self._report(norm, threshold, factor)
        return loss

    def _step_with_lr_factor(self, factor: float) -> None:
        if factor == 1.0:
            self.optimizer.step()
            return
        saved = [group["lr"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["lr"] = group["lr"] * factor
            self.optimizer.step()
        finally:  # the scheduler's values come back even if the step raises
            for group, lr in zip(self.param_groups, saved):
                group["lr"] = lr

    def _report(self, norm: float, threshold: Optional[float], factor: float) -> GVRTStats:
        s = self._stats
        ready = not self.warming_up
        return GVRTStats(
            step=s["step"],
            grad_norm=norm,
            clip_threshold=threshold,
            lr_factor=factor,
            mean=s["mean"] if ready else None,
            std=math.sqrt(s["var"]) if ready else None,
            clipped_steps=s["clipped_steps"],
            skipped_steps=s["skipped_steps"],
        )

    # -- delegation -----------------------------------------------------------------------
    # The wrapped optimizer's load_state_dict replaces its param_groups and state objects, so
    # the wrapper looks them up on every access instead of holding references.
    @property  # type: ignore[override]
    def param_groups(self) -> List[Dict[str, Any]]:
        inner = self.__dict__.get("optimizer")
        return self.__dict__["_init_param_groups"] if inner is None else inner.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:  # Optimizer.__init__, before the wrapped optimizer is attached
            self.__dict__["_init_param_groups"] = value
        else:
            inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        inner = self.__dict__.get("optimizer")
        return self.__dict__["_init_state"] if inner is None else inner.state

    @state.setter
    def state(self, value: Any) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            self.__dict__["_init_state"] = value
        else:
            inner.state = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if "optimizer" in self.__dict__:  # after __init__: the wrapped optimizer owns the groups
            self.optimizer.add_param_group(param_group)
        else:  # during Optimizer.__init__: collect the wrapped optimizer's own group dicts
            super().add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"gvrt"`` entry holding the statistics."""
        state = self.optimizer.state_dict()
        state["gvrt"] = {**self._stats, "warmup_norms": list(self._stats["warmup_norms"])}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a ``state_dict()``; a plain optimizer state dict restarts the warm-up."""
        if not isinstance(state_dict, Mapping):
            raise DTypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        stats = state_dict.pop("gvrt", None)
        # Checked before anything is loaded, so that a bad state dict changes nothing.
        stats = self._initial_stats() if stats is None else _checked_stats(stats, list(self._initial_stats()))
        try:
            self.optimizer.load_state_dict(state_dict)
        except (KeyError, TypeError, ValueError) as e:  # torch's own checks of the groups
            raise InvalidValueError(f"the wrapped optimizer cannot load this state dict: {e}") from e
        self._stats = stats

    def __getstate__(self) -> Dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"GVRT(clip={self.clip!r}, z_threshold={self.z_threshold}, alpha={self.alpha}, "
            f"warmup_steps={self.warmup_steps}, adapt_lr={self.adapt_lr}, optimizer={self.optimizer!r})"
        )


def _scale_(grads: List[Tensor], coef: float) -> None:
    """Multiply every gradient by ``coef`` in place: one foreach call for plain dense tensors,
    one call per tensor otherwise (DTensor, sparse)."""
    if all(type(g) is Tensor and g.layout == torch.strided for g in grads):
        torch._foreach_mul_(grads, coef)
    else:
        for g in grads:
            g.mul_(coef)


__all__ = ["GVRT", "GVRTStats", "global_grad_norm"]
