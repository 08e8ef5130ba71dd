"""Benchmark of the CUDA path (deepseek_rs.cuda) against torch on one GPU, in one run.

    deepseek-rs bench gpu [--reps N] [--json PATH]    # the issue's sizes
    deepseek-rs bench gpu --quick                     # tiny sizes: a smoke test

(needs a CUDA device of compute capability 8.0 or newer and CuPy, the ``gpu`` extra)

Sections (each row: workload, baseline, baseline time, our time, speed ratio = baseline / ours):

1. FP16 GEMM at 4096^3 and 8192^3 (and BF16 at 4096^3): ``deepseek_rs.cuda.gemm`` against
   ``torch.matmul`` (cuBLAS). Target: at least 0.8.
2. Grouped GEMM, E=64 experts, about 128 tokens per expert, H=2048, expert FFN F=1408: the
   experts' first layer (gate and up, [rows, H] x [E, 2F, H]) as one ``grouped_gemm`` launch
   against a loop of ``torch.matmul`` per expert (target: at least 1.5) and against
   ``torch._grouped_mm`` where it exists; and both FFN layers (SwiGLU fused) against the loop.
3. The whole MoE layer forward (T=1024 tokens, top-8 of 64 experts, FP16): ``PEAMoE`` on CUDA
   against the Hugging Face Qwen3-MoE block sharing the same weights (each experts
   implementation transformers offers).

Times are medians of CUDA-event timings after warm-up. Every pair of results is checked to
agree before it is timed. Exits with status 77 (``NO_DEVICE``) and a message saying why when no
usable CUDA device (or CuPy) is here: nothing is measured then.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import cuda as ds_cuda
from . import common
from . import moe as benchmarks

# The exit status when there is nothing to measure on: the "skipped" status of automake's and
# meson's test harnesses, apart from 1 (a failure) and 2 (a usage error).
NO_DEVICE = 77


def timed(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median seconds of ``fn`` on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = max(want.float().abs().max().item(), 1.0)
    if not err <= tol * scale:
        raise benchmarks.BenchmarkMismatch(
            f"bench gpu: {name}: results differ (max |diff| {err:.3g}, scale {scale:.3g})"
        )


Row = Tuple[str, str, Optional[float], Optional[float], str]


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} us"


def print_table(title: str, rows: List[Row]) -> None:
    print(f"\n== {title}")
    print("| workload | baseline | baseline time | ours | ratio (baseline / ours) | target |")
    print("|---|---|---|---|---|---|")
    for workload, baseline, tb, to, target in rows:
        ratio = f"{tb / to:.2f}x" if tb and to else "-"
        print(f"| {workload} | {baseline} | {fmt_time(tb)} | {fmt_time(to)} | {ratio} | {target} |")


def as_dicts(section: str, rows: List[Row]) -> List[Dict[str, Any]]:
    return [
        {
            "section": section,
            "workload": w,
            "baseline": b,
            "baseline_s": tb,
            "time_s": to,
            "ratio": tb / to if tb and to else None,
            "target": target,
        }
        for w, b, tb, to, target in rows
    ]


def bench_gemm(quick: bool, reps: int) -> List[Row]:
    sizes = (
        [(256, torch.float16)]
        if quick
        else [(4096, torch.float16), (8192, torch.float16), (4096, torch.bfloat16)]
    )
    rows: List[Row] = []
    for n, dtype in sizes:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        check(f"gemm {n}^3", ds_cuda.gemm(a, b), torch.matmul(a, b), 2e-2)
        t_torch = timed(lambda a=a, b=b: torch.matmul(a, b), reps, 3)
        t_ours = timed(lambda a=a, b=b: ds_cuda.gemm(a, b), reps, 3)
        tflops = 2 * n**3 / t_ours / 1e12
        name = "FP16" if dtype == torch.float16 else "BF16"
        rows.append(
            (
                f"{name} GEMM {n}^3 (ours {tflops:.0f} TFLOP/s)",
                "torch.matmul (cuBLAS)",
                t_torch,
                t_ours,
                ">= 0.8x",
            )
        )
    return rows


def bench_grouped(quick: bool, reps: int) -> List[Row]:
    e, per_expert, h, f = (8, 32, 256, 128) if quick else (64, 128, 2048, 1408)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, e, (e * per_expert,), generator=g)
    counts = torch.bincount(ids, minlength=e)
    offs = torch.zeros(e + 1, dtype=torch.int64)
    offs[1:] = counts.cumsum(0)
    rows_n = int(offs[-1])
    x = torch.randn(rows_n, h, device="cuda", dtype=torch.float16)
    gate_up = torch.randn(e, 2 * f, h, device="cuda", dtype=torch.float16) / h**0.5
    down = torch.randn(e, h, f, device="cuda", dtype=torch.float16) / f**0.5
    offs_d = offs.cuda()
    spans = [(i, int(s), int(t)) for i, (s, t) in enumerate(zip(offs[:-1], offs[1:])) if t > s]

    def loop_first() -> torch.Tensor:
        out = torch.empty(rows_n, 2 * f, device="cuda", dtype=torch.float16)
        for i, s, t in spans:
            torch.matmul(x[s:t], gate_up[i].T, out=out[s:t])
        return out

    def ours_first() -> torch.Tensor:
        return ds_cuda.grouped_gemm(x, gate_up, offs_d, w_transposed=True)

    want = loop_first()
    check("grouped GEMM", ours_first(), want, 2e-2)
    workload = f"grouped GEMM E={e}, {rows_n} rows (~{per_expert}/expert), [rows,{h}] x [E,{2 * f},{h}]^T"
    t_loop, t_ours = timed(loop_first, reps, 3), timed(ours_first, reps, 3)
    rows: List[Row] = [(workload, "loop of torch.matmul per expert", t_loop, t_ours, ">= 1.5x")]

    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is None:
        rows.append((workload, "torch._grouped_mm: not in this torch", None, t_ours, "report"))
    else:
        ends = offs_d[1:].to(torch.int32)
        for dtype in (torch.float16, torch.bfloat16):  # _grouped_mm may take only one of them
            xd, wd = x.to(dtype), gate_up.to(dtype)
            w_kn = wd.transpose(1, 2)  # [E, H, 2F] view: the layout _grouped_mm multiplies by
            name = "FP16" if dtype == torch.float16 else "BF16"
            t_mine = timed(lambda xd=xd, wd=wd: ds_cuda.grouped_gemm(xd, wd, offs_d), reps, 3)
            try:
                check("torch._grouped_mm", grouped_mm(xd, w_kn, offs=ends), want, 3e-2)
                t_gmm = timed(lambda xd=xd, w_kn=w_kn: grouped_mm(xd, w_kn, offs=ends), reps, 3)
                rows.append((f"{workload}, {name}", "torch._grouped_mm", t_gmm, t_mine, "report"))
            except (RuntimeError, NotImplementedError) as exc:
                msg = str(exc).splitlines()[0][:80]
                rows.append(
                    (f"{workload}, {name}", f"torch._grouped_mm failed: {msg}", None, t_mine, "report")
                )

    def loop_ffn() -> torch.Tensor:
        out = torch.empty(rows_n, h, device="cuda", dtype=torch.float16)
        for i, s, t in spans:
            hh = torch.matmul(x[s:t], gate_up[i].T)
            torch.matmul(torch.nn.functional.silu(hh[:, :f]) * hh[:, f:], down[i].T, out=out[s:t])
        return out

    def ours_ffn() -> torch.Tensor:
        tiles = ds_cuda.kernels.grouped_tiles(offs_d)
        act, _ = ds_cuda.grouped_swiglu(x, gate_up, offs_d, save_h=False, tiles=tiles)
        return ds_cuda.grouped_gemm(act, down, offs_d, w_transposed=True, tiles=tiles)

    check("expert FFN", ours_ffn(), loop_ffn(), 3e-2)
    t_loop, t_ours = timed(loop_ffn, reps, 3), timed(ours_ffn, reps, 3)
    rows.append(
        (
            f"expert FFN (SwiGLU fused), E={e}, H={h}, F={f}",
            "loop of torch ops per expert",
            t_loop,
            t_ours,
            ">= 1.5x",
        )
    )
    return rows


def bench_layer(quick: bool, reps: int) -> List[Row]:
    t, h, f, e, k = (64, 256, 128, 8, 2) if quick else (1024, 2048, 1408, 64, 8)
    ours, hf, hf_error = benchmarks.build_layers(h, f, e, k)
    ours = ours.to("cuda", torch.float16)
    x = torch.randn(t, h, device="cuda", dtype=torch.float16)
    workload = f"MoE layer forward T={t}, H={h}, F={f}, top-{k} of {e}, FP16"
    with torch.no_grad():
        t_ours = timed(lambda: ours(x), reps, 3)
        if hf is None:
            return [(workload, f"HF Qwen3-MoE block: {hf_error}", None, t_ours, "report")]
        hf = hf.to("cuda", torch.float16)
        y = ours(x)
        rows: List[Row] = []
        for impl in benchmarks.HF_IMPLEMENTATIONS:
            try:
                # In FP16 the two routers may break near-ties differently: a few tokens may
                # differ; more than 1% means a real disagreement, reported beside the times.
                y_hf = benchmarks.hf_forward(hf, impl, x).float()
                err = (y_hf - y.float()).abs().amax(dim=-1)
                off = (err > 3e-2 * max(y_hf.abs().max().item(), 1.0)).float().mean().item()
                note = "" if off <= 0.01 else f"; results differ on {off:.1%} of tokens"
                t_hf = timed(lambda impl=impl: benchmarks.hf_forward(hf, impl, x), reps, 3)
                rows.append((workload, f"HF Qwen3MoeSparseMoeBlock ({impl}){note}", t_hf, t_ours, "report"))
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                msg = str(exc).splitlines()[0][:80]
                rows.append((workload, f"HF block ({impl}) failed: {msg}", None, t_ours, "report"))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = common.parser("gpu", __doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (20)")
    common.add_json(parser)
    args = parser.parse_args(argv)
    machine = common.machine_info()
    print(common.format_machine(machine))
    reason = ds_cuda.unavailable_reason()
    if reason is not None:
        print(f"deepseek-rs bench gpu: nothing measured: {reason}", file=sys.stderr)
        return NO_DEVICE
    say = common.progress("gpu", args)
    reps = args.reps or (3 if args.quick else 20)
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {torch.cuda.get_device_name(0)} (compute capability {props.major}.{props.minor}, "
        f"{props.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    if args.quick:
        print(common.QUICK_NOTE)
    torch.manual_seed(0)
    rows: List[Dict[str, Any]] = []
    for title, bench in (
        ("GEMM", bench_gemm),
        ("grouped GEMM", bench_grouped),
        ("MoE layer forward", bench_layer),
    ):
        say(title)
        section = bench(args.quick, reps)
        print_table(title, section)
        rows += as_dicts(title, section)
    common.write_json(args.json, machine, args.quick, {"rows": rows})
    return 0
