"""The filter over JSONL shards: ``run_filter(inputs, outdir, config)``, behind ``deepseek-rs filter``.

Three passes, each resumable because every file is written atomically (temporary name, then
rename) and a finished step's file is never redone:

1. per input shard: read (Rust, streaming), signals, stage 1 (density), stage 2 (domain), and
   the embeddings of the survivors when stage 3 is on -> ``OUTDIR/.work/<shard>.npz``;
2. stage 3 (hard-example mining) over the survivors of all shards -> ``.work/hard_examples.npz``;
3. per input shard: read again and write ``OUTDIR/kept/<shard>.jsonl.gz`` and
   ``OUTDIR/dropped/<shard>.jsonl.gz``, every document annotated with its signals, decision and
   reason -> ``.work/<shard>.done.json``.

Finally ``OUTDIR/stats.json`` (counts per stage and reason, malformed lines with file and line,
signal histograms) and ``OUTDIR/signals.png``. For every shard and in total, kept + dropped must
equal the documents read, or the run fails.
"""

from __future__ import annotations

import json
import os
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
from .hard_examples import REASONS as HARD_REASONS
from .hard_examples import mine_hard_examples
from .signals import HISTOGRAM_BINS, SIGNAL_NAMES, histogram_range, histograms

MAX_REPORTED_ERRORS = 1000
EXTRA_COLUMNS = ("semantic_density", "domain_score", "difficulty")


class AccountingError(DeepseekError, RuntimeError):
    """Kept + dropped documents do not add up to the documents read."""


