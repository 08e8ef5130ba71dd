"""``deepseek-rs reproduce [--quick] [--only ROW ...] [--out DIR] [--lm-results DIR]``: every claim
of the article measured (or marked), printed as a table, written to ``DIR/ledger.json``,
``DIR/ledger.md`` and one PNG per row where a curve says more than a number."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..bench import common
from . import ledger
from .claims import BY_ID, CLAIMS
from .rows import ROWS, Context


def lm_results_default() -> Path:
    """Where the reference LM's experiments write their JSON (issue 16, ``scripts/lm_experiments.sh``):
    ``docs/lm-results`` of the current directory, else of the source tree this package runs from."""
    here = Path("docs") / "lm-results"
    tree = Path(__file__).resolve().parents[3] / "docs" / "lm-results"
    return here if here.is_dir() or not tree.is_dir() else tree


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepseek-rs reproduce",
        description=(
            "Every claim of the article, one row each: measured here against a baseline that could beat "
            "it, or marked 'not measurable here' with what would measure it. Writes ledger.json, ledger.md "
            "and the rows' PNGs to --out; progress on stderr."
        ),
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke run of a few minutes")
    p.add_argument(
        "--only", nargs="+", metavar="ROW", choices=list(ROWS), help=f"just these rows ({', '.join(ROWS)})"
    )
    p.add_argument(
        "--out", type=Path, default=Path("reproduce-out"), help="output directory (default reproduce-out)"
    )
    p.add_argument(
        "--lm-results",
        type=Path,
        default=None,
        help="directory of the reference LM's experiment JSON files (pea.json, filter.json, int8.json); "
        f"default {lm_results_default()}",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def run(
    quick: bool,
    only: Optional[List[str]],
    out: Path,
    lm_results: Optional[Path] = None,
    quiet: bool = False,
) -> Dict[str, Any]:
    """Measure the rows (all, or ``only``), write the ledger to ``out``; return it."""
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if not quiet:
            print(f"[reproduce] {msg}", file=sys.stderr, flush=True)

    machine = common.machine_info()
    machine_line = (
        f"{machine['cpus']} CPUs, {machine['cpu_model']} ({machine['isa']}), GPU: {machine['gpu'] or 'none'}"
    )
    ctx = Context(quick, out, say, machine, lm_results or lm_results_default())
    ids = [c.id for c in CLAIMS if only is None or c.id in only]
    start = time.perf_counter()
    rows, failed = [], []
    for i, rid in enumerate(ids, 1):
        say(f"({i}/{len(ids)}) {rid}: {BY_ID[rid].statement}")
        t, load = time.perf_counter(), os.getloadavg()[0]
        try:
            # the benchmarks print their own tables: to stderr, with the progress
            with contextlib.redirect_stdout(sys.stderr):
                finding = ROWS[rid](ctx)
        except common.MissingExtra as e:
            finding = ledger.not_measurable(str(e), f"install the extra, then {command(rid, quick)}")
        except Exception as e:  # a failing row is reported, the others still run
            traceback.print_exc(file=sys.stderr)
            failed.append(rid)
            finding = ledger.not_measurable(
                f"the measurement failed: {type(e).__name__}: {e}",
                f"fix the failure, then {command(rid, quick)}",
            )
        seconds = time.perf_counter() - t
        rows.append(ledger.entry(BY_ID[rid], finding, machine_line, command(rid, quick), seconds, quick))
        if finding.machine is None:  # measured here: the machine's 1-minute load when the row started
            rows[-1]["load_average"] = round(load, 2)
        say(f"{rid}: {finding.verdict} ({seconds:.0f} s)")
    rows, before = merge(out / "ledger.json", rows, quick, machine_line) if only else (rows, None)
    merged = before is not None
    this = (
        "deepseek-rs reproduce"
        + (" --quick" if quick else "")
        + (f" --only {' '.join(only)}" if only else "")
    )
    result = {
        "command": f"{before}, then {this}" if merged else this,
        "quick": quick,
        "machine": machine_line,
        "machine_info": machine,
        "seconds": sum(r["seconds"] for r in rows) if merged else time.perf_counter() - start,
        "failed": failed,
        "rows": rows,
    }
    ledger.write(result, out)
    return result


def merge(
    path: Path, rows: List[Dict[str, Any]], quick: bool, machine: str
) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """(the rows of the ledger at ``path``, those of ``rows`` replaced or added, its command) when
    ``path`` holds a ledger of the same kind (quick or full) from this machine; else (``rows``,
    None). So ``--only ROW`` reruns rows of an earlier ledger in place."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return rows, None
    if old.get("quick") != quick or old.get("machine") != machine:
        return rows, None
    by_id = {r["id"]: r for r in old.get("rows", [])}
    by_id.update({r["id"]: r for r in rows})
    return [by_id[c.id] for c in CLAIMS if c.id in by_id], old.get("command", "deepseek-rs reproduce")


def command(rid: str, quick: bool) -> str:
    return f"deepseek-rs reproduce --only {rid}" + (" --quick" if quick else "")


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    result = run(args.quick, args.only, args.out, args.lm_results, args.quiet)
    print(f"machine: {result['machine']}")
    print(ledger.table(result["rows"]))
    print(f"({result['seconds']:.0f} s; {args.out / 'ledger.json'}, {args.out / 'ledger.md'})")
    return 1 if result["failed"] else 0


__all__ = ["command", "lm_results_default", "main", "parser", "run"]

if __name__ == "__main__":
    sys.exit(main())
