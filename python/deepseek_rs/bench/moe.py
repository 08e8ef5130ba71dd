"""The MoE benchmark behind ``deepseek-rs bench moe``: deepseek-rs against plain torch and HF.

Every row times our implementation and a baseline in the same process, on the same float32
input, in the same run (their repetitions interleaved, so a load change on the machine hits
both), after checking that the two compute the same thing. A time is the median over several
repetitions after a warm-up; forward-only rows run under ``torch.no_grad()``.

:func:`run_moe` returns the rows as dicts and :func:`format_table` prints them; :func:`main` is
``deepseek-rs bench moe [--quick] [--isa TIER|all] [--json PATH] [--progress | -q]``.

The layer's expert FFN runs on the backend the tuner of :mod:`deepseek_rs.moe.tuning` chooses
(``rust``, ``torch`` or ``grouped_mm``), tuned afresh in the run: each layer row names the
choice, every candidate's time and what the first call spent tuning. ``--isa`` reruns the whole
benchmark in a child process per ISA tier with deepseek-rs's kernels capped there
(``DEEPSEEK_RS_CPU_ISA``) and torch's kernels and MKL capped alike, as on a CPU of that tier.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

import deepseek_rs

from ..errors import InvalidValueError
from ..moe import backends, tuning
from ..moe.layer import PEAMoE
from . import common
from .common import machine_info

SPEEDUP = "baseline/ours"  # the ratio is baseline time / measured time (higher is better)
FLOOR = "ours/baseline"  # the ratio is measured time / baseline time (how far above a floor)


class BenchmarkMismatch(AssertionError):
    """Ours and a baseline computed different results: their timings would not be comparable."""


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    # router
    router_t: int
    router_e: int
    router_k: int
    top_p: float
    max_k: int
    # dispatch + combine
    dc_t: int
    dc_h: int
    dc_e: int
    dc_k: int
    # the layer
    h: int
    f: int
    e: int
    k: int
    t_forward: int
    t_train: int
    t_small: Tuple[int, ...]


FULL = Sizes(
    router_t=16384,
    router_e=64,
    router_k=6,
    top_p=0.5,
    max_k=8,
    dc_t=8192,
    dc_h=1024,
    dc_e=64,
    dc_k=6,
    h=1024,
    f=512,
    e=64,
    k=6,
    t_forward=4096,
    t_train=1024,
    t_small=(16, 256),
)

QUICK = Sizes(
    router_t=512,
    router_e=16,
    router_k=4,
    top_p=0.5,
    max_k=4,
    dc_t=256,
    dc_h=64,
    dc_e=8,
    dc_k=2,
    h=64,
    f=32,
    e=8,
    k=2,
    t_forward=128,
    t_train=64,
    t_small=(4, 32),
)


# --------------------------------------------------------------------------------------------
# Timer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimerConfig:
    warmup_s: float  # warm-up: call until this much time has passed...
    warmup_calls: int  # ...and at least this many times
    reps: int  # repetitions whose median is reported (at most)
    min_reps: int  # repetitions kept even when a call is slow
    rep_s: float  # a repetition loops the function until it lasts about this long
    budget_s: float  # repetitions are cut (down to min_reps) to stay near this per function


FULL_TIMER = TimerConfig(warmup_s=0.3, warmup_calls=1, reps=7, min_reps=3, rep_s=0.05, budget_s=8.0)
QUICK_TIMER = TimerConfig(warmup_s=0.0, warmup_calls=1, reps=3, min_reps=3, rep_s=0.0, budget_s=1.0)


def measure(fns: Dict[str, Callable[[], Any]], timer: TimerConfig) -> Dict[str, float]:
    """Median seconds per call of each function.

    Each function is warmed up, then called ``number`` times per repetition (enough for a
    repetition to last ``timer.rep_s``); the repetitions of all the functions are interleaved
    round-robin so that a change of load on the machine affects them alike.
    """
    number: Dict[str, int] = {}
    reps = timer.reps
    for name, fn in fns.items():
        start = time.perf_counter()
        calls = 0
        while calls < timer.warmup_calls or time.perf_counter() - start < timer.warmup_s:
            t0 = time.perf_counter()
            fn()
            last = time.perf_counter() - t0
            calls += 1
        number[name] = max(1, math.ceil(timer.rep_s / max(last, 1e-9)))
        per_rep = last * number[name]
        reps = min(reps, max(timer.min_reps, int(timer.budget_s / max(per_rep, 1e-9))))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            for name, fn in fns.items():
                n = number[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - t0) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


# --------------------------------------------------------------------------------------------
# Machine and rows
# --------------------------------------------------------------------------------------------


def _row(
    section: str,
    workload: str,
    subject: str,
    baseline: str,
    time_s: Optional[float],
    baseline_s: Optional[float],
    *,
    kind: str = SPEEDUP,
    target: Optional[float] = None,
    note: Optional[str] = None,
    backend: Optional[str] = None,
) -> Dict[str, Any]:
    ratio = None
    if time_s is not None and baseline_s is not None:
        ratio = baseline_s / time_s if kind == SPEEDUP else time_s / baseline_s
    met = None if target is None or ratio is None else bool(ratio >= target)
    return {
        "section": section,
        "workload": workload,
        "subject": subject,
        "baseline": baseline,
        "time_s": time_s,
        "baseline_s": baseline_s,
        "ratio": ratio,
        "ratio_kind": kind,
        "target": target,
        "met": met,
        "note": note,
        "backend": backend,
    }


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _fails(e: BaseException) -> str:
    return f"fails on CPU: {type(e).__name__}"


# --------------------------------------------------------------------------------------------
# 1. Router
# --------------------------------------------------------------------------------------------


def torch_top_k(logits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Softmax top-k in plain torch: (weights [T, k], expert ids [T, k])."""
    return torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)


