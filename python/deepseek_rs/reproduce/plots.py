"""The ledger's figures (matplotlib, the ``bench`` extra): one PNG per row where a curve says more
than a number. Each function takes the row's measured data and the path to write."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dar(points: Sequence[Tuple[str, float, float]], title: str, path: Path) -> str:
    """Accuracy (% of dense) against the attention work skipped; ``points``: (model, skipped, acc)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    names = list(dict.fromkeys(p[0] for p in points))
    for i, name in enumerate(names):  # shrinking markers of different shapes: coinciding points stay visible
        xs = [100 * p[1] for p in points if p[0] == name]
        ys = [100 * p[2] for p in points if p[0] == name]
        ax.scatter(xs, ys, label=name, s=90 - 18 * (i % 4), marker="osD^"[i % 4], alpha=0.75)
    ax.axhline(98.7, color="gray", linestyle="--", linewidth=1)
    ax.axvline(42, color="gray", linestyle=":", linewidth=1)
    ax.annotate("article: 42% skipped, 98.7% accuracy", (42, 98.7), fontsize=7, color="gray")
    ax.set_xlabel("attention work skipped (% of the causal score products)")
    ax.set_ylabel("validation accuracy (% of dense)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def batching(
    curves: Dict[str, List[Dict[str, Any]]], http: Dict[str, List[Dict[str, Any]]], path: Path
) -> str:
    """QPS and p99 latency against concurrency; ``curves``/``http``: policy -> rows with
    ``concurrency``, ``qps``, ``p99_ms`` (in process / over HTTP)."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
    for group, style in ((curves, "-o"), (http, "--s")):
        for policy, rows in group.items():
            cs = [r["concurrency"] for r in rows]
            label = policy + (" (HTTP)" if group is http else " (in process)")
            a.plot(cs, [r["qps"] for r in rows], style, label=label, markersize=4)
            b.plot(cs, [r["p99_ms"] for r in rows], style, label=label, markersize=4)
    for ax, ylabel in ((a, "requests per second"), (b, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    b.set_yscale("log")
    a.legend(fontsize=7)
    fig.suptitle("dynamic batching against no batching and static batching (batch 32)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def gvrt(trace: List[Dict[str, Any]], fixed_clip: float, title: str, path: Path) -> str:
    """GVRT's gradient norm, adaptive bound, clip thresholds and learning-rate factor over steps."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5.2), dpi=120, sharex=True)
    steps = list(range(1, len(trace) + 1))
    a.plot(steps, [t["grad_norm"] for t in trace], linewidth=0.8, color="0.6", label="gradient norm")
    bound = [(s, t["bound"]) for s, t in zip(steps, trace) if t["bound"] is not None]
    if bound:
        a.plot(*zip(*bound), linewidth=1.2, label="GVRT bound: mean + z*std")
    clips = [(s, t["clip"]) for s, t in zip(steps, trace) if t["clip"] is not None]
    if clips:
        a.scatter(*zip(*clips), s=14, color="C3", zorder=3, label="clipped to")
    a.axhline(fixed_clip, color="k", linestyle="--", linewidth=1, label=f"fixed clip {fixed_clip:g}")
    a.set_yscale("log")
    a.set_ylabel("norm")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    b.plot(steps, [t["lr_factor"] for t in trace], linewidth=1.2)
    b.set_ylabel("learning-rate factor")
    b.set_xlabel("step")
    b.grid(alpha=0.3)
    a.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def kept_by_signal(kept: Dict[str, float], overall: float, title: str, path: Path) -> str:
    """Fraction of documents each stage-1 threshold keeps on its own, and all of them together."""
    plt = _pyplot()
    names = list(kept) + ["all thresholds"]
    values = [100 * kept[n] for n in kept] + [100 * overall]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.2), dpi=120)
    colors = ["C0"] * len(kept) + ["C3"]
    ax.barh(names, values, color=colors)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("documents kept (%)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


__all__ = ["batching", "dar", "gvrt", "kept_by_signal"]
