"""The ``deepseek-rs`` command line.

``deepseek-rs bench NAME [--quick] ...`` runs one benchmark of :data:`BENCHMARKS` (moe, attention,
batching, filter, quant, gvrt, uss, gpu): ``deepseek_rs.bench.<name>.main`` parses its own options
(``deepseek-rs bench NAME --help``), prints its tables and, with ``--json PATH``, writes them.
``deepseek-rs serve [--model MODULE:FACTORY] [--port N] ...`` serves a model over HTTP through
the dynamic batcher (see ``deepseek_rs.serving.server``).
``deepseek-rs filter INPUT... -o OUTDIR [--config filter.yaml]`` filters JSONL shards.
``deepseek-rs tune [--model-config PATH] ...`` chooses the MoE experts' CPU backend ahead of time.
``deepseek-rs reproduce [--quick] [--only ROW ...] [--out DIR]`` writes the ledger of the article's claims.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__
from .errors import DeepseekError

# Every benchmark: ``deepseek_rs.bench.<name>.main(argv)`` parses its own options; the line
# ``deepseek-rs bench --help`` shows for each.
BENCHMARKS = {
    "moe": "router, dispatch + combine and the MoE layer against plain torch and Hugging Face",
    "attention": "Dynamic Attention Routing: latency against SDPA and dense-vs-DAR language-model quality",
    "batching": "dynamic batching over HTTP: QPS and latency of one server with batching off and on",
    "filter": "the data filter on real text: signals and stage 1 against plain Python and datatrove",
    "quant": "INT8: QAT against PTQ accuracy on real digits, memory and latency against fp32",
    "gvrt": "GVRT against no and fixed clipping: a byte-level LM trained through injected gradient spikes",
    "uss": "USS against a two-tower model: text-to-image recall on captioned handwritten digits",
    "gpu": "the CUDA kernels against cuBLAS, a per-expert loop and HF on one GPU (needs a CUDA device)",
}


def _serve(args: argparse.Namespace) -> int:
    import torch

    from .config import BatchingConfig, parse_config
    from .serving import server as serve

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batching = BatchingConfig()
    if args.config is not None:
        batching = parse_config(args.config).batching or batching
    sizes = {
        "min_size": args.min_batch_size if args.min_batch_size is not None else batching.min_size,
        "max_size": args.max_batch_size if args.max_batch_size is not None else batching.max_size,
    }
    delay_ms = args.max_queue_delay_ms if args.max_queue_delay_ms is not None else batching.max_queue_delay_ms
    kwargs = dict(
        sizes, max_queue_delay=delay_ms / 1000.0, max_queue_size=args.max_queue_size, timeout=args.timeout
    )
    if args.collate is not None:
        kwargs["collate"] = args.collate
    if args.item_shape is not None:
        try:
            kwargs["item_shape"] = tuple(int(d) for d in args.item_shape.split(",") if d.strip())
        except ValueError:
            print(
                f"--item-shape must be integers separated by commas, got {args.item_shape!r}", file=sys.stderr
            )
            return 2
    if args.max_batch_cost is not None:
        kwargs["max_batch_cost"] = args.max_batch_cost
    enabled = not args.no_batching and batching.strategy == "dynamic"
    # Printed by the server once the model is loaded and warm and the socket listens.
    banner = (
        f"deepseek-rs serve: {args.model or 'built-in PEAMoE'} "
        f"(batching {'on: ' + str(sizes) if enabled else 'off'}) ready,"
    )
    serve.run(
        args.model,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        batching=enabled,
        max_body_bytes=args.max_body_bytes,
        drain_delay=args.drain_delay,
        access_log=args.access_log,
        banner=banner,
        batch_invariant=args.batch_invariant,
        **kwargs,
    )
    return 0


def _filter(args: argparse.Namespace) -> int:
    from .datafilter import FilterConfig, run_filter

    config = FilterConfig.from_yaml(args.config) if args.config else FilterConfig()
    show = not args.quiet and (args.progress or sys.stderr.isatty())
    stats = run_filter(args.inputs, args.output, config, progress=show, keep_work=args.keep_work)
    print(
        f"read {stats['read']} documents: kept {stats['kept']}, dropped {stats['dropped']}, "
        f"malformed lines {stats['malformed_lines']}, withheld as damaged {stats['damaged_lines']}; "
        f"stats in {args.output}/stats.json",
        flush=True,
    )
    for m in stats["malformed"][:10]:
        print(f"  malformed: {m['file']}:{m['line']}: {m['error']}", file=sys.stderr)
    for d in stats["damaged"]:
        print(
            f"deepseek-rs filter: {d['file']} is damaged at compressed byte {d['offset']}: "
            f"{d['withheld_lines']} line(s) from there on withheld (in neither kept/ nor dropped/); "
            f"{d['error']}",
            file=sys.stderr,
        )
    # Damaged input: the verified part is filtered, but the run says so in its status.
    return 1 if stats["damaged"] else 0


def _tune(args: argparse.Namespace) -> int:
    """``deepseek-rs tune ...``: ``deepseek_rs.moe.pretune.main`` parses the rest itself."""
    from .moe import pretune

    return int(pretune.main(args.extra))


def _train_reference(args: argparse.Namespace) -> int:
    """``deepseek-rs train-reference ...``: ``deepseek_rs.lm.commands.main`` parses the rest."""
    from .lm import commands

    return int(commands.main(args.extra))


def _lm_experiment(args: argparse.Namespace) -> int:
    """``deepseek-rs lm-experiment ...``: ``deepseek_rs.lm.experiments.main`` parses the rest."""
    from .lm import experiments

    return int(experiments.main(args.extra))


def _reproduce(args: argparse.Namespace) -> int:
    """``deepseek-rs reproduce ...``: ``deepseek_rs.reproduce.command.main`` parses the rest itself."""
    from .reproduce import command

    return int(command.main(args.extra))


def _config(args: argparse.Namespace) -> int:
    """``deepseek-rs config schema {filter,optimize}`` / ``config check {filter,optimize} FILE``."""
    import json

    from .schema import json_schema

    if args.kind == "filter":
        from .datafilter.config import FilterConfig, FilterFile

        model, check = FilterFile, FilterConfig.from_yaml
    else:
        from .config import OptimizationFile, parse_config

        model, check = OptimizationFile, parse_config
    if args.action == "schema":
        print(json.dumps(json_schema(model), indent=2))
        return 0
    if args.file is None:
        print("deepseek-rs config check: give the YAML file to check", file=sys.stderr)
        return 2
    check(args.file)  # an InvalidValueError names the field; main prints it and returns 1
    print(f"{args.file}: a valid {args.kind} configuration")
    return 0


def _bench_module(args: argparse.Namespace) -> int:
    """``deepseek-rs bench NAME ...``: ``deepseek_rs.bench.NAME.main`` parses the rest itself."""
    import importlib

    from .bench import common

    try:
        module = importlib.import_module(f"{__package__}.bench.{args.benchmark}")
        return int(module.main(args.extra))
    except ModuleNotFoundError as e:  # an optional dependency imported where it is needed
        if (e.name or "").split(".")[0] not in common.EXTRAS:
            raise
        raise common.MissingExtra(e.name, f"deepseek-rs bench {args.benchmark}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseek-rs",
        description=(
            "deepseek-rs: the techniques of the DeepSeek models as PyTorch components (MoE with "
            "progressive expert activation, Dynamic Attention Routing, dynamic batching, the data "
            "filter); Rust on the CPU, CUDA through CuPy on the GPU."
        ),
    )
    parser.add_argument("--version", action="version", version=f"deepseek-rs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser("bench", help="run a benchmark", description="Run a benchmark.")
    benches = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, line in BENCHMARKS.items():
        sub = benches.add_parser(name, add_help=False, help=line)  # --help goes to the module's parser
        sub.set_defaults(run=_bench_module, passes_extra=True)
    bench.set_defaults(run=lambda _args: _usage(bench))

    tune = commands.add_parser(
        "tune",
        add_help=False,  # --help goes to pretune's parser
        help="time the MoE expert FFN's CPU backends for a model's shapes and cache the fastest",
    )
    tune.set_defaults(run=_tune, passes_extra=True)
    ref = commands.add_parser(
        "train-reference",
        add_help=False,  # --help goes to deepseek_rs.lm.commands' parser
        help="build the offline corpus and train the reference MoE language model",
    )
    ref.set_defaults(run=_train_reference, passes_extra=True)
    lmx = commands.add_parser(
        "lm-experiment",
        add_help=False,  # --help goes to deepseek_rs.lm.experiments' parser
        help="measure an article claim (pea, filter, int8) on the reference language model",
    )
    lmx.set_defaults(run=_lm_experiment, passes_extra=True)
    rep = commands.add_parser(
        "reproduce",
        add_help=False,  # --help goes to the reproduce parser
        help="every claim of the article measured against a baseline, or marked: the ledger",
    )
    rep.set_defaults(run=_reproduce, passes_extra=True)
    srv = commands.add_parser(
        "serve",
        help="serve a model over HTTP through the dynamic batcher",
        description=(
            "Serve a torch module over HTTP (POST /v1/infer, GET /health, GET /metrics) through a "
            "DynamicBatcher. SIGTERM stops intake and answers every accepted request before exiting."
        ),
    )
    srv.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="package.module:factory giving an nn.Module (default: a small PEAMoE)",
    )
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--config",
        metavar="YAML",
        help="the article's optimization YAML: its batching section applies (flags win)",
    )
    srv.add_argument("--min-batch-size", type=int, help="requests a batch waits for (default 4)")
    srv.add_argument("--max-batch-size", type=int, help="requests per batch at most (default 32)")
    srv.add_argument("--max-queue-delay-ms", type=float, help="longest wait for min-batch-size (default 5)")
    srv.add_argument(
        "--max-queue-size", type=int, default=1024, help="waiting requests before 429 (default 1024)"
    )
    srv.add_argument("--timeout", type=float, help="default per-request deadline in seconds (504 past it)")
    srv.add_argument("--collate", choices=["stack", "pad", "ragged"], help="how inputs are batched")
    srv.add_argument(
        "--item-shape",
        metavar="D[,D...]",
        help="shape every input must have (its trailing shape for pad/ragged)",
    )
    srv.add_argument(
        "--max-batch-cost", type=int, help="rows per batch at most (pad/ragged); a longer request is a 400"
    )
    srv.add_argument(
        "--max-body-bytes", type=int, default=16 << 20, help="larger bodies get 413 (default 16 MiB)"
    )
    srv.add_argument("--no-batching", action="store_true", help="one request per model call (the baseline)")
    srv.add_argument("--threads", type=int, help="torch intra-op threads")
    srv.add_argument(
        "--drain-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="on SIGTERM, keep serving S seconds with /health answering 503 before draining (default 0)",
    )
    srv.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    srv.add_argument(
        "--access-log", action="store_true", help="log one line per request on stderr (uvicorn's access log)"
    )
    srv.add_argument(
        "--batch-invariant",
        action="store_true",
        help="a request's answer has the same bits whatever its batch neighbours (PEAMoE, CPU, float32)",
    )
    srv.set_defaults(run=_serve)
    filt = commands.add_parser(
        "filter",
        help="filter JSONL shards: semantic density, domain screening, hard-example mining",
        description=(
            'Filter JSONL shards ({"id": ..., "text": ...} per line; plain, .gz or .zst) into '
            "OUTDIR/kept and OUTDIR/dropped, with OUTDIR/stats.json and OUTDIR/signals.png. "
            "Resumable: rerun the same command after an interruption. A compressed shard is "
            "verified member by member (gzip) or frame by frame (zstd) before it is read; from "
            "damage on, its lines are withheld and listed in stats.json, and the exit status is 1."
        ),
    )
    filt.add_argument("inputs", nargs="+", metavar="INPUT", help="input JSONL shards")
    filt.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    filt.add_argument("--config", metavar="YAML", help="filter configuration (deepseek_rs.datafilter.config)")
    filt.add_argument(
        "--progress", action="store_true", help="progress bars on stderr even when it is not a terminal"
    )
    filt.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    filt.add_argument(
        "--keep-work",
        action="store_true",
        help="keep OUTDIR/.work (the resumable intermediate files) after the run; removed by default",
    )
    filt.set_defaults(run=_filter)
    cfg = commands.add_parser(
        "config",
        help="the JSON Schema of a configuration file, or check one",
        description=(
            "schema: print the JSON Schema of the filter YAML (filter) or of the article's "
            "optimization YAML (optimize). check: validate a file; a bad field is named by its path."
        ),
    )
    cfg.add_argument("action", choices=["schema", "check"])
    cfg.add_argument("kind", choices=["filter", "optimize"])
    cfg.add_argument("file", nargs="?", metavar="YAML", help="the file to check (check only)")
    cfg.set_defaults(run=_config)
    parser.set_defaults(run=lambda _args: _usage(parser))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.run(args))
    except DeepseekError as e:  # bad input: one clear line, no traceback
        print(f"deepseek-rs: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