def torch_top_p(logits: Tensor, p: float, min_k: int, max_k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-p routing in plain torch, as a CSR: (token_offsets [T+1], expert_ids [N], weights [N]).

    Softmax, sort descending, cumulative sum, the smallest prefix whose mass reaches ``p``
    clamped to ``[min_k, max_k]`` experts, gathered with a boolean mask.
    """
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    exclusive = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass before each expert
    count = (exclusive < p).sum(dim=-1).clamp_(min_k, max_k)
    keep = torch.arange(logits.shape[1]) < count.unsqueeze(1)
    offsets = torch.zeros(logits.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(count, 0, out=offsets[1:])
    return offsets, order[keep], sorted_probs[keep]


def _check_router(logits: Tensor, s: Sizes) -> None:
    t, k = logits.shape[0], s.router_k
    r = deepseek_rs.route(logits, "top_k", top_k=k)
    w, ids = torch_top_k(logits, k)
    if not torch.allclose(r.weights.view(t, k), w, rtol=1e-5, atol=1e-6):
        raise BenchmarkMismatch("router top-k: weights differ from torch softmax + topk")
    if (r.expert_ids.view(t, k) != ids).float().mean().item() > 1e-3:  # ties may order differently
        raise BenchmarkMismatch("router top-k: expert ids differ from torch softmax + topk")
    r = deepseek_rs.route(logits, "top_p", top_p=s.top_p, max_k=s.max_k)
    offsets, ids, w = torch_top_p(logits, s.top_p, 1, s.max_k)
    if (r.token_offsets.diff() != offsets.diff()).float().mean().item() > 1e-3:  # rounding near p
        raise BenchmarkMismatch("router top-p: experts per token differ from the plain torch rule")


def bench_router(s: Sizes, timer: TimerConfig) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(s.router_t, s.router_e, generator=g)
    _check_router(logits, s)
    k, p, max_k = s.router_k, s.top_p, s.max_k
    with torch.no_grad():
        tk = measure(
            {
                "ours": lambda: deepseek_rs.route(logits, "top_k", top_k=k),
                "torch": lambda: torch_top_k(logits, k),
            },
            timer,
        )
        tp = measure(
            {
                "ours": lambda: deepseek_rs.route(logits, "top_p", top_p=p, max_k=max_k),
                "torch": lambda: torch_top_p(logits, p, 1, max_k),
            },
            timer,
        )
    section = f"router: T={s.router_t} tokens, E={s.router_e} experts"
    ours = "deepseek-rs route"
    return [
        _row(
            section,
            f"softmax top-k, k={k}",
            ours,
            "torch softmax + topk",
            tk["ours"],
            tk["torch"],
            target=5.0,
        ),
        _row(
            section,
            f"top-p, p={p} max_k={max_k}",
            ours,
            "torch softmax+sort+cumsum+mask",
            tp["ours"],
            tp["torch"],
            target=5.0,
        ),
    ]


# --------------------------------------------------------------------------------------------
# 2. Dispatch + combine
# --------------------------------------------------------------------------------------------


def ours_dispatch_combine(x: Tensor, token_offsets: Tensor, expert_ids: Tensor, weights: Tensor, e: int):
    ops = torch.ops.deepseek_rs
    sorted_pair, sorted_token, pair_position, _ = ops.sort_by_expert(token_offsets, expert_ids, e)
    buf = ops.dispatch(x, sorted_token, pair_position, token_offsets)
    return ops.combine(buf, weights, sorted_pair, sorted_token, pair_position, token_offsets)


def torch_dispatch_combine(x: Tensor, expert_ids: Tensor, weights: Tensor, k: int) -> Tensor:
    """Sort the pairs by expert, gather the token rows, index_add the weighted rows back."""
    _, perm = torch.sort(expert_ids)
    token = perm // k
    buf = x.index_select(0, token)
    return torch.zeros_like(x).index_add_(0, token, buf * weights[perm].unsqueeze(1))


def bench_dispatch_combine(s: Sizes, timer: TimerConfig) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    t, h, e, k = s.dc_t, s.dc_h, s.dc_e, s.dc_k
    x = torch.randn(t, h, generator=g)
    r = deepseek_rs.route(torch.randn(t, e, generator=g), "top_k", top_k=k)
    offsets, ids, w = r.token_offsets, r.expert_ids, r.weights
    n = ids.numel()
    ours = ours_dispatch_combine(x, offsets, ids, w, e)
    ref = torch_dispatch_combine(x, ids, w, k)
    if not torch.allclose(ours, ref, rtol=1e-4, atol=1e-5):
        raise BenchmarkMismatch("dispatch + combine differs from torch sort + index_select + index_add_")
    src = torch.randn(2 * n, h, generator=g)
    dst = torch.empty_like(src)
    with torch.no_grad():
        m = measure(
            {
                "ours": lambda: ours_dispatch_combine(x, offsets, ids, w, e),
                "torch": lambda: torch_dispatch_combine(x, ids, w, k),
                "copy": lambda: dst.copy_(src),
            },
            timer,
        )
    section = f"dispatch + combine: T={t}, H={h}, E={e}, k={k} (N = T*k = {n} pairs, random routing)"
    return [
        _row(
            section,
            "sort + gather + weighted combine",
            "deepseek-rs ops",
            "torch sort+index_select+index_add_",
            m["ours"],
            m["torch"],
            target=1.5,
        ),
        _row(
            section,
            "the same: memory floor",
            "deepseek-rs ops",
            f"copy_ of 2*N*H floats ({format_bytes(src.numel() * 4)})",
            m["ours"],
            m["copy"],
            kind=FLOOR,
            note="the copy moves as many bytes as the rows gathered plus the rows combined",
        ),
    ]


# --------------------------------------------------------------------------------------------
# 3. The layer
# --------------------------------------------------------------------------------------------

HF_IMPLEMENTATIONS = ("eager", "grouped_mm")


def build_layers(h: int, f: int, e: int, k: int, seed: int = 0):
    """A PEAMoE and, when transformers is installed, a Qwen3-MoE block sharing its Parameters.

    Returns ``(ours, hf, hf_error)``: ``hf`` is None (and ``hf_error`` says why) without
    transformers.
    """
    torch.manual_seed(seed)
    ours = PEAMoE(h, f, e, router="top_k", top_k=k, renormalize=True).eval()
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError as exc:
        return ours, None, f"needs transformers ({type(exc).__name__})"
    config = Qwen3MoeConfig(
        hidden_size=h,
        moe_intermediate_size=f,
        num_experts=e,
        num_experts_per_tok=k,
        norm_topk_prob=True,
        num_hidden_layers=1,
        vocab_size=128,
    )
    config._experts_implementation = "eager"
    hf = Qwen3MoeSparseMoeBlock(config).eval()
    # The same Parameter objects, same layout: [E] x [H], [E, 2F, H] (gate rows first), [E, H, F].
    hf.gate.weight = ours.gate.weight
    hf.experts.gate_up_proj = ours.experts.gate_up_proj
    hf.experts.down_proj = ours.experts.down_proj
    return ours, hf, None


def hf_forward(hf, implementation: str, x: Tensor) -> Tensor:
    """The HF block on ``x`` [T, H] with the given experts implementation (read at forward time)."""
    hf.experts.config._experts_implementation = implementation
    return hf(x.unsqueeze(0)).squeeze(0)


def article_dense_forward(x: Tensor, router_weight: Tensor, gate_up: Tensor, down: Tensor, k: int) -> Tensor:
    """The article's PEALayer, corrected: every expert on every token, weighted by the softmax
    top-k gate (zero outside the top k; renormalised, as the layer it is compared with)."""
    probs = torch.softmax(F.linear(x, router_weight), dim=-1)
    top_v, top_i = probs.topk(k, dim=-1)
    gate = torch.zeros_like(probs).scatter_(-1, top_i, top_v / top_v.sum(dim=-1, keepdim=True))
    f = down.shape[2]
    y = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        hh = F.linear(x, gate_up[e])
        y += F.linear(F.silu(hh[:, :f]) * hh[:, f:], down[e]) * gate[:, e : e + 1]
    return y


def _contiguous_runs(ids: Sequence[int]) -> List[Tuple[int, int]]:
    runs: List[Tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to float32 rounding: the absolute tolerance scales with the tensor's largest
    entry (summation orders differ between kernels; a weight gradient sums over every token)."""
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item())))


