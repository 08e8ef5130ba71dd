"""Plain-Python reference of the data-filter signals (``deepseek_rs._core.compute_signals``).

Written from the definitions in ``rust/textfilter/src/signals.rs`` as directly as possible, with
no attempt at speed: ``deepseek-rs bench filter`` uses it as the plain-Python baseline (and checks
that it computes what the Rust engine computes before timing either). It ships in the package so
that the benchmark runs from an installed wheel; the property tests of ``tests/`` check the Rust
engine against it too.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from typing import Dict, List, Sequence, Tuple

TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d", "\u2019", "\u2026", "。", "！", "？", "」", "』")
BULLETS = ("•", "●", "◦", "▪", "‣", "-", "*")


def is_space(c: str) -> bool:
    return c.isspace()


def is_cjk_unit(c: str) -> bool:
    o = ord(c)
    return (
        0x3001 <= o <= 0x303F
        or 0x3040 <= o <= 0x30FF
        or 0x31F0 <= o <= 0x31FF
        or 0x3400 <= o <= 0x4DBF
        or 0x4E00 <= o <= 0x9FFF
        or 0xF900 <= o <= 0xFAFF
        or 0xFF00 <= o <= 0xFFEF
        or 0x20000 <= o <= 0x2FA1F
    )


def words(text: str) -> List[str]:
    out: List[str] = []
    for token in text.split():
        run = ""
        for c in token:
            if is_cjk_unit(c):
                if run:
                    out.append(run)
                    run = ""
                out.append(c)
            else:
                run += c
        if run:
            out.append(run)
    return out


def lines(text: str) -> List[Tuple[str, int]]:
    out: List[Tuple[str, int]] = []
    paragraph, gap = 0, False
    for line in text.split("\n"):
        if line.strip() == "":
            gap = True
            continue
        if gap and out:
            paragraph += 1
        gap = False
        out.append((line, paragraph))
    return out


def entropy(counts: Sequence[int]) -> float:
    total = sum(counts)
    if total == 0:
        return 0.0
    return max(0.0, -sum(c / total * math.log2(c / total) for c in counts))


def ratio(num: float, den: float) -> float:
    return 0.0 if den == 0 else num / den


def _ngrams(ws: List[str], n: int) -> List[Tuple[str, ...]]:
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


def _covered(grams: List[Tuple[str, ...]], n: int, lengths: List[int], keep) -> int:
    mask = [False] * len(lengths)
    for i, g in enumerate(grams):
        if keep(g):
            for j in range(i, i + n):
                mask[j] = True
    return sum(length for length, m in zip(lengths, mask) if m)


def _repeated_chars(ws: List[str], n: int) -> int:
    """Characters of the repeated occurrences of word n-grams, counted as datatrove's
    ``find_all_duplicate`` counts them (n-grams compared as word tuples)."""
    seen = set()
    repeated, i = 0, 0
    while i < len(ws) - n + 1:
        gram = tuple(ws[i : i + n])
        if gram in seen:
            repeated += sum(len(w) for w in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


def signals(text: str) -> Dict[str, float]:
    s: Dict[str, float] = {}
    s["n_chars"] = float(len(text))
    ws = words(text)
    lengths = [len(w) for w in ws]
    total_word_chars = sum(lengths)
    s["n_words"] = float(len(ws))
    ls = lines(text)
    s["n_lines"] = float(len(ls))
    s["mean_word_length"] = ratio(total_word_chars, len(ws))
    s["char_entropy"] = entropy(list(Counter(text).values()))
    s["word_entropy"] = entropy(list(Counter(ws).values()))
    for n in (2, 3, 4):
        s[f"entropy_{n}gram"] = entropy(list(Counter(_ngrams(ws, n)).values()))
    s["compression_ratio"] = ratio(len(zlib.compress(text.encode(), 1)), len(text.encode()))

    seen = set()
    dup, dup_chars = 0, 0
    for line, _ in ls:
        if line in seen:
            dup += 1
            dup_chars += len(line)
        seen.add(line)
    s["dup_line_frac"] = ratio(dup, len(ls))
    s["dup_line_char_frac"] = ratio(dup_chars, len(text))
    paragraphs: Dict[int, List[str]] = {}
    for line, p in ls:
        paragraphs.setdefault(p, []).append(line)
    seen = set()
    dup, dup_chars = 0, 0
    for p in paragraphs.values():
        para = "\n".join(p)  # consecutive non-blank lines: the text between them is one newline
        if para in seen:
            dup += 1
            dup_chars += len(para)
        seen.add(para)
    s["dup_para_frac"] = ratio(dup, len(paragraphs))
    s["dup_para_char_frac"] = ratio(dup_chars, len(text))

    for n in (2, 3, 4):
        grams = _ngrams(ws, n)
        counts = Counter(grams)
        value = 0.0
        if counts and max(counts.values()) >= 2:
            top = max(counts.values())
            first = next(g for g in grams if counts[g] == top)
            value = ratio(_covered(grams, n, lengths, lambda g, first=first: g == first), total_word_chars)
        s[f"top_{n}gram_char_frac"] = value
    for n in range(5, 11):
        s[f"dup_{n}gram_char_frac"] = ratio(_repeated_chars(ws, n), total_word_chars)

    s["hash_word_ratio"] = ratio(text.count("#"), len(ws))
    s["ellipsis_word_ratio"] = ratio(text.count("...") + text.count("\u2026"), len(ws))
    stripped_ends = [line.rstrip() for line, _ in ls]
    s["terminal_punct_line_frac"] = ratio(
        sum(e.endswith(TERMINAL_PUNCTUATION) for e in stripped_ends), len(ls)
    )
    s["bullet_line_frac"] = ratio(sum(line.lstrip().startswith(BULLETS) for line, _ in ls), len(ls))
    s["ellipsis_line_frac"] = ratio(sum(e.endswith(("...", "\u2026")) for e in stripped_ends), len(ls))
    s["non_alpha_word_frac"] = ratio(sum(not any(c.isalpha() for c in w) for w in ws), len(ws))
    non_space = [c for c in text if not c.isspace()]
    s["cjk_char_frac"] = ratio(sum(is_cjk_unit(c) for c in non_space), len(non_space))
    return s
