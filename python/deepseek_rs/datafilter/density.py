"""Stage 1, semantic density: thresholds over the entropy, repetition and line signals.

A document is dropped by the first threshold it fails, and that threshold is its reason
(``"word_entropy<3.5"``). The defaults are the published ones where they exist:

=============================  ===========  =================================================
signal                         keep if      source
=============================  ===========  =================================================
n_words                        50..100000   Gopher quality filter (Rae et al. 2021, A.1.1)
mean_word_length               3..10        Gopher (not applied to CJK documents, whose words
                                            are single characters)
hash_word_ratio                <= 0.1       Gopher (symbol-to-word ratio: ``#`` per word)
ellipsis_word_ratio            <= 0.1       Gopher (``...`` and ``…`` per word)
bullet_line_frac               <= 0.9       Gopher
ellipsis_line_frac             <= 0.3       Gopher
non_alpha_word_frac            <= 0.2       Gopher (80% of words have a letter)
dup_line_frac                  <= 0.3       Gopher repetition filter
dup_para_frac                  <= 0.3       Gopher
dup_line_char_frac             <= 0.2       Gopher (FineWeb uses 0.1)
dup_para_char_frac             <= 0.2       Gopher
top_{2,3,4}gram_char_frac      <= .20/.18/.16  Gopher
dup_{5..10}gram_char_frac      <= .15 ... .10  Gopher (repeated occurrences only, counted as
                                            datatrove's ``find_all_duplicate``)
terminal_punct_line_frac       >= 0.12      FineWeb (line punctuation ratio)
char_entropy                   >= 3.0 bits  this package: the article's entropy density
word_entropy                   >= 3.5 bits  this package
compression_ratio              >= 0.15      this package (zlib level 1 size / UTF-8 size)
=============================  ===========  =================================================

The entropy thresholds sit below the bulk of natural text (see the histograms in
``signals.png`` of a run over ``/usr/share/doc``); they catch degenerate text (one word or symbol
repeated, long runs of markup or digits) that the repetition rules miss. The repetition
thresholds count words, and every Han or Kana character is a word, so for Chinese and Japanese
they are stricter than for English: override them for CJK corpora.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import InvalidValueError
from .signals import SIGNAL_INDEX, compute_signals

KEEP = -1
"""Decision code of a kept document; other codes index a filter's ``reasons``."""

CJK_DOCUMENT_FRAC = 0.3
"""A document with at least this fraction of CJK characters is treated as CJK."""