def _check_hf(ours_y: Tensor, hf, x: Tensor) -> Dict[str, Optional[BaseException]]:
    """Run each HF implementation once on ``x``: None if it works (and agrees), else the error."""
    errors: Dict[str, Optional[BaseException]] = {}
    for impl in HF_IMPLEMENTATIONS:
        try:
            y = hf_forward(hf, impl, x)
        except Exception as exc:  # an implementation that does not run on this machine
            errors[impl] = exc
            continue
        if not _close(ours_y, y):
            diff = (ours_y - y).abs().max().item()
            raise BenchmarkMismatch(
                f"PEAMoE and the HF Qwen3-MoE block ({impl}) differ: max |diff| {diff:.3g}"
            )
        errors[impl] = None
    return errors


def layer_section(s: Sizes) -> str:
    return (
        f"MoE layer: H={s.h}, F={s.f}, E={s.e}, k={s.k}, renormalised top-k; "
        "HF = transformers Qwen3MoeSparseMoeBlock sharing the same weights"
    )


OURS_LAYER = "deepseek-rs PEAMoE"


def _hf_rows(
    section: str,
    workload: str,
    subjects: Sequence[Tuple[str, str]],
    time_s: Dict[str, float],
    errors: Dict[str, Optional[BaseException]],
    hf_error: Optional[str],
    baseline: Optional[Tuple[str, str]],
    target: Optional[float],
    backend: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """One row per HF implementation: ours against it, or, with ``baseline`` = (key in
    ``time_s``, name), it against that baseline (for reference). An implementation that
    failed gets its error instead of a time."""
    rows = []
    for impl, name in subjects:
        err = hf_error if impl not in errors else (None if errors[impl] is None else _fails(errors[impl]))
        t_impl = None if err else time_s[impl]
        if baseline is None:  # ours vs this HF implementation
            rows.append(
                _row(
                    section, workload, OURS_LAYER, name, time_s["ours"], t_impl,
                    target=target, note=err, backend=backend,
                )  # fmt: skip
            )
        else:  # this HF implementation vs the baseline, for reference
            rows.append(
                _row(
                    section,
                    workload,
                    name,
                    baseline[1],
                    t_impl,
                    time_s[baseline[0]],
                    note=err,
                )
            )
    return rows


HF_NAMES = tuple((impl, f"HF {impl}") for impl in HF_IMPLEMENTATIONS)
PASSES = {"forward": "", "forward-train": "fwd ", "backward": "bwd ", "backward-data": "bwd "}


def _first_call(fn: Callable[[], Any]) -> float:
    """Seconds of ``fn``'s first call with the tuner's memory of the latest choices cleared."""
    tuning.TUNER.last.clear()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _tuned(first_s: float) -> Tuple[str, str]:
    """(the backend per pass, a note with each candidate's time) of the tuner's latest choices."""
    chosen, notes = [], []
    for pass_ in PASSES:
        if pass_ not in tuning.TUNER.last:
            continue
        key, backend = tuning.TUNER.last[pass_]
        chosen.append(PASSES[pass_] + backend)
        c = tuning.TUNER.lookup(key)
        if c is not None:
            ranked = sorted(c.times_s.items(), key=lambda i: i[1])
            times = ", ".join(f"{b} {format_time(t)}" for b, t in ranked)
            notes.append(f"{key} -> {c.backend} ({times}; tuning {c.tuning_s:.2f} s)")
    note = f"first call {first_s:.2f} s; " + "; ".join(notes) if notes else ""
    # Nothing tuned: the backend was forced (DEEPSEEK_RS_EXPERTS_BACKEND).
    return " + ".join(chosen) or backends.requested_backend(), note


def bench_layer_forward(ours, hf, hf_error, s: Sizes, timer: TimerConfig) -> List[Dict[str, Any]]:
    t, h, f, k = s.t_forward, s.h, s.f, s.k
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, h, generator=g)
    a = torch.randn(t * k, h, generator=g)
    b = torch.randn(h, 3 * f, generator=g)
    w_r, w_gu, w_d = ours.gate.weight, ours.experts.gate_up_proj, ours.experts.down_proj
    fns: Dict[str, Callable[[], Any]] = {}
    with torch.no_grad():
        first_s = _first_call(lambda: ours(x))
        backend, tuned = _tuned(first_s)
        y = ours(x)
        if not _close(y, article_dense_forward(x, w_r, w_gu, w_d, k)):
            raise BenchmarkMismatch("PEAMoE and the dense article layer differ")
        errors = _check_hf(y, hf, x) if hf is not None else {}
        fns["ours"] = lambda: ours(x)
        fns["matmul"] = lambda: torch.matmul(a, b)
        for impl in HF_IMPLEMENTATIONS:
            if errors.get(impl, 1) is None:
                fns[impl] = lambda impl=impl: hf_forward(hf, impl, x)
        fns["dense"] = lambda: article_dense_forward(x, w_r, w_gu, w_d, k)
        m = measure(fns, timer)
    section = layer_section(s)
    gflop = 2 * t * k * h * 3 * f / 1e9
    matmul = f"torch.matmul [T*k,H]@[H,3F], same FLOPs ({gflop:.3g} GFLOP)"
    workload = f"forward T={t}: FLOP rate"
    rows = [
        _row(
            section,
            workload,
            OURS_LAYER,
            matmul,
            m["ours"],
            m["matmul"],
            target=0.9,
            note=f"{gflop / m['ours']:.0f} GFLOP/s, the matmul {gflop / m['matmul']:.0f} GFLOP/s; {tuned}",
            backend=backend,
        )
    ]
    rows += _hf_rows(section, workload, HF_NAMES, m, errors, hf_error, ("matmul", matmul), None)
    rows.append(
        _row(
            section,
            f"forward T={t}",
            OURS_LAYER,
            "article PEALayer, dense: all experts on all tokens",
            m["ours"],
            m["dense"],
            target=8.0,
            backend=backend,
        )
    )
    return rows


