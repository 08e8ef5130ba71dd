"""The filter over JSONL shards: ``run_filter(inputs, outdir, config)``, behind ``deepseek-rs filter``.

Three passes, each resumable because every file is written atomically (temporary name, then
rename) and a finished step's file is never redone:

1. per input shard, streamed batch by batch: read (Rust), signals, stage 1 (density), stage 2
   (domain), and the embeddings of the survivors when stage 3 is on -> raw arrays
   ``OUTDIR/.work/<shard>.{codes,signals,extra,embeddings}.*`` and ``<shard>.meta.json`` (last);
2. stage 3 (hard-example mining) over the survivors of all shards -> ``.work/hard_examples.npz``;
3. per input shard: read again and write ``OUTDIR/kept/<shard>.jsonl.gz`` and
   ``OUTDIR/dropped/<shard>.jsonl.gz``, every document annotated with its signals, decision and
   reason -> ``.work/<shard>.done.json``.

Memory holds one batch at a time, plus 4 bytes per document of the shard being written and, for
stage 3, the embeddings of every survivor (near-duplicates are found across the corpus).
Finally ``OUTDIR/stats.json`` (counts per stage and reason, malformed lines with file and line,
damaged shards, signal histograms) and ``OUTDIR/signals.png``. For every shard and in total, kept
+ dropped must equal the documents read, or the run fails. After success ``.work/`` is removed
(``keep_work=True`` keeps it); killed at any moment, the same call again finishes the run with
the same output as an uninterrupted one.

Damaged input: the reader verifies every gzip member / zstd frame of a compressed shard before
reading any of it (``_core.JsonlReader``), so a kept or dropped document is always byte for byte
a line of its input. What lies in or after the first member/frame that fails to verify (or after
a cut) is withheld: written nowhere, counted in the shard's ``damaged`` entry of the stats with
the compressed byte offset of the damage; ``deepseek-rs filter`` then exits with status 1.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _core
from ..errors import DeepseekError, InvalidValueError, ShardError
from .config import FilterConfig
from .density import KEEP, DensityFilter
from .domain import DSIRDomainFilter, LDADomainFilter
from .embed import HashedEmbedder, MiniLMEncoder
from .hard_examples import REASONS as HARD_REASONS
from .hard_examples import mine_hard_examples
from .plot import plot_signals
from .signals import HISTOGRAM_BINS, SIGNAL_NAMES, histogram_range, histograms

MAX_REPORTED_ERRORS = 1000
EXTRA_COLUMNS = ("semantic_density", "domain_score", "difficulty")


class AccountingError(DeepseekError, RuntimeError):
    """Kept + dropped documents do not add up to the documents read."""


def _shard_names(inputs: Sequence[Path]) -> List[str]:
    """A distinct output name per input (its file name without .jsonl/.gz/.zst, numbered on clashes)."""
    seen: Dict[Path, Path] = {}
    for p in inputs:
        r = p.resolve()
        if r in seen:
            raise InvalidValueError(f"{p} is given twice (as {seen[r]})")
        seen[r] = p
    names: List[str] = []
    for p in inputs:
        stem = p.name
        for suffix in (".gz", ".zst", ".zstd", ".jsonl", ".json"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        base = stem or "shard"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def _atomic_savez(path: Path, **arrays: Any) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_texts(paths: Sequence[Union[str, Path]], limit: Optional[int], config: FilterConfig) -> List[str]:
    """The texts of ``paths``; with ``limit``, about ``limit / len(paths)`` from each shard, so a
    sample covers every shard. The readable part of a corrupt shard counts."""
    per = None if limit is None else -(-limit // max(1, len(paths)))
    texts: List[str] = []
    for p in paths:
        got: List[str] = []
        try:
            for batch in _core.JsonlReader(
                str(p), config.batch_docs, config.batch_bytes, config.max_line_bytes
            ):
                got.extend(batch.texts)
                if per is not None and len(got) >= per:
                    break
        except ShardError:
            pass  # the verified part only; pass 1 reports the damage
        texts.extend(got if per is None else got[:per])
    return texts


class _Stages:
    """The per-document stages (1 and 2) and stage 3's embedder, built once per run."""

    def __init__(self, config: FilterConfig, inputs: Sequence[Path]):
        self.config = config
        self.density = DensityFilter(config.thresholds) if config.density else None
        self.reasons = _reason_table(config)
        first_hard = len(self.reasons) - len(HARD_REASONS)
        self.model_reason, self.domain_reason = first_hard - 2, first_hard - 1
        self.encoder = None
        if config.model_density is not None or (config.hard_examples and config.embedding == "minilm"):
            self.encoder = MiniLMEncoder()
        self.domain: Optional[Union[LDADomainFilter, DSIRDomainFilter]] = None
        if config.domain is not None:
            reference = _read_texts(config.reference, None, config)
            if config.domain == "lda":
                self.domain = LDADomainFilter(
                    config.topics, config.buckets, config.keep_quantile, config.seed, config.lda_score
                )
                self.domain.fit(reference)
            else:
                raw = _read_texts(inputs, config.raw_sample, config)
                self.domain = DSIRDomainFilter(config.buckets, config.keep_quantile).fit(reference, raw)
        self.embedder: Optional[Callable[[Sequence[str]], np.ndarray]] = None
        if config.hard_examples:
            if config.embedding == "minilm":
                self.embedder = self.encoder
            else:
                self.embedder = HashedEmbedder(seed=config.seed)

    def run(
        self, texts: List[str], signals: np.ndarray
    ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(reason codes, extra columns, embeddings of the survivors or None)."""
        n = len(texts)
        codes = self.density.decide(signals) if self.density is not None else np.full(n, KEEP, np.int32)
        extra = np.full((n, len(EXTRA_COLUMNS)), np.nan)
        alive = np.flatnonzero(codes == KEEP)
        if self.config.model_density is not None and len(alive):
            assert self.encoder is not None
            d = self.encoder.semantic_density([texts[i] for i in alive], self.config.model_segments)
            extra[alive, 0] = d
            codes[alive[d < self.config.model_density]] = self.model_reason
            alive = np.flatnonzero(codes == KEEP)
        if self.domain is not None and len(alive):
            s = self.domain.score([texts[i] for i in alive])
            extra[alive, 1] = s
            codes[alive[~self.domain.keep_scores(s)]] = self.domain_reason
            alive = np.flatnonzero(codes == KEEP)
        emb = None
        if self.embedder is not None:
            emb = self.embedder([texts[i] for i in alive]) if len(alive) else np.zeros((0, 1), np.float32)
        return codes, extra, emb


def _paths(work: Path, name: str) -> Dict[str, Path]:
    """Pass 1's files of a shard: raw little-endian arrays, one row per document (the embeddings:
    one row per survivor of stages 1-2), and the meta JSON written last, which marks it done."""
    return {
        "codes": work / f"{name}.codes.i4",
        "signals": work / f"{name}.signals.f8",
        "extra": work / f"{name}.extra.f8",
        "embeddings": work / f"{name}.embeddings.f2",
        "meta": work / f"{name}.meta.json",
    }


def _pass1(src: Path, paths: Dict[str, Path], stages: _Stages, config: FilterConfig) -> None:
    """Stages 1-2 over one shard, streamed: memory holds one batch, whatever the shard size."""
    errors: List[Tuple[int, str]] = []
    n_errors = docs = alive = dim = 0
    hist = np.zeros((len(SIGNAL_NAMES), HISTOGRAM_BINS), dtype=np.int64)
    arrays = ("codes", "signals", "extra", "embeddings")
    files = {k: open(f"{paths[k]}.tmp", "wb") for k in arrays}
    try:
        reader = _core.JsonlReader(str(src), config.batch_docs, config.batch_bytes, config.max_line_bytes)
        try:
            for batch in reader:
                bad = batch.errors
                n_errors += len(bad)
                errors.extend(bad[: max(0, MAX_REPORTED_ERRORS - len(errors))])
                if len(batch) == 0:
                    continue
                s = batch.signals()
                c, e, emb = stages.run(batch.texts, s)
                files["codes"].write(c.astype("<i4").tobytes())
                files["signals"].write(s.astype("<f8").tobytes())
                files["extra"].write(e.astype("<f8").tobytes())
                hist += histograms(s)
                docs += len(c)
                if emb is not None and len(emb):
                    alive += len(emb)
                    dim = emb.shape[1]
                    files["embeddings"].write(emb.astype("<f2").tobytes())
        except ShardError:
            # Damage: the reader gave the verified lines only and says what it withheld.
            if reader.damage is None:
                raise
    finally:
        for f in files.values():
            f.close()
    blank = reader.blank_lines
    if reader.lines_read != docs + n_errors + blank:
        raise AccountingError(
            f"{src}: {reader.lines_read} lines read but {docs} documents, {n_errors} malformed, {blank} blank"
        )
    for k in arrays:
        with open(f"{paths[k]}.tmp", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(f"{paths[k]}.tmp", paths[k])
    meta = {
        "input": str(src.resolve()),
        "blank_lines": blank,
        "docs": docs,
        "survivors": alive,
        "embedding_dim": dim,
        "lines_read": reader.lines_read,
        "damaged": _damage(reader.damage),
        "malformed_lines": n_errors,
        "malformed": [[line, msg] for line, msg in errors],
        "histograms": hist.tolist(),
    }
    _atomic_json(paths["meta"], meta)


def _damage(d: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The reader's damage report as the stats give it."""
    if d is None:
        return None
    return {
        "offset": int(d["offset"]),
        "withheld_lines": int(d["withheld_lines"]),
        "withheld_bytes": int(d["withheld_bytes"]),
        "error": str(d["message"]),
    }


