"""Per-document signals from the Rust engine, and their fixed histogram bins.

``compute_signals(texts)`` returns float64 ``[len(texts), len(SIGNAL_NAMES)]``; the definitions
are in ``rust/textfilter/src/signals.rs`` (docs) and ``deepseek_rs/bench/filter_reference.py`` (plain Python).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from .. import _core

SIGNAL_NAMES: tuple = tuple(_core.signal_names())
SIGNAL_INDEX: Dict[str, int] = {name: i for i, name in enumerate(SIGNAL_NAMES)}
HISTOGRAM_BINS = 40


def compute_signals(texts: Sequence[str]) -> np.ndarray:
    """Every signal of every text (float64 ``[len(texts), len(SIGNAL_NAMES)]``), in parallel in Rust."""
    return _core.compute_signals(list(texts))


def histogram_range(name: str) -> tuple:
    """The fixed (low, high, log10) binning of a signal, so histograms of shards add up."""
    if name in ("n_chars", "n_words", "n_lines"):
        return (0.0, 7.0, True)  # log10(1 + value)
    if "entropy" in name:
        return (0.0, 20.0, False)
    if name == "mean_word_length":
        return (0.0, 20.0, False)
    if name == "compression_ratio":
        return (0.0, 1.2, False)
    return (0.0, 1.0, False)


def histograms(signals: np.ndarray, names: Sequence[str] = SIGNAL_NAMES) -> np.ndarray:
    """Counts ``[len(names), HISTOGRAM_BINS]``; values outside a range go to its end bins."""
    out = np.zeros((len(names), HISTOGRAM_BINS), dtype=np.int64)
    for j, name in enumerate(names):
        lo, hi, log = histogram_range(name)
        v = signals[:, j]
        v = np.log10(1.0 + np.maximum(v, 0.0)) if log else v
        idx = np.clip(((v - lo) / (hi - lo) * HISTOGRAM_BINS).astype(np.int64), 0, HISTOGRAM_BINS - 1)
        out[j] = np.bincount(idx, minlength=HISTOGRAM_BINS)
    return out
