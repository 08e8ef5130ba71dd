"""``deepseek-rs tune``: choose the expert FFN's CPU backend for a model's shapes ahead of time.

The first call of each shape class otherwise pays for timing every backend (see
:mod:`.tuning`); a server or a training job can run this once per machine instead. It times the
forward and the backward at each batch size, on random routing of the model's shape, replaces
the cached choices for those classes and prints what it chose, what each backend took and what
the tuning cost.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..errors import InvalidValueError
from . import backends, ops, tuning
from .routing import route

# The MoE benchmark's layer: Qwen3-MoE-like widths.
DEFAULT_SHAPE = {"hidden_size": 1024, "intermediate_size": 512, "num_experts": 64, "top_k": 6}
DEFAULT_TOKENS = (1, 16, 256, 1024, 4096)
# config.json keys of the transformers MoE families, in order of preference.
_CONFIG_KEYS = {
    "hidden_size": ("hidden_size", "d_model"),
    "intermediate_size": ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size"),
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    "top_k": ("num_experts_per_tok", "moe_top_k", "top_k"),
}


def shape_from_config(path: str) -> Dict[str, int]:
    """H, F, E and k from a transformers ``config.json`` (or the model directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidValueError(f"cannot read a model config from {str(p)!r}: {e}") from None
    # Multimodal configs keep the language model's under text_config.
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    shape = {}
    for field, keys in _CONFIG_KEYS.items():
        found = [config[k] for k in keys if isinstance(config.get(k), int)]
        if not found:
            raise InvalidValueError(f"{str(p)!r} has none of {', '.join(keys)}: is it a MoE model's config?")
        shape[field] = found[0]
    return shape


def _routing(t: int, e: int, k: int, generator: torch.Generator):
    """Expert offsets of ``t`` tokens routed top-k over random logits (a balanced load)."""
    r = route(torch.randn(t, e, generator=generator), "top_k", top_k=k)
    _, sorted_token, _, offsets = ops.sort_by_expert(r.token_offsets, r.expert_ids, e)
    return sorted_token.numel(), offsets


def pretune(
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    top_k: int,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    dtype: torch.dtype = torch.float32,
    backward: bool = True,
    seed: int = 0,
) -> List[Dict[str, Any]]:
    """Time the backends at each batch size, replace their cached choices, return one row per
    (pass, batch size): the shape class, the chosen backend, each candidate's time, the cost."""
    if min(hidden_size, intermediate_size, num_experts, top_k) < 1 or top_k > num_experts:
        raise InvalidValueError(
            f"need positive sizes and top_k <= num_experts, got H={hidden_size}, F={intermediate_size}, "
            f"E={num_experts}, k={top_k}"
        )
    if not tokens or min(tokens) < 1:
        raise InvalidValueError(f"token counts must be positive, got {list(tokens)}")
    if backends.requested_backend() != "auto":
        raise InvalidValueError(
            f"{backends.BACKEND_ENV}={backends.requested_backend()} forces the backend: unset it to tune"
        )
    g = torch.Generator().manual_seed(seed)
    h, f, e = hidden_size, intermediate_size, num_experts
    gate_up = (torch.randn(e, 2 * f, h, generator=g) / h**0.5).to(dtype)
    down = (torch.randn(e, h, f, generator=g) / f**0.5).to(dtype)
    rows: List[Dict[str, Any]] = []
    for t in tokens:
        n, offsets = _routing(t, e, top_k, g)
        buf = torch.randn(n, h, generator=g).to(dtype)
        passes = [("forward", functools.partial(ops.expert_ffn, buf, gate_up, down, offsets, False))]
        if backward:
            _, pre = ops.expert_ffn(buf, gate_up, down, offsets, True, "torch")
            grad = torch.randn(n, h, generator=g).to(dtype)
            bwd = functools.partial(ops.expert_ffn_backward, grad, buf, gate_up, down, offsets, pre, True)
            train = functools.partial(ops.expert_ffn, buf, gate_up, down, offsets, True)
            passes += [("forward-train", train), ("backward", bwd)]
        for pass_, run in passes:
            key = tuning.shape_class(pass_, buf, down, offsets)
            tuning.TUNER.forget(key)
            start = time.perf_counter()
            run()
            took = time.perf_counter() - start
            choice = tuning.TUNER.lookup(key)
            rows.append(
                {
                    "pass": pass_,
                    "tokens": t,
                    "class": key,
                    "backend": choice.backend if choice else backends.runnable(buf, gate_up, down)[0],
                    "times_s": choice.times_s if choice else {},
                    "tuning_s": took,
                }
            )
    return rows


def format_rows(rows: Sequence[Dict[str, Any]]) -> str:
    names = [b for b in backends.BACKENDS if any(b in r["times_s"] for r in rows)]
    header = ["pass", "tokens", "shape class", "chosen", *[f"{b} ms" for b in names], "first call s"]
    lines = [header]
    for r in rows:
        times = [f"{r['times_s'][b] * 1e3:.3f}" if b in r["times_s"] else "-" for b in names]
        lines.append([r["pass"], str(r["tokens"]), r["class"], r["backend"], *times, f"{r['tuning_s']:.2f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="deepseek-rs tune",
        description=(
            "Time the expert FFN's CPU backends (rust, torch, grouped_mm) for a MoE shape at several "
            "batch sizes, cache the fastest per shape class for this machine, and print the choices. "
            f"Default shape: H={DEFAULT_SHAPE['hidden_size']}, F={DEFAULT_SHAPE['intermediate_size']}, "
            f"E={DEFAULT_SHAPE['num_experts']}, k={DEFAULT_SHAPE['top_k']}."
        ),
    )
    p.add_argument("--model-config", metavar="PATH", help="a transformers config.json or model directory")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int, help="width of one routed expert")
    p.add_argument("--num-experts", type=int)
    p.add_argument("--top-k", type=int, help="experts per token")
    p.add_argument(
        "--tokens",
        default=",".join(map(str, DEFAULT_TOKENS)),
        metavar="T[,T...]",
        help=f"batch sizes in tokens (default {','.join(map(str, DEFAULT_TOKENS))})",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--no-backward", action="store_true", help="tune the inference forward only (no training passes)"
    )
    p.add_argument("--show", action="store_true", help="print this machine's cached choices and exit")
    p.add_argument("--clear", action="store_true", help="forget every cached choice and exit")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = p.parse_args(argv)
    tuner = tuning.TUNER
    print(f"machine: {tuning.machine_key()}\ncache: {tuner.path}")
    if args.clear:
        tuner.clear()
        print("cleared")
        return 0
    if args.show:
        for key, c in sorted(tuner.choices().items()):
            times = ", ".join(f"{b} {s * 1e3:.3f} ms" for b, s in sorted(c.times_s.items()))
            print(f"{key}: {c.backend} ({times})")
        return 0
    shape = dict(DEFAULT_SHAPE)
    if args.model_config:
        shape = shape_from_config(args.model_config)
    for field in shape:
        if getattr(args, field) is not None:
            shape[field] = getattr(args, field)
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise InvalidValueError(
            f"--tokens must be integers separated by commas, got {args.tokens!r}"
        ) from None
    print(
        f"shape: H={shape['hidden_size']}, F={shape['intermediate_size']}, E={shape['num_experts']}, "
        f"k={shape['top_k']}, {args.dtype}; tokens {tokens}",
        flush=True,
    )
    rows = pretune(**shape, tokens=tokens, dtype=getattr(torch, args.dtype), backward=not args.no_backward)
    print(format_rows(rows))
    print(f"tuning took {sum(r['tuning_s'] for r in rows):.2f} s in all; choices saved to {tuner.path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": tuning.machine_key(), "shape": shape, "rows": rows}, f, indent=2)
            f.write("\n")
    return 0


__all__ = ["DEFAULT_SHAPE", "format_rows", "main", "pretune", "shape_from_config"]