def _load(paths: Dict[str, Path], meta: Dict[str, Any]) -> Tuple[np.ndarray, Any]:
    """(codes, signals + extra columns as one read-only memory map per array)."""
    n = meta["docs"]
    codes = np.fromfile(paths["codes"], dtype="<i4")
    if len(codes) != n:
        raise ShardError(f"{paths['codes']}: {len(codes)} decisions for {n} documents; delete it and rerun")
    if n == 0:
        return codes, np.zeros((0, len(SIGNAL_NAMES) + len(EXTRA_COLUMNS)))
    signals = np.memmap(paths["signals"], dtype="<f8", mode="r", shape=(n, len(SIGNAL_NAMES)))
    extra = np.memmap(paths["extra"], dtype="<f8", mode="r", shape=(n, len(EXTRA_COLUMNS)))
    return codes, _Columns(signals, extra)


class _Columns:
    """Rows of the signals and extra columns of a shard, joined on demand."""

    def __init__(self, signals: np.ndarray, extra: np.ndarray):
        self.signals, self.extra = signals, extra

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.hstack([self.signals[rows], self.extra[rows]])


class _HardExamples:
    """Stage 3's decisions, sliced per shard (shards in order, survivors in order)."""

    def __init__(self, saved: Dict[str, np.ndarray], first_reason: int):
        self.decision, self.difficulty = saved["decision"], saved["difficulty"]
        self.offsets = np.concatenate([[0], np.cumsum(saved["sizes"])])
        self.first_reason = first_reason

    def apply(self, i: int, codes: np.ndarray) -> np.ndarray:
        """The shard's codes with stage 3 applied, and the difficulty of each document (NaN if none)."""
        alive = np.flatnonzero(codes == KEEP)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        if hi - lo != len(alive):
            raise AccountingError(
                f"stage 3 decided {hi - lo} documents of shard {i} but {len(alive)} reached it"
            )
        d = self.decision[lo:hi]
        codes = codes.copy()
        codes[alive[d > 0]] = self.first_reason + d[d > 0].astype(np.int32) - 1
        difficulty = np.full(len(codes), np.nan)
        difficulty[alive] = self.difficulty[lo:hi]
        return codes, difficulty


