"""The ``deepseek-rs`` command line.

``deepseek-rs bench moe [--quick] [--json PATH]`` runs the MoE benchmark and prints its table;
``deepseek-rs bench attention [--quick] ...`` the Dynamic Attention Routing benchmark.
Subcommands are argparse subparsers, so more (``serve``, ``filter``, ...) can be added beside
``bench``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _bench_moe(args: argparse.Namespace) -> int:
    from . import benchmarks

    machine = benchmarks.machine_info()

    show = not args.quiet and (args.progress or sys.stderr.isatty())

    def progress(msg: str) -> None:
        if show:
            print(f"[bench moe] {msg} ...", file=sys.stderr, flush=True)

    rows = benchmarks.run_moe(quick=args.quick, progress=progress)
    table = benchmarks.format_table(rows, machine)
    if args.quick:
        table = "quick run: tiny sizes, a smoke test; the targets apply to the full sizes only\n" + table
    print(table, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "quick": args.quick, "rows": rows}, f, indent=2)
            f.write("\n")
    return 0


def _bench_attention(args: argparse.Namespace) -> int:
    from . import attention_bench

    return attention_bench.main(args.extra)  # its own parser: `deepseek-rs bench attention --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseek-rs",
        description="deepseek-rs: DeepSeek-style MoE components for PyTorch (Rust on the CPU).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser("bench", help="run a benchmark", description="Run a benchmark.")
    benches = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    moe = benches.add_parser(
        "moe",
        help="router, dispatch + combine and the MoE layer against plain torch and Hugging Face",
        description=(
            "Time deepseek-rs's router, dispatch + combine and PEAMoE layer against plain torch "
            "and Hugging Face Qwen3-MoE on this machine (float32, same process, same input), "
            "and print a table of times, ratios and targets."
        ),
    )
    moe.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of a few seconds")
    moe.add_argument("--json", metavar="PATH", help="also write the machine and the rows as JSON to PATH")
    moe.add_argument(
        "--progress", action="store_true", help="progress messages on stderr even when it is not a terminal"
    )
    moe.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    moe.set_defaults(run=_bench_moe)
    attention = benches.add_parser(
        "attention",
        add_help=False,
        help="Dynamic Attention Routing: latency against SDPA and dense-vs-DAR language-model quality",
    )
    attention.set_defaults(run=_bench_attention)
    bench.set_defaults(run=lambda _args: _usage(bench))
    parser.set_defaults(run=lambda _args: _usage(parser))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.run is not _bench_attention:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