TIMED_ALONE = ("eager",)  # forward + backward implementations timed apart from the others


def _train_step(model: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor, params: Sequence[Tensor]) -> None:
    for p in params:
        p.grad = None
    x.grad = None
    (model(x) * grad).sum().backward()


def bench_layer_train(ours, hf, hf_error, s: Sizes, timer: TimerConfig) -> List[Dict[str, Any]]:
    t, h = s.t_train, s.h
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t, h, generator=g).requires_grad_()
    grad = torch.randn(t, h, generator=g)
    params = list(ours.parameters())
    backend, tuned = _tuned(_first_call(lambda: _train_step(ours, x, grad, params)))
    ref = [x.grad.clone()] + [p.grad.clone() for p in params]  # type: ignore[union-attr]
    fns: Dict[str, Callable[[], Any]] = {"ours": lambda: _train_step(ours, x, grad, params)}
    errors: Dict[str, Optional[BaseException]] = {}
    for impl in HF_IMPLEMENTATIONS if hf is not None else ():

        def model(x: Tensor, impl: str = impl) -> Tensor:
            return hf_forward(hf, impl, x)

        try:
            _train_step(model, x, grad, params)
        except Exception as exc:  # e.g. the weight gradient of torch._grouped_mm on some CPU setups
            errors[impl] = exc
            continue
        got = [x.grad] + [p.grad for p in params]
        if not all(b is not None and _close(a, b) for a, b in zip(ref, got)):
            raise BenchmarkMismatch(f"gradients of PEAMoE and the HF Qwen3-MoE block ({impl}) differ")
        errors[impl] = None
        fns[impl] = lambda model=model: _train_step(model, x, grad, params)
    # HF eager's backward allocates a full-size weight gradient per expert (gigabytes per step);
    # interleaved with the others it slows whatever runs next, so it is timed on its own.
    alone = {name: fns.pop(name) for name in TIMED_ALONE if name in fns}
    m = measure(fns, timer)
    for name, fn in alone.items():
        m.update(measure({name: fn}, timer))
    section = layer_section(s)
    workload = f"forward + backward T={t}"
    working = [impl for impl in HF_IMPLEMENTATIONS if errors.get(impl, 1) is None]
    if working:
        best = min(working, key=lambda impl: m[impl])
        failing = [f"{impl} {_fails(errors[impl])}" for impl in HF_IMPLEMENTATIONS if errors.get(impl)]
        apart = "HF eager timed on its own: its backward allocates a full-size weight gradient per expert"
        note = "; ".join(([apart] if "eager" in working else []) + failing + [tuned]) or None
        fastest = _row(
            section,
            workload,
            OURS_LAYER,
            f"the faster HF ({best})",
            m["ours"],
            m[best],
            target=1.3,
            note=note,
            backend=backend,
        )
    else:
        fastest = _row(
            section,
            workload,
            OURS_LAYER,
            "the faster HF",
            m["ours"],
            None,
            note=hf_error or "no HF implementation runs",
            backend=backend,
        )
    return [fastest] + _hf_rows(section, workload, HF_NAMES, m, errors, hf_error, None, None, backend)