def _pass3(
    src: Path,
    name: str,
    out: Path,
    codes: np.ndarray,
    columns: Any,
    difficulty: Optional[np.ndarray],
    meta: Dict[str, Any],
    reasons: List[str],
    config: FilterConfig,
) -> Dict[str, Any]:
    ext = {"gz": ".jsonl.gz", "zst": ".jsonl.zst", "none": ".jsonl"}[config.compression]
    names = list(SIGNAL_NAMES) + list(EXTRA_COLUMNS)
    kept_w = _core.JsonlWriter(str(out / "kept" / (name + ext)))
    dropped_w = _core.JsonlWriter(str(out / "dropped" / (name + ext))) if config.write_dropped else None
    reason_names = np.array([None] + reasons, dtype=object)
    done = 0
    try:
        reader = _core.JsonlReader(str(src), config.batch_docs, config.batch_bytes, config.max_line_bytes)
        try:
            for batch in reader:
                n = len(batch)
                if done + n > len(codes):
                    done += n
                    break  # more documents than pass 1 read: reported below
                c = codes[done : done + n]
                keep = c == KEEP
                for writer, rows in ((kept_w, np.flatnonzero(keep)), (dropped_w, np.flatnonzero(~keep))):
                    if writer is None or len(rows) == 0:
                        continue
                    if config.annotate:
                        values = columns[done + rows]
                        if difficulty is not None:
                            values[:, -1] = difficulty[done + rows]
                        writer.write(
                            batch,
                            rows.astype(np.int64),
                            np.ascontiguousarray(values),
                            names,
                            keep[rows],
                            list(reason_names[c[rows] + 1]),
                        )
                    else:
                        writer.write(batch, rows.astype(np.int64))
                done += n
        except ShardError:
            if reader.damage is None:
                raise
        if _damage(reader.damage) != meta["damaged"]:
            raise ShardError(f"{src} changed since it was read: its damage report differs")
        if done != len(codes):
            raise ShardError(f"{src} changed since it was read: {done} documents now, {len(codes)} before")
        kept_lines = kept_w.lines
        dropped_lines = dropped_w.lines if dropped_w is not None else None
        kept_w.finish()
        if dropped_w is not None:
            dropped_w.finish()
    finally:
        kept_w.abort()
        if dropped_w is not None:
            dropped_w.abort()
    return {"kept_lines": kept_lines, "dropped_lines": dropped_lines}


