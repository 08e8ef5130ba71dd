"""The data filter measured on real text, against plain Python and against datatrove, in one run.

``deepseek-rs bench filter [--quick] [--mb N] [--json PATH]`` (the datatrove comparison needs
the ``bench-filter`` extra; without it that row is skipped with a message)

Corpus: real text available offline on this machine, not generated filler: the files under
``/usr/share/doc`` (plain and gzipped READMEs, changelogs, copyright notices) and the
docstrings of the Python standard library, alternated in a fixed order until ``--mb`` megabytes
(UTF-8) are reached.

* signals: ``compute_signals`` (Rust, all CPUs) against the same 30 signals in plain Python
  (:mod:`deepseek_rs.bench.filter_reference`, the reference the property tests check the Rust
  against; it is written to be read, not tuned for speed), after checking that both compute the
  same values on every document. Target: at least 30x.
* stage 1: ``DensityFilter`` (all signals + every default threshold) against datatrove's
  ``GopherQualityFilter`` then ``GopherRepetitionFilter`` (a document the first drops does not
  reach the second, as in a datatrove pipeline). Target: at least 10x. The agreement line
  compares decisions of our Gopher thresholds alone with datatrove's (they tokenise differently:
  datatrove uses spaCy words, we use whitespace words plus one word per CJK character).
* end to end: ``run_filter`` over gzipped JSONL shards of the corpus (read, signals, stage 1,
  annotated gzipped output of kept and dropped documents, stats, plot), as ``deepseek-rs filter``;
  its kept and dropped counts must add up to the documents read and agree with stage 1 in memory.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import pathlib
import sysconfig
import tempfile
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional

from ..datafilter import DensityFilter, FilterConfig, compute_signals, run_filter
from ..datafilter.density import GOPHER_QUALITY, GOPHER_REPETITION, KEEP
from ..datafilter.signals import SIGNAL_NAMES
from . import common, filter_reference

SIGNALS_TARGET, STAGE1_TARGET = 30.0, 10.0


def debian_docs() -> List[str]:
    out = []
    for p in sorted(pathlib.Path("/usr/share/doc").rglob("*")):
        if not p.is_file() or p.is_symlink() or p.stat().st_size > 1 << 20:
            continue
        try:
            data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue  # binary files and other encodings
        if text.strip():
            out.append(text)
    return out


def stdlib_docstrings() -> List[str]:
    out = []
    for p in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in p.parts or "test" in p.parts:
            continue
        try:
            tree = ast.parse(p.read_text("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    out.append(doc)
    return out


def corpus(mb: float) -> List[str]:
    docs = debian_docs()
    strings = stdlib_docstrings()
    mixed = [d for pair in zip(docs, strings) for d in pair] + docs[len(strings) :] + strings[len(docs) :]
    out, size = [], 0
    for d in mixed:
        if size >= mb * 1e6:
            break
        out.append(d)
        size += len(d.encode())
    return out


def best_of(fn: Callable[[], Any], repeats: int):
    """(the best time of ``repeats`` calls, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def datatrove_stage1():
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    quality, repetition = GopherQualityFilter(), GopherRepetitionFilter()

    def run(texts: List[str]) -> List[str]:
        """The drop reason of each text ("" when kept)."""
        reasons = []
        for i, t in enumerate(texts):
            doc = Document(text=t, id=str(i))
            verdict = quality.filter(doc)
            if verdict is True:
                verdict = repetition.filter(doc)
            if isinstance(verdict, tuple):  # (False, reason)
                verdict = verdict[1]
            reasons.append("" if verdict is True else str(verdict))
        return reasons

    return run


def signals_agree(ours, reference: List[Dict[str, float]]) -> int:
    """Documents on which every signal of ours equals the plain-Python reference's (as the
    property tests compare them: relative 1e-9)."""
    return sum(
        all(math.isclose(g, want[name], rel_tol=1e-9, abs_tol=1e-12) for name, g in zip(SIGNAL_NAMES, row))
        for row, want in zip(ours.tolist(), reference)
    )


def row(name: str, mb: float, ours: float, base: float, target: float) -> Dict[str, Any]:
    ratio = base / ours
    return {
        "name": name,
        "ours_s": ours,
        "baseline_s": base,
        "ours_mb_s": mb / ours,
        "baseline_mb_s": mb / base,
        "ratio": ratio,
        "target": target,
        "met": ratio >= target,
    }


def format_row(r: Dict[str, Any], baseline: str) -> str:
    verdict = "meets" if r["met"] else "below"
    return (
        f"{r['name']:<10} {r['ours_mb_s']:>10.2f} {r['baseline_mb_s']:>12.2f} {r['ratio']:>8.1f}x   "
        f">= {r['target']:g}x ({verdict})   baseline: {baseline}"
    )


def end_to_end(texts: List[str], mb: float) -> Dict[str, Any]:
    """``run_filter`` over 4 or 5 gzipped JSONL shards of ``texts`` in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        per = max(1, len(texts) // 4)
        for s in range(0, len(texts), per):
            p = pathlib.Path(tmp) / f"shard{s // per}.jsonl.gz"
            with gzip.open(p, "wt") as f:
                for i, t in enumerate(texts[s : s + per]):
                    f.write(json.dumps({"id": f"{s}-{i}", "text": t}) + "\n")
            shards.append(p)
        t = time.perf_counter()
        stats = run_filter(shards, pathlib.Path(tmp) / "out", FilterConfig())
        total = time.perf_counter() - t
    passes = stats["seconds"]  # reading, stages, writing and stats.json; not the plot
    return {
        "shards": len(shards),
        "read": stats["read"],
        "kept": stats["kept"],
        "dropped": stats["dropped"],
        "malformed_lines": stats["malformed_lines"],
        "dropped_by_reason": stats["dropped_by_reason"],
        "seconds": passes,
        "mb_s": mb / passes,
        "plot_s": total - passes,
    }


def run(mb_target: float, repeats: int, say: Callable[[str], None]) -> Dict[str, Any]:
    say("reading the corpus")
    texts = corpus(mb_target)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"workload: {len(texts)} documents, {mb:.2f} MB (/usr/share/doc + stdlib docstrings)")
    print()
    print(f"{'':<10} {'ours MB/s':>10} {'baseline MB/s':>12} {'ratio':>8}   target")
    out: Dict[str, Any] = {"documents": len(texts), "mb": mb}

    say("signals")
    compute_signals(texts[:10])  # warm up the thread pool
    ours_t, ours = best_of(lambda: compute_signals(texts), repeats)
    base_t, reference = best_of(lambda: [filter_reference.signals(t) for t in texts], repeats)
    sig = row("signals", mb, ours_t, base_t, SIGNALS_TARGET)
    sig["documents_agreeing"] = signals_agree(ours, reference)
    out["signals"] = sig
    print(format_row(sig, "the same signals, plain-Python reference"))
    print(
        f"           the two agree on all {len(SIGNAL_NAMES)} signals of {sig['documents_agreeing']} of "
        f"{len(texts)} documents"
    )

    say("stage 1")
    density = DensityFilter()
    ours1, (_, codes) = best_of(lambda: density(texts), repeats)
    out["stage1"] = {
        "ours_s": ours1,
        "kept": int((codes == KEEP).sum()),
        "dropped_by_reason": dict(Counter(density.reasons[c] for c in codes if c != KEEP).most_common()),
    }
    if not common.has_module("datatrove"):
        e = common.MissingExtra("datatrove", "the stage-1 comparison with datatrove")
        out["stage1"]["datatrove"] = f"skipped: {e}"
        print(f"stage 1    skipped: {e}")
    else:
        say("datatrove stage 1")
        dt = datatrove_stage1()
        dt(texts[:5])  # loads the spaCy tokenizer
        base1, theirs = best_of(lambda: dt(texts), repeats)
        r = row("stage 1", mb, ours1, base1, STAGE1_TARGET)
        print(format_row(r, "datatrove GopherQuality+GopherRepetition"))
        gopher = DensityFilter((*GOPHER_QUALITY, *GOPHER_REPETITION))
        gcodes = gopher(texts)[1]
        ours_keep = gcodes == KEEP
        kept_theirs = [t == "" for t in theirs]
        agree = sum(bool(a) == b for a, b in zip(ours_keep, kept_theirs)) / len(texts)
        r.update(
            agreement=agree, gopher_kept_ours=int(ours_keep.sum()), gopher_kept_datatrove=sum(kept_theirs)
        )
        out["stage1"].update(r)
        print(
            f"agreement: our Gopher thresholds and datatrove's decide the same on {agree:.1%} of documents "
            f"(kept: ours {int(ours_keep.sum())}, datatrove {sum(kept_theirs)})"
        )
        top = Counter(t for t in theirs if t).most_common(3)
        print("  datatrove drops by: " + ", ".join(f"{t} {n}" for t, n in top))
        top = Counter(gopher.reasons[c] for c in gcodes if c != KEEP).most_common(3)
        print("  ours drops by:      " + ", ".join(f"{t} {n}" for t, n in top))

    say("end to end")
    e2e = end_to_end(texts, mb)
    out["end_to_end"] = e2e
    print(
        f"end to end: deepseek-rs filter on {e2e['shards']} gzipped shards: {e2e['mb_s']:.2f} MB/s of text "
        f"({e2e['read']} read, {e2e['kept']} kept, {e2e['dropped']} dropped; stage 1 in memory kept "
        f"{out['stage1']['kept']}); the PNG plot adds {e2e['plot_s']:.2f} s"
    )
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = common.parser("filter", __doc__)
    ap.add_argument(
        "--mb", type=float, default=4.0, help="corpus size in MB of UTF-8 (default 4; --quick: 0.3)"
    )
    common.add_json(ap)
    args = ap.parse_args(argv)
    machine = common.machine_info()
    print(common.format_machine(machine))
    repeats = 1 if args.quick else 2  # best of this many, for ours and the baselines alike
    results = run(0.3 if args.quick else args.mb, repeats, common.progress("filter", args))
    common.write_json(args.json, machine, args.quick, results)
    return 0