def bench_layer_small(ours, hf, hf_error, t: int, s: Sizes, timer: TimerConfig) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(4 + t)
    x = torch.randn(t, s.h, generator=g)
    w_gu, w_d = ours.experts.gate_up_proj, ours.experts.down_proj
    with torch.no_grad():
        backend, tuned = _tuned(_first_call(lambda: ours(x)))
        y = ours(x)
        touched = torch.unique(ours.last_routing.expert_ids).tolist()
        runs = _contiguous_runs(touched)

        def read_touched() -> None:
            for lo, hi in runs:
                w_gu[lo:hi].sum()
                w_d[lo:hi].sum()

        errors = _check_hf(y, hf, x) if hf is not None else {}
        fns: Dict[str, Callable[[], Any]] = {"ours": lambda: ours(x), "read": read_touched}
        for impl in HF_IMPLEMENTATIONS:
            if errors.get(impl, 1) is None:
                fns[impl] = lambda impl=impl: hf_forward(hf, impl, x)
        m = measure(fns, timer)
    section = layer_section(s)
    workload = f"forward T={t}"
    rows = _hf_rows(section, workload, HF_NAMES, m, errors, hf_error, None, 1.0, backend)
    if tuned and rows:
        rows[0]["note"] = "; ".join(n for n in (rows[0]["note"], tuned) if n)
    size = format_bytes(len(touched) * (w_gu[0].numel() + w_d[0].numel()) * 4)
    rows.append(
        _row(
            section,
            f"forward T={t}: weight-read floor",
            OURS_LAYER,
            f"sum() of the {len(touched)} touched experts' weights ({size})",
            m["ours"],
            m["read"],
            kind=FLOOR,
            backend=backend,
        )
    )
    return rows