def _progress(iterable, desc: str, total: int, show: bool):
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="shard", file=sys.stderr)


def run_filter(
    inputs: Sequence[Union[str, Path]],
    outdir: Union[str, Path],
    config: Optional[FilterConfig] = None,
    progress: bool = False,
    keep_work: bool = False,
) -> Dict[str, Any]:
    """Filter JSONL shards into ``outdir`` (see the module docstring); returns the stats.

    ``.work/`` (the resumable intermediate files) is removed once the run is done, unless
    ``keep_work``. Shards damaged past their verified part are listed in ``stats["damaged"]``;
    the run still finishes (the caller decides whether that is a failure).
    """
    config = config or FilterConfig()
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise InvalidValueError("no input shards")
    out = Path(outdir)
    for p in inputs:
        if p.is_dir():
            raise InvalidValueError(f"{p} is a directory; give its shards (for example {p}/*.jsonl.gz)")
        if not p.is_file():
            raise ShardError(f"{p}: no such file")
        if out.resolve() in p.resolve().parents:
            raise InvalidValueError(f"{p} is inside the output directory {out}; it would be overwritten")
    work = out / ".work"
    trash = out / ".work.removing"
    if trash.exists():  # a run killed while removing its .work after finishing
        shutil.rmtree(trash)
    for d in (work, out / "kept", out / "dropped"):
        d.mkdir(parents=True, exist_ok=True)
    names = _shard_names(inputs)
    run_desc = _check_run_config(work / "config.json", config, inputs, out / "stats.json")
    start = time.perf_counter()

    paths = [_paths(work, n) for n in names]
    todo1 = [i for i in range(len(names)) if not paths[i]["meta"].exists()]
    stages: Optional[_Stages] = None
    if todo1 or (config.hard_examples and not (work / "hard_examples.npz").exists()):
        stages = _Stages(config, inputs)
    for i in _progress(todo1, "filter: signals and stages 1-2", len(todo1), progress):
        assert stages is not None
        _pass1(inputs[i], paths[i], stages, config)
    metas = []
    for p in paths:
        with open(p["meta"]) as f:
            metas.append(json.load(f))
    reasons = _reason_table(config)
    hard = (
        _stage3(work / "hard_examples.npz", paths, metas, config, reasons) if config.hard_examples else None
    )

    def final_codes(i: int) -> Tuple[np.ndarray, Any, Optional[np.ndarray]]:
        codes, columns = _load(paths[i], metas[i])
        difficulty = None
        if hard is not None:
            codes, difficulty = hard.apply(i, codes)
        return codes, columns, difficulty

    for i in _progress(range(len(names)), "filter: writing shards", len(names), progress):
        done = work / f"{names[i]}.done.json"
        if not done.exists():
            codes, columns, difficulty = final_codes(i)
            result = _pass3(inputs[i], names[i], out, codes, columns, difficulty, metas[i], reasons, config)
            _atomic_json(done, result)
    stats = _stats(
        inputs, names, metas, lambda i: final_codes(i)[0], reasons, config, work, time.perf_counter() - start
    )
    stats["run"] = run_desc
    t = time.perf_counter()
    try:
        if not config.plot:
            stats["plot"] = "skipped: output.plot is false"
        else:
            plot_signals(stats, out / "signals.png")
            stats["plot"] = str(out / "signals.png")
    except ImportError:
        stats["plot"] = "skipped: matplotlib is not installed (pip install 'deepseek-rs[filter-plot]')"
    stats["plot_seconds"] = round(time.perf_counter() - t, 3)
    _atomic_json(out / "stats.json", stats)  # written last: its presence means the run is done
    if not keep_work:
        # One rename, then the removal: a kill in between leaves .work.removing, never half a .work.
        os.replace(work, trash)
        shutil.rmtree(trash)
    return stats


