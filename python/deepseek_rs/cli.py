"""The ``deepseek-rs`` command line.

``deepseek-rs bench moe [--quick] [--json PATH]`` runs the MoE benchmark and prints its table.
``deepseek-rs filter INPUT... -o OUTDIR [--config filter.yaml]`` filters JSONL shards.
Subcommands are argparse subparsers, so more (``serve``, ``filter``, ...) can be added beside
``bench``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .errors import DeepseekError


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


def _filter(args: argparse.Namespace) -> int:
    from .datafilter import FilterConfig, run_filter

    config = FilterConfig.from_yaml(args.config) if args.config else FilterConfig()
    show = not args.quiet and (args.progress or sys.stderr.isatty())
    stats = run_filter(args.inputs, args.output, config, progress=show)
    print(
        f"read {stats['read']} documents: kept {stats['kept']}, dropped {stats['dropped']}, "
        f"malformed lines {stats['malformed_lines']}; stats in {args.output}/stats.json",
        flush=True,
    )
    for m in stats["malformed"][:10]:
        print(f"  malformed: {m['file']}:{m['line']}: {m['error']}", file=sys.stderr)
    unreadable = [shard for shard in stats["shards"] if "stream_error" in shard]
    for shard in unreadable:
        print(f"  unreadable after line {shard['lines']}: {shard['stream_error']}", file=sys.stderr)
    # A shard cut short is filtered as far as it could be read, but the run says so in its status.
    return 1 if unreadable else 0


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
    bench.set_defaults(run=lambda _args: _usage(bench))

    filt = commands.add_parser(
        "filter",
        help="filter JSONL shards: semantic density, domain screening, hard-example mining",
        description=(
            "Filter JSONL shards ({\"id\": ..., \"text\": ...} per line; plain, .gz or .zst) into "
            "OUTDIR/kept and OUTDIR/dropped, with OUTDIR/stats.json and OUTDIR/signals.png. "
            "Resumable: rerun the same command after an interruption."
        ),
    )
    filt.add_argument("inputs", nargs="+", metavar="INPUT", help="input JSONL shards")
    filt.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    filt.add_argument("--config", metavar="YAML", help="filter configuration (deepseek_rs.datafilter.config)")
    filt.add_argument(
        "--progress", action="store_true", help="progress bars on stderr even when it is not a terminal"
    )
    filt.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    filt.set_defaults(run=_filter)
    parser.set_defaults(run=lambda _args: _usage(parser))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except DeepseekError as e:  # bad input: one clear line, no traceback
        print(f"deepseek-rs: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