# --------------------------------------------------------------------------------------------
# 4. A whole model through transformers' experts interface
# --------------------------------------------------------------------------------------------

INTERFACE_BASELINES = ("grouped_mm", "eager")
INTERFACE_OURS = "experts_implementation='deepseek_rs'"


def bench_experts_interface(s: Sizes, timer: TimerConfig) -> List[Dict[str, Any]]:
    """A 2-layer Qwen3-MoE causal LM (H, F halved from the layer rows at full size; E, k as
    they are) with ``experts_implementation="deepseek_rs"`` against ``"grouped_mm"`` and
    ``"eager"``: the same model (implementation switched between calls), the same input, logits
    (and, for forward + backward, every parameter's gradient) checked equal first. A baseline
    that fails on this machine gets its error as the note instead of a time."""
    quick = s == QUICK
    h, f = (s.h, s.f) if quick else (s.h // 2, s.f // 2)
    batch, t = 4, max(s.t_train // 4, 1)
    section = (
        f"transformers experts interface: Qwen3-MoE causal LM, 2 layers, H={h}, F={f}, E={s.e}, "
        f"k={s.k}, renormalised top-k; experts_implementation='deepseek_rs' against the others"
    )
    workloads = (f"model forward, {batch}x{t} tokens", f"model forward + backward, {batch}x{t} tokens")
    try:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    except ImportError as exc:
        note = f"needs transformers ({type(exc).__name__})"
        return [
            _row(section, w, INTERFACE_OURS, f"experts_implementation={impl!r}", None, None, note=note)
            for w in workloads
            for impl in INTERFACE_BASELINES
        ]
    config = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=h,
        intermediate_size=2 * f,
        moe_intermediate_size=f,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=h // 4,
        num_experts=s.e,
        num_experts_per_tok=s.k,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():  # routers and experts that matter next to the residual stream
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.05)
    ids = torch.randint(0, config.vocab_size, (batch, t), generator=torch.Generator().manual_seed(5))
    params = list(model.parameters())

    def forward(impl: str) -> Tensor:
        model.set_experts_implementation(impl)
        return model(ids).logits

    def train_step(impl: str) -> None:
        for p in params:
            p.grad = None
        forward(impl).square().mean().backward()

    rows: List[Dict[str, Any]] = []
    for train, workload in zip((False, True), workloads):
        with torch.set_grad_enabled(train):
            want = forward("deepseek_rs")
            if train:
                train_step("deepseek_rs")
                want_grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
            fns: Dict[str, Callable[[], Any]] = {
                "ours": (lambda: train_step("deepseek_rs")) if train else (lambda: forward("deepseek_rs"))
            }
            errors: Dict[str, Optional[BaseException]] = {}
            for impl in INTERFACE_BASELINES:
                try:
                    got = forward(impl)
                    if train:
                        train_step(impl)
                except Exception as exc:  # an implementation that does not run on this machine
                    errors[impl] = exc
                    continue
                same = _close(got, want) and (
                    not train
                    or all(
                        a is not None and _close(a, b) for a, b in zip([p.grad for p in params], want_grads)
                    )
                )
                if not same:
                    raise BenchmarkMismatch(
                        f"Qwen3-MoE with experts_implementation 'deepseek_rs' and {impl!r} differ"
                    )
                errors[impl] = None
                fns[impl] = (
                    (lambda impl=impl: train_step(impl)) if train else (lambda impl=impl: forward(impl))
                )
            m = measure(fns, timer)
        for impl in INTERFACE_BASELINES:
            err = errors[impl]
            rows.append(
                _row(
                    section,
                    workload,
                    INTERFACE_OURS,
                    f"experts_implementation={impl!r}",
                    m["ours"],
                    None if err else m[impl],
                    note=None if err is None else _fails(err),
                )
            )
    model.set_experts_implementation("deepseek_rs")
    return rows


# --------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------


def run_moe(quick: bool = False, progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Run every row of the MoE benchmark; ``quick`` uses tiny sizes (a smoke test, seconds)."""
    s, timer = (QUICK, QUICK_TIMER) if quick else (FULL, FULL_TIMER)
    say = progress or (lambda _msg: None)
    rows: List[Dict[str, Any]] = []
    say("router")
    rows += bench_router(s, timer)
    say("dispatch + combine")
    rows += bench_dispatch_combine(s, timer)
    ours, hf, hf_error = build_layers(s.h, s.f, s.e, s.k)
    # The tuner starts empty, so that each layer row reports what its first call cost.
    with tempfile.TemporaryDirectory() as d, tuning.isolated(Path(d) / tuning.CACHE_FILE):
        say(f"layer forward, T={s.t_forward}")
        rows += bench_layer_forward(ours, hf, hf_error, s, timer)
        say(f"layer forward + backward, T={s.t_train}")
        rows += bench_layer_train(ours, hf, hf_error, s, timer)
        for t in s.t_small:
            say(f"layer forward, T={t}")
            rows += bench_layer_small(ours, hf, hf_error, t, s, timer)
    rows += bench_experts_interface(s, timer)
    return rows


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def format_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_machine(machine: Dict[str, Any]) -> str:
    caps = machine.get("torch_caps") or {}
    torch_caps = ", torch capped by " + " ".join(f"{k}={v}" for k, v in caps.items()) if caps else ""
    return (
        f"machine: {machine['cpus']} CPUs (os.cpu_count), {machine['torch_threads']} torch threads, "
        f"{machine['cpu_model']} ({machine['isa']}), GPU: {machine['gpu'] or 'none'}; "
        f"torch {machine['torch']}; deepseek-rs {machine['deepseek_rs']}, {machine['build']}; float32\n"
        f"ISA tier of deepseek-rs's expert kernels: {machine['experts_isa']} "
        f"(this CPU runs {', '.join(machine['experts_isas'])}){torch_caps}"
    )


def format_table(rows: Sequence[Dict[str, Any]], machine: Dict[str, Any]) -> str:
    """The rows as a plain-text table, grouped by section, under a line naming the machine."""
    header = (
        "workload", "measured", "backend", "baseline", "time", "baseline time", "ratio", "target", "result",
    )  # fmt: skip
    lines: List[Any] = []
    section = None
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            lines.append(section)
        ratio = (
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}x" + ("*" if r["ratio_kind"] == FLOOR else "")
        )
        target = "-" if r["target"] is None else f">= {r['target']:g}x"
        if r["met"] is not None:
            result = "met" if r["met"] else "NOT MET"
        elif r["ratio"] is None:
            result = r["note"] or ""
        else:
            result = ""
        lines.append(
            (
                r["workload"],
                r["subject"],
                r.get("backend") or "-",
                r["baseline"],
                format_time(r["time_s"]),
                format_time(r["baseline_s"]),
                ratio,
                target,
                result,
            )
        )
    cells = [header] + [line for line in lines if isinstance(line, tuple)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    right = {4, 5, 6, 7}

    def fmt(line: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return " | ".join(out).rstrip()

    out = [format_machine(machine), "", fmt(header), "-+-".join("-" * w for w in widths)]
    out += [("== " + line) if isinstance(line, str) else fmt(line) for line in lines]
    out += [
        "",
        "ratio: baseline time / measured time, a speed-up (FLOP-rate rows: matmul time / layer time);",
        "  with *: measured time / baseline time, how far above a memory floor (no target).",
        "times: median of the repetitions after a warm-up; forward-only rows under torch.no_grad().",
        "backend: the expert FFN's backend the tuner chose for the row (bwd: the backward's).",
    ]
    notes = [
        f"  {r['workload']}, {r['subject']}: {r['note']}"
        for r in rows
        if r["note"] and r["ratio"] is not None
    ]
    if notes:
        out += ["notes:", *notes]
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    """``deepseek-rs bench moe``: print the table; with ``--json PATH`` also write the machine and rows."""
    p = argparse.ArgumentParser(
        prog="deepseek-rs bench moe",
        description=(
            "Time deepseek-rs's router, dispatch + combine and PEAMoE layer against plain torch "
            "and Hugging Face Qwen3-MoE on this machine (float32, same process, same input), "
            "and print a table of times, ratios and targets."
        ),
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of a few seconds")
    p.add_argument("--json", metavar="PATH", help="also write the machine and the rows as JSON to PATH")
    p.add_argument(
        "--progress", action="store_true", help="progress messages on stderr even when it is not a terminal"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    p.add_argument(
        "--isa",
        metavar="TIER",
        help=(
            "run the benchmark once per ISA tier ('all': every tier this CPU runs, best first; or "
            "one of them), each in a child process with deepseek-rs, torch and MKL capped at that tier"
        ),
    )
    args = p.parse_args(argv)
    if args.isa:
        return _per_tier(args, sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    rows = run_moe(quick=args.quick, progress=common.progress("moe", args))
    table = format_table(rows, machine)
    print((common.QUICK_NOTE + "\n" + table) if args.quick else table, flush=True)
    common.write_json(args.json, machine, args.quick, {"rows": rows})
    return 0


# Environment of a child run "as on a CPU of this tier": our cap, torch's kernels and MKL's.
_TORCH_TIERS = {  # tier: (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA)
    "avx512": ("avx512", "AVX512", "AVX512_CORE"),
    "avx2": ("avx2", "AVX2", "AVX2"),
    "generic": ("default", "SSE4_2", "SSE41"),
}
TIER_ENV = {tier: dict(zip(common.TORCH_CAPS, caps)) for tier, caps in _TORCH_TIERS.items()}
TIER_ENV["neon"] = {}


def _per_tier(args: argparse.Namespace, argv: List[str]) -> int:
    """``--isa``: the benchmark in a child process per tier; ``--json`` gets ``{"tiers": {...}}``."""
    tiers = list(backends.cpu_isas()) if args.isa == "all" else [args.isa]
    unknown = [t for t in tiers if t not in backends.cpu_isas()]
    if unknown:
        raise InvalidValueError(f"--isa {args.isa}: this CPU runs {', '.join(backends.cpu_isas())}, or 'all'")
    # The child gets every option but --isa and --json.
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--isa", "--json"):
            skip = True
        elif not a.startswith(("--isa=", "--json=")):
            rest.append(a)
    results: Dict[str, Any] = {}
    status = 0
    with tempfile.TemporaryDirectory() as d:
        for tier in tiers:
            out = Path(d) / f"{tier}.json"
            env = {**os.environ, **TIER_ENV[tier], backends.ISA_ENV: tier}
            print(f"== ISA tier {tier}", flush=True)
            cmd = [sys.executable, "-m", "deepseek_rs", "bench", "moe", *rest, "--json", str(out)]
            code = subprocess.run(cmd, env=env).returncode
            status = status or code
            if code == 0:
                results[tier] = json.loads(out.read_text())
            print(flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tiers": results}, f, indent=2, default=float)
            f.write("\n")
    return status


__all__ = [
    "FULL",
    "QUICK",
    "BenchmarkMismatch",
    "Sizes",
    "TimerConfig",
    "format_table",
    "machine_info",
    "main",
    "measure",
    "run_moe",
]