def _reason_table(config: FilterConfig) -> List[str]:
    """The reason strings of a run, without building its models (for resumed runs)."""
    reasons = [f"density:{r}" for r in DensityFilter(config.thresholds).reasons] if config.density else []
    model = config.model_density
    reasons.append(f"density:semantic_density<{model:g}" if model is not None else "")
    reasons.append(
        {"lda": "domain:off_domain_lda", "dsir": "domain:off_domain_dsir", None: ""}[config.domain]
    )
    reasons.extend(f"hard_examples:{HARD_REASONS[k]}" for k in sorted(HARD_REASONS))
    return reasons


def _check_run_config(
    path: Path, config: FilterConfig, inputs: Sequence[Path], stats: Path
) -> Dict[str, Any]:
    """A resumed run must have the same inputs and configuration as the one it resumes (or, once
    ``.work/`` is gone, as the finished run its ``stats.json`` describes)."""
    desc = {"inputs": [str(p.resolve()) for p in inputs], "config": repr(config)}
    before = None
    if path.exists():
        with open(path) as f:
            before = json.load(f)
    elif stats.exists():
        try:
            with open(stats) as f:
                before = json.load(f).get("run")
        except (OSError, ValueError, AttributeError):
            before = None
    if before is not None and before != desc:
        raise InvalidValueError(
            f"{path.parent.parent} holds a run with other inputs or another configuration; "
            "use a new output directory (or delete this one) to start over"
        )
    if not path.exists():
        _atomic_json(path, desc)
    return desc


def _stage3(
    path: Path,
    paths: List[Dict[str, Path]],
    metas: List[Dict[str, Any]],
    config: FilterConfig,
    reasons: List[str],
) -> _HardExamples:
    """Stage 3 over the survivors of every shard (their embeddings are all in memory at once:
    near-duplicates are found across the whole corpus)."""
    if not path.exists():
        dim = max((m["embedding_dim"] for m in metas), default=0) or 1
        parts = [
            np.fromfile(p["embeddings"], dtype="<f2").reshape(m["survivors"], dim).astype(np.float32)
            if m["survivors"]
            else np.zeros((0, dim), np.float32)
            for p, m in zip(paths, metas)
        ]
        x = np.concatenate(parts)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
        r = mine_hard_examples(x, config.clusters, config.dedup_threshold, config.keep_fraction, config.seed)
        sizes = np.array([m["survivors"] for m in metas], dtype=np.int64)
        _atomic_savez(path, decision=r.decision, difficulty=r.difficulty, sizes=sizes)
    return _HardExamples(dict(np.load(path)), len(reasons) - len(HARD_REASONS))


