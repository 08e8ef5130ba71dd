"""The data filter measured on real text, against plain Python and against datatrove, in one run.

``python benches/bench_filter.py [--quick] [--mb N]``

Corpus: real text available offline on this machine, not generated filler: the files under
``/usr/share/doc`` (plain and gzipped READMEs, changelogs, copyright notices) and the
docstrings of the Python standard library, alternated in a fixed order until ``--mb`` megabytes
(UTF-8) are reached.

* signals: ``compute_signals`` (Rust, all CPUs) against the same 30 signals in plain Python
  (``tests/filter_reference.py``, the reference the property tests check the Rust against; it
  is written to be read, not tuned for speed). Target: at least 30x.
* stage 1: ``DensityFilter`` (all signals + every default threshold) against datatrove's
  ``GopherQualityFilter`` then ``GopherRepetitionFilter`` (a document the first drops does not
  reach the second, as in a datatrove pipeline). Target: at least 10x. The agreement line
  compares decisions of our Gopher thresholds alone with datatrove's (they tokenise differently:
  datatrove uses spaCy words, we use whitespace words plus one word per CJK character).
* end to end: ``run_filter`` over gzipped JSONL shards of the corpus (read, signals, stage 1,
  annotated gzipped output of kept and dropped documents, stats, plot), as ``deepseek-rs filter``.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import pathlib
import platform
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from typing import Callable, List

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import filter_reference  # noqa: E402
from deepseek_rs.datafilter import DensityFilter, FilterConfig, compute_signals, run_filter  # noqa: E402
from deepseek_rs.datafilter.density import GOPHER_QUALITY, GOPHER_REPETITION, KEEP  # noqa: E402


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


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


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


def row(name: str, mb: float, ours: float, base: float, target: float) -> str:
    ratio = base / ours
    verdict = "meets" if ratio >= target else "below"
    return (
        f"{name:<10} {mb / ours:>10.2f} {mb / base:>12.2f} {ratio:>8.1f}x   >= {target:g}x ({verdict})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 0.3 MB corpus: a smoke test of seconds")
    ap.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of UTF-8 (default 4)")
    args = ap.parse_args()
    mb_target = 0.3 if args.quick else args.mb
    texts = corpus(mb_target)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    repeats = 1 if args.quick else 2  # best of this many, for ours and the baselines alike
    cpu = platform.processor() or platform.machine()
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), python {platform.python_version()}")
    print(f"corpus: {len(texts)} documents, {mb:.2f} MB (/usr/share/doc + stdlib docstrings)")
    print()
    print(f"{'':<10} {'ours MB/s':>10} {'baseline MB/s':>12} {'ratio':>8}   target")

    compute_signals(texts[:10])  # warm up the thread pool
    ours = best_of(lambda: compute_signals(texts), repeats)
    base = best_of(lambda: [filter_reference.signals(t) for t in texts], repeats)
    print(row("signals", mb, ours, base, 30) + "   baseline: the same signals, plain-Python test reference")

    density = DensityFilter()
    ours1 = best_of(lambda: density(texts), repeats)
    try:
        dt = datatrove_stage1()
        dt(texts[:5])  # loads the spaCy tokenizer
    except ImportError as e:
        print(f"stage 1    skipped: datatrove is not usable ({e}); pip install 'deepseek-rs[bench-filter]'")
    else:
        base1 = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            theirs = dt(texts)
            base1 = min(base1, time.perf_counter() - t)
        print(row("stage 1", mb, ours1, base1, 10) + "   baseline: datatrove GopherQuality+GopherRepetition")
        gopher = DensityFilter((*GOPHER_QUALITY, *GOPHER_REPETITION))
        codes = gopher(texts)[1]
        ours_keep = codes == KEEP
        kept_theirs = [r == "" for r in theirs]
        agree = sum(bool(a) == b for a, b in zip(ours_keep, kept_theirs)) / len(texts)
        print(
            f"agreement: our Gopher thresholds and datatrove's decide the same on {agree:.1%} of documents "
            f"(kept: ours {int(ours_keep.sum())}, datatrove {sum(kept_theirs)})"
        )
        top = Counter(r for r in theirs if r).most_common(3)
        print("  datatrove drops by: " + ", ".join(f"{r} {n}" for r, n in top))
        top = Counter(gopher.reasons[c] for c in codes if c != KEEP).most_common(3)
        print("  ours drops by:      " + ", ".join(f"{r} {n}" for r, n in top))

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
    print(
        f"end to end: deepseek-rs filter on {len(shards)} gzipped shards: {mb / passes:.2f} MB/s of text "
        f"({stats['read']} read, {stats['kept']} kept, {stats['dropped']} dropped); "
        f"the PNG plot adds {total - passes:.2f} s"
    )


if __name__ == "__main__":
    main()