@dataclass(frozen=True)
class Threshold:
    """Keep a document if ``min <= signal <= max`` (either bound may be None)."""

    signal: str
    min: Optional[float] = None
    max: Optional[float] = None
    source: str = ""
    applies_to_cjk: bool = True

    def __post_init__(self) -> None:
        if self.signal not in SIGNAL_INDEX:
            raise InvalidValueError(f"unknown signal {self.signal!r}; known: {', '.join(SIGNAL_INDEX)}")
        if self.min is None and self.max is None:
            raise InvalidValueError(f"threshold on {self.signal!r} needs a min or a max")
        for bound in (self.min, self.max):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
                raise InvalidValueError(f"threshold on {self.signal!r} must be a number, got {bound!r}")
            if bound is not None and not np.isfinite(bound):
                raise InvalidValueError(f"threshold on {self.signal!r} must be finite, got {bound}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise InvalidValueError(f"threshold on {self.signal!r} has min {self.min} > max {self.max}")

    def reasons(self) -> Tuple[str, str]:
        """The drop reasons for failing the lower and the upper bound."""
        return (
            f"{self.signal}<{self.min:g}" if self.min is not None else "",
            f"{self.signal}>{self.max:g}" if self.max is not None else "",
        )


GOPHER_QUALITY = (
    Threshold("n_words", 50, 100_000, "gopher"),
    Threshold("mean_word_length", 3, 10, "gopher", applies_to_cjk=False),
    Threshold("hash_word_ratio", max=0.1, source="gopher"),
    Threshold("ellipsis_word_ratio", max=0.1, source="gopher"),
    Threshold("bullet_line_frac", max=0.9, source="gopher"),
    Threshold("ellipsis_line_frac", max=0.3, source="gopher"),
    Threshold("non_alpha_word_frac", max=0.2, source="gopher"),
)
GOPHER_REPETITION = (
    Threshold("dup_line_frac", max=0.3, source="gopher"),
    Threshold("dup_para_frac", max=0.3, source="gopher"),
    Threshold("dup_line_char_frac", max=0.2, source="gopher"),
    Threshold("dup_para_char_frac", max=0.2, source="gopher"),
    Threshold("top_2gram_char_frac", max=0.20, source="gopher"),
    Threshold("top_3gram_char_frac", max=0.18, source="gopher"),
    Threshold("top_4gram_char_frac", max=0.16, source="gopher"),
    *(
        Threshold(f"dup_{n}gram_char_frac", max=round(0.15 - 0.01 * (n - 5), 2), source="gopher")
        for n in range(5, 11)
    ),
)
FINEWEB = (Threshold("terminal_punct_line_frac", min=0.12, source="fineweb"),)
ENTROPY = (
    Threshold("char_entropy", min=3.0, source="entropy"),
    Threshold("word_entropy", min=3.5, source="entropy"),
    Threshold("compression_ratio", min=0.15, source="entropy"),
)
DEFAULT_THRESHOLDS: Tuple[Threshold, ...] = (*GOPHER_QUALITY, *GOPHER_REPETITION, *FINEWEB, *ENTROPY)


def thresholds_from_config(overrides: Optional[Mapping[str, Any]]) -> Tuple[Threshold, ...]:
    """The defaults with ``overrides`` applied: ``{signal: {min: .., max: ..}}`` replaces a
    threshold (or adds one), ``{signal: null}`` removes it."""
    by_signal = {t.signal: t for t in DEFAULT_THRESHOLDS}
    for name, spec in (overrides or {}).items():
        if spec is None:
            if name not in by_signal:
                raise InvalidValueError(f"cannot remove threshold {name!r}: there is none")
            del by_signal[name]
            continue
        if not isinstance(spec, Mapping) or not set(spec) <= {"min", "max", "applies_to_cjk"}:
            raise InvalidValueError(f"threshold {name!r} must be a mapping with min and/or max, got {spec!r}")
        by_signal[name] = Threshold(
            name,
            spec.get("min"),
            spec.get("max"),
            "config",
            bool(spec.get("applies_to_cjk", by_signal[name].applies_to_cjk if name in by_signal else True)),
        )
    return tuple(by_signal.values())


class DensityFilter:
    """Stage 1: drop a document by the first threshold it fails.

    ``decide(signals)`` returns int32 codes: ``KEEP`` (-1) or an index into ``reasons``.
    """

    def __init__(self, thresholds: Sequence[Threshold] = DEFAULT_THRESHOLDS):
        self.thresholds = tuple(thresholds)
        self.reasons: List[str] = []
        self._checks: List[Tuple[int, bool, float, bool]] = []  # (column, is_min, bound, cjk too)
        for t in self.thresholds:
            lo, hi = t.reasons()
            if t.min is not None:
                self._checks.append((SIGNAL_INDEX[t.signal], True, float(t.min), t.applies_to_cjk))
                self.reasons.append(lo)
            if t.max is not None:
                self._checks.append((SIGNAL_INDEX[t.signal], False, float(t.max), t.applies_to_cjk))
                self.reasons.append(hi)

    def decide(self, signals: np.ndarray) -> np.ndarray:
        """Decision codes of documents with these signals (rows of ``compute_signals``)."""
        if signals.ndim != 2 or signals.shape[1] < len(SIGNAL_INDEX):
            raise InvalidValueError(f"signals must be [docs, {len(SIGNAL_INDEX)}], got {signals.shape}")
        codes = np.full(len(signals), KEEP, dtype=np.int32)
        cjk = signals[:, SIGNAL_INDEX["cjk_char_frac"]] >= CJK_DOCUMENT_FRAC
        # Walk the checks in reverse so the first failing one is the one that sticks.
        for k in range(len(self._checks) - 1, -1, -1):
            col, is_min, bound, cjk_too = self._checks[k]
            v = signals[:, col]
            fail = v < bound if is_min else v > bound
            if not cjk_too:
                fail &= ~cjk
            codes[fail] = k
        return codes

    def __call__(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(signals, decision codes) of ``texts``."""
        signals = compute_signals(texts)
        return signals, self.decide(signals)