def _stats(inputs, names, metas, final_codes, reasons, config, work: Path, seconds: float) -> Dict[str, Any]:
    shards = []
    by_reason: Dict[str, int] = {}
    malformed: List[Dict[str, Any]] = []
    n_malformed = 0
    damaged: List[Dict[str, Any]] = []
    totals = {"read": 0, "kept": 0, "dropped": 0}
    hist = np.zeros((len(SIGNAL_NAMES), HISTOGRAM_BINS), dtype=np.int64)
    for i, (src, name, meta) in enumerate(zip(inputs, names, metas)):
        with open(work / f"{name}.done.json") as f:
            written = json.load(f)
        codes = final_codes(i)
        read, kept = len(codes), int((codes == KEEP).sum())
        dropped = read - kept
        wrote = written["kept_lines"] + (written["dropped_lines"] or 0)
        lines_ok = written["dropped_lines"] is None or wrote == meta["docs"]
        if written["kept_lines"] != kept or written["dropped_lines"] not in (None, dropped) or not lines_ok:
            raise AccountingError(
                f"{src}: {read} read, {kept} kept, {dropped} dropped, but {written['kept_lines']} kept and "
                f"{written['dropped_lines']} dropped lines written"
            )
        for code, count in zip(*np.unique(codes[codes != KEEP], return_counts=True)):
            by_reason[reasons[code]] = by_reason.get(reasons[code], 0) + int(count)
        n_malformed += meta["malformed_lines"]
        for line, msg in meta["malformed"][: MAX_REPORTED_ERRORS - len(malformed)]:
            malformed.append({"file": str(src), "line": int(line), "error": str(msg)})
        hist += np.asarray(meta["histograms"], dtype=np.int64)
        shard = {
            "input": str(src),
            "name": name,
            "read": read,
            "kept": kept,
            "dropped": dropped,
            "malformed": meta["malformed_lines"],
            "lines": meta["lines_read"],
        }
        if meta["damaged"] is not None:
            shard["damaged"] = meta["damaged"]
            damaged.append({"file": str(src), **meta["damaged"]})
        shards.append(shard)
        totals["read"] += read
        totals["kept"] += kept
        totals["dropped"] += dropped
    if totals["kept"] + totals["dropped"] != totals["read"]:
        raise AccountingError(f"kept {totals['kept']} + dropped {totals['dropped']} != read {totals['read']}")
    by_stage: Dict[str, int] = {}
    for r, count in by_reason.items():
        stage = r.split(":", 1)[0]
        by_stage[stage] = by_stage.get(stage, 0) + count
    histo = {}
    for j, name in enumerate(SIGNAL_NAMES):
        lo, hi, log = histogram_range(name)
        histo[name] = {"low": lo, "high": hi, "log10_1p": log, "counts": hist[j].tolist()}
    thresholds = [
        {
            "signal": t.signal,
            "min": t.min,
            "max": t.max,
            "source": t.source,
            "applies_to_cjk": t.applies_to_cjk,
        }
        for t in (config.thresholds if config.density else ())
    ]
    input_bytes = sum(p.stat().st_size for p in inputs)
    return {
        **totals,
        "malformed_lines": n_malformed,
        "malformed": malformed,
        "damaged_lines": sum(d["withheld_lines"] for d in damaged),
        "damaged": damaged,
        "dropped_by_stage": dict(sorted(by_stage.items())),
        "dropped_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "shards": shards,
        "thresholds": thresholds,
        "histograms": histo,
        "seconds": round(seconds, 3),
        "input_bytes": input_bytes,
    }