def _shard_names(inputs: Sequence[Path]) -> List[str]:
    names: List[str] = []
    for p in inputs:
        stem = p.name
        for suffix in (".gz", ".zst", ".zstd", ".jsonl", ".json"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        name = stem or "shard"
        if name in names:
            name = f"{name}-{len(names)}"
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
    texts: List[str] = []
    for p in paths:
        for batch in _core.JsonlReader(str(p), config.batch_docs, config.batch_bytes, config.max_line_bytes):
            texts.extend(batch.texts)
            if limit is not None and len(texts) >= limit:
                return texts[:limit]
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
            from .embed import MiniLMEncoder

            self.encoder = MiniLMEncoder()
        self.domain: Optional[Union[LDADomainFilter, DSIRDomainFilter]] = None
        if config.domain is not None:
            reference = _read_texts(config.reference, None, config)
            if config.domain == "lda":
                self.domain = LDADomainFilter(
                    config.topics, config.buckets, config.keep_quantile, config.seed
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
                from .embed import HashedEmbedder

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


def _pass1(src: Path, work: Path, stages: _Stages, config: FilterConfig) -> None:
    codes: List[np.ndarray] = []
    signals: List[np.ndarray] = []
    extras: List[np.ndarray] = []
    embs: List[np.ndarray] = []
    errors: List[Tuple[int, str]] = []
    hist = np.zeros((len(SIGNAL_NAMES), HISTOGRAM_BINS), dtype=np.int64)
    stream_error = ""
    reader = _core.JsonlReader(str(src), config.batch_docs, config.batch_bytes, config.max_line_bytes)
    try:
        for batch in reader:
            errors.extend(batch.errors)
            if len(batch) == 0:
                continue
            s = batch.signals()
            c, e, emb = stages.run(batch.texts, s)
            codes.append(c)
            signals.append(s)
            extras.append(e)
            hist += histograms(s)
            if emb is not None:
                embs.append(emb.astype(np.float16))
    except ShardError as err:  # a corrupt stream: keep what was read before it, report it
        stream_error = str(err)
    k = len(SIGNAL_NAMES)
    _atomic_savez(
        work,
        codes=np.concatenate(codes) if codes else np.zeros(0, np.int32),
        signals=np.concatenate(signals) if signals else np.zeros((0, k)),
        extra=np.concatenate(extras) if extras else np.zeros((0, len(EXTRA_COLUMNS))),
        embeddings=np.concatenate(embs) if embs else np.zeros((0, 1), np.float16),
        histograms=hist,
        error_lines=np.array([line for line, _ in errors], dtype=np.int64),
        error_messages=np.array([msg for _, msg in errors], dtype=object).astype(str),
        lines_read=np.int64(reader.lines_read),
        stream_error=np.array(stream_error),
    )


def _pass3(
    src: Path, name: str, out: Path, state: Dict[str, np.ndarray], reasons: List[str], config: FilterConfig
) -> Dict[str, Any]:
    ext = {"gz": ".jsonl.gz", "zst": ".jsonl.zst", "none": ".jsonl"}[config.compression]
    codes, signals, extra = state["codes"], state["signals"], state["extra"]
    columns = list(SIGNAL_NAMES) + list(EXTRA_COLUMNS)
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
                    raise ShardError(f"{src} changed since it was read: more documents than before")
                c = codes[done : done + n]
                keep = c == KEEP
                for writer, rows in ((kept_w, np.flatnonzero(keep)), (dropped_w, np.flatnonzero(~keep))):
                    if writer is None or len(rows) == 0:
                        continue
                    if config.annotate:
                        sig = np.hstack([signals[done + rows], extra[done + rows]])
                        writer.write(
                            batch,
                            rows.astype(np.int64),
                            np.ascontiguousarray(sig),
                            columns,
                            keep[rows],
                            list(reason_names[c[rows] + 1]),
                        )
                    else:
                        writer.write(batch, rows.astype(np.int64))
                done += n
        except ShardError:
            if not str(state["stream_error"]):
                raise
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
) -> Dict[str, Any]:
    """Filter JSONL shards into ``outdir`` (see the module docstring); returns the stats."""
    config = config or FilterConfig()
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise InvalidValueError("no input shards")
    for p in inputs:
        if not p.is_file():
            raise ShardError(f"{p}: no such file")
    out = Path(outdir)
    work = out / ".work"
    for d in (work, out / "kept", out / "dropped"):
        d.mkdir(parents=True, exist_ok=True)
    names = _shard_names(inputs)
    _check_run_config(work / "config.json", config, inputs)
    start = time.perf_counter()

    todo1 = [i for i, n in enumerate(names) if not (work / f"{n}.npz").exists()]
    stages: Optional[_Stages] = None
    if todo1 or (config.hard_examples and not (work / "hard_examples.npz").exists()):
        stages = _Stages(config, inputs)
    for i in _progress(todo1, "filter: signals and stages 1-2", len(todo1), progress):
        assert stages is not None
        _pass1(inputs[i], work / f"{names[i]}.npz", stages, config)
    states = [dict(np.load(work / f"{n}.npz", allow_pickle=False)) for n in names]
    reasons = _reason_table(config)

    if config.hard_examples:
        _stage3(work / "hard_examples.npz", states, config, reasons)

    for i in _progress(range(len(names)), "filter: writing shards", len(names), progress):
        done = work / f"{names[i]}.done.json"
        if not done.exists():
            _atomic_json(done, _pass3(inputs[i], names[i], out, states[i], reasons, config))
    stats = _stats(inputs, names, states, reasons, config, work, time.perf_counter() - start)
    _atomic_json(out / "stats.json", stats)
    try:
        from .plot import plot_signals

        plot_signals(stats, out / "signals.png")
        stats["plot"] = str(out / "signals.png")
    except ImportError:
        stats["plot"] = "skipped: matplotlib is not installed (pip install 'deepseek-rs[filter-plot]')"
    _atomic_json(out / "stats.json", stats)
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


def _check_run_config(path: Path, config: FilterConfig, inputs: Sequence[Path]) -> None:
    """A resumed run must have the same inputs and configuration as the one it resumes."""
    desc = {"inputs": [str(p.resolve()) for p in inputs], "config": repr(config)}
    if path.exists():
        with open(path) as f:
            before = json.load(f)
        if before != desc:
            raise InvalidValueError(
                f"{path.parent.parent} holds a run with other inputs or another configuration; "
                "use a new output directory (or delete this one) to start over"
            )
    else:
        _atomic_json(path, desc)


def _stage3(
    path: Path, states: List[Dict[str, np.ndarray]], config: FilterConfig, reasons: List[str]
) -> None:
    if not path.exists():
        emb = [s["embeddings"].astype(np.float32) for s in states]
        sizes = [len(e) for e in emb]
        dim = max((e.shape[1] for e in emb if len(e)), default=1)
        x = np.concatenate([e.reshape(len(e), -1) if len(e) else np.zeros((0, dim), np.float32) for e in emb])
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
        r = mine_hard_examples(x, config.clusters, config.dedup_threshold, config.keep_fraction, config.seed)
        _atomic_savez(
            path, decision=r.decision, difficulty=r.difficulty, sizes=np.array(sizes, dtype=np.int64)
        )
    saved = np.load(path)
    decision, difficulty = saved["decision"], saved["difficulty"]
    first = len(reasons) - len(HARD_REASONS)
    at = 0
    for s in states:
        alive = np.flatnonzero(s["codes"] == KEEP)
        d = decision[at : at + len(alive)]
        s["extra"] = s["extra"].copy()
        s["extra"][alive, 2] = difficulty[at : at + len(alive)]
        s["codes"] = s["codes"].copy()
        s["codes"][alive[d > 0]] = first + d[d > 0].astype(np.int32) - 1
        at += len(alive)
    if at != len(decision):
        raise AccountingError(f"stage 3 decided {len(decision)} documents but {at} reached it")


def _stats(inputs, names, states, reasons, config, work: Path, seconds: float) -> Dict[str, Any]:
    shards = []
    by_reason: Dict[str, int] = {}
    malformed: List[Dict[str, Any]] = []
    n_malformed = 0
    totals = {"read": 0, "kept": 0, "dropped": 0}
    hist = np.zeros((len(SIGNAL_NAMES), HISTOGRAM_BINS), dtype=np.int64)
    for src, name, s in zip(inputs, names, states):
        with open(work / f"{name}.done.json") as f:
            written = json.load(f)
        codes = s["codes"]
        read, kept = len(codes), int((codes == KEEP).sum())
        dropped = read - kept
        if written["kept_lines"] != kept or (written["dropped_lines"] not in (None, dropped)):
            raise AccountingError(
                f"{src}: {read} read, {kept} kept, {dropped} dropped, but {written['kept_lines']} kept and "
                f"{written['dropped_lines']} dropped lines written"
            )
        for code, count in zip(*np.unique(codes[codes != KEEP], return_counts=True)):
            by_reason[reasons[code]] = by_reason.get(reasons[code], 0) + int(count)
        lines, messages = s["error_lines"], s["error_messages"]
        n_malformed += len(lines)
        for line, msg in zip(lines[: MAX_REPORTED_ERRORS - len(malformed)], messages):
            malformed.append({"file": str(src), "line": int(line), "error": str(msg)})
        hist += s["histograms"]
        shard = {
            "input": str(src),
            "name": name,
            "read": read,
            "kept": kept,
            "dropped": dropped,
            "malformed": int(len(lines)),
            "lines": int(s["lines_read"]),
        }
        if str(s["stream_error"]):
            shard["stream_error"] = str(s["stream_error"])
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
        "dropped_by_stage": dict(sorted(by_stage.items())),
        "dropped_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "shards": shards,
        "thresholds": thresholds,
        "histograms": histo,
        "seconds": round(seconds, 3),
        "input_bytes": input_bytes,
    }
