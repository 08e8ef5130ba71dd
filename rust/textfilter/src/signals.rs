//! Per-document quality signals, computed in one pass over a document's words and lines.
//!
//! The repetition signals follow Gopher (Rae et al. 2021, table A1) and the line signals
//! FineWeb (Penedo et al. 2024); the entropy signals are the article's "information entropy"
//! density. Every signal is a plain function of the text that `python/deepseek_rs/bench/filter_reference.py`
//! re-implements in plain Python; the definitions here are the contract.
//!
//! Conventions: lengths count Unicode scalar values (Python `len`), entropies are in bits,
//! and a ratio whose denominator is zero is 0.

use std::io::Write;

use rustc_hash::FxHashMap;

use crate::segment::{is_cjk_unit, is_letter, is_space, lines, words};

/// zlib level of [`Signal::CompressionRatio`]; level 1 keeps the signal cheap and still
/// measures redundancy.
pub const COMPRESSION_LEVEL: u32 = 1;

/// Characters that end a line "properly" (FineWeb's line-punctuation signal), Latin and CJK.
pub const TERMINAL_PUNCTUATION: &[char] = &[
    '.', '!', '?', '"', '\'', '\u{201d}', '\u{2019}', '\u{2026}', '。', '！', '？', '」', '』',
];

/// Characters that start a bullet line (after leading whitespace).
pub const BULLETS: &[char] = &['•', '●', '◦', '▪', '‣', '-', '*'];

macro_rules! signals {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// One per-document signal; its index in [`Signals`] is its discriminant.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Signal { $($(#[$doc])* $variant,)* }

        /// The names of the signals, in index order (the column names of the Python arrays).
        pub const SIGNAL_NAMES: &[&str] = &[$($name,)*];
    };
}

signals! {
    /// Characters (Unicode scalar values).
    NChars = "n_chars",
    /// Words (see [`crate::segment::words`]).
    NWords = "n_words",
    /// Non-blank lines.
    NLines = "n_lines",
    /// Mean characters per word.
    MeanWordLength = "mean_word_length",
    /// Shannon entropy (bits) of the character unigram distribution.
    CharEntropy = "char_entropy",
    /// Shannon entropy (bits) of the word unigram distribution.
    WordEntropy = "word_entropy",
    /// Shannon entropy (bits) of the word 2-gram distribution.
    Entropy2gram = "entropy_2gram",
    /// Shannon entropy (bits) of the word 3-gram distribution.
    Entropy3gram = "entropy_3gram",
    /// Shannon entropy (bits) of the word 4-gram distribution.
    Entropy4gram = "entropy_4gram",
    /// zlib-compressed bytes over UTF-8 bytes (low: repetitive).
    CompressionRatio = "compression_ratio",
    /// Fraction of lines that repeat an earlier line.
    DupLineFrac = "dup_line_frac",
    /// Characters in lines that repeat an earlier line, over all characters.
    DupLineCharFrac = "dup_line_char_frac",
    /// Fraction of paragraphs that repeat an earlier paragraph.
    DupParaFrac = "dup_para_frac",
    /// Characters in paragraphs that repeat an earlier paragraph, over all characters.
    DupParaCharFrac = "dup_para_char_frac",
    /// Word characters covered by the most frequent word 2-gram (0 if none repeats).
    Top2gramCharFrac = "top_2gram_char_frac",
    /// Word characters covered by the most frequent word 3-gram (0 if none repeats).
    Top3gramCharFrac = "top_3gram_char_frac",
    /// Word characters covered by the most frequent word 4-gram (0 if none repeats).
    Top4gramCharFrac = "top_4gram_char_frac",
    /// Word characters in repeats of an earlier word 5-gram (Gopher: not the first occurrence).
    Dup5gramCharFrac = "dup_5gram_char_frac",
    /// Word characters in repeats of an earlier word 6-gram (Gopher: not the first occurrence).
    Dup6gramCharFrac = "dup_6gram_char_frac",
    /// Word characters in repeats of an earlier word 7-gram (Gopher: not the first occurrence).
    Dup7gramCharFrac = "dup_7gram_char_frac",
    /// Word characters in repeats of an earlier word 8-gram (Gopher: not the first occurrence).
    Dup8gramCharFrac = "dup_8gram_char_frac",
    /// Word characters in repeats of an earlier word 9-gram (Gopher: not the first occurrence).
    Dup9gramCharFrac = "dup_9gram_char_frac",
    /// Word characters in repeats of an earlier word 10-gram (Gopher: not the first occurrence).
    Dup10gramCharFrac = "dup_10gram_char_frac",
    /// `#` characters per word (Gopher's symbol-to-word ratio for the hash).
    HashWordRatio = "hash_word_ratio",
    /// Ellipses (`...` and `…`) per word (Gopher's symbol-to-word ratio for the ellipsis).
    EllipsisWordRatio = "ellipsis_word_ratio",
    /// Fraction of lines that end in terminal punctuation (FineWeb).
    TerminalPunctLineFrac = "terminal_punct_line_frac",
    /// Fraction of lines that start with a bullet (Gopher).
    BulletLineFrac = "bullet_line_frac",
    /// Fraction of lines that end with an ellipsis (Gopher).
    EllipsisLineFrac = "ellipsis_line_frac",
    /// Fraction of words without a letter (Gopher keeps documents where 80% have one).
    NonAlphaWordFrac = "non_alpha_word_frac",
    /// Fraction of non-space characters that are CJK units.
    CjkCharFrac = "cjk_char_frac",
}

/// The number of signals.
pub const NUM_SIGNALS: usize = SIGNAL_NAMES.len();

/// All signals of one document, indexed by [`Signal`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals(pub [f64; NUM_SIGNALS]);

impl Signals {
    /// The value of one signal.
    pub fn get(&self, s: Signal) -> f64 {
        self.0[s as usize]
    }
    fn set(&mut self, s: Signal, v: f64) {
        self.0[s as usize] = v;
    }
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 { 0.0 } else { num / den }
}

/// Shannon entropy in bits of a distribution given by its counts (fixed summation order).
fn entropy<I: IntoIterator<Item = u32>>(counts: I, total: usize) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let n = total as f64;
    let s: f64 = counts
        .into_iter()
        .map(|c| {
            let c = c as f64;
            c * c.log2()
        })
        .sum();
    (n.log2() - s / n).max(0.0)
}

fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// zlib-compressed size of `bytes` at [`COMPRESSION_LEVEL`] (the output of Python's
/// `zlib.compress(bytes, 1)`).
pub fn zlib_size(bytes: &[u8]) -> usize {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut z = flate2::write::ZlibEncoder::new(Count(0), flate2::Compression::new(COMPRESSION_LEVEL));
    // Writing into a counter cannot fail.
    z.write_all(bytes).expect("in-memory zlib");
    z.finish().expect("in-memory zlib").0
}

/// The distinct n-grams of one order: the slot of each window (in text order) and the count of
/// each slot. Slots are dense ids, so equal n-grams have equal slots.
struct NGrams {
    counts: Vec<u32>,
    slot_of_window: Vec<u32>,
    /// Whether every n-gram occurs once (then so does every longer one).
    all_unique: bool,
}

/// The (n+1)-grams from the n-grams: window `i` is (n-gram slot at `i`, word `i + n`), interned
/// exactly as one u64 key, so the cost per order is one hash lookup per window.
fn extend(prev: &NGrams, ids: &[u32], n: usize) -> NGrams {
    let windows = (ids.len() + 1).saturating_sub(n + 1);
    let mut map: FxHashMap<u64, u32> = FxHashMap::with_capacity_and_hasher(windows, Default::default());
    let mut counts: Vec<u32> = Vec::with_capacity(windows);
    let mut slot_of_window = Vec::with_capacity(windows);
    for i in 0..windows {
        let key = ((prev.slot_of_window[i] as u64) << 32) | ids[i + n] as u64;
        let next = counts.len() as u32;
        let slot = *map.entry(key).or_insert(next);
        if slot == next {
            counts.push(0);
        }
        counts[slot as usize] += 1;
        slot_of_window.push(slot);
    }
    let all_unique = counts.len() == windows;
    NGrams {
        counts,
        slot_of_window,
        all_unique,
    }
}

/// Word characters covered by the windows (of `n` words) for which `covered(slot)` holds.
fn covered_chars(g: &NGrams, n: usize, word_chars: &[u32], covered: impl Fn(u32) -> bool) -> u64 {
    let mut sum = 0u64;
    // Covered words end at `reach`; each word is counted once however many windows cover it.
    let mut reach = 0usize;
    for (start, &slot) in g.slot_of_window.iter().enumerate() {
        if covered(slot) {
            let from = start.max(reach);
            let to = start + n;
            sum += word_chars[from..to].iter().map(|&c| c as u64).sum::<u64>();
            reach = to;
        }
    }
    sum
}

/// Word characters in the repeated occurrences of n-grams (of `n` words), counted as Gopher and
/// datatrove's `find_all_duplicate` count them: scanning the windows left to right, a window
/// whose n-gram occurred before adds its words' characters and the scan jumps past its `n`
/// words; any other window records its n-gram as seen and the scan moves on by one word. The
/// first occurrence never counts, and no word counts twice.
fn repeated_chars(g: &NGrams, n: usize, word_chars: &[u32]) -> u64 {
    let mut seen = vec![false; g.counts.len()];
    let (mut sum, mut start) = (0u64, 0usize);
    while start < g.slot_of_window.len() {
        let slot = g.slot_of_window[start] as usize;
        if seen[slot] {
            sum += word_chars[start..start + n].iter().map(|&c| c as u64).sum::<u64>();
            start += n;
        } else {
            seen[slot] = true;
            start += 1;
        }
    }
    sum
}

/// Every signal of `text`.
pub fn compute(text: &str) -> Signals {
    let mut s = Signals([0.0; NUM_SIGNALS]);

    // Characters: count, unigram entropy, CJK fraction, symbols.
    let mut ascii = [0u32; 128];
    let mut other: FxHashMap<char, u32> = FxHashMap::default();
    let (mut n_chars, mut non_space, mut cjk, mut hashes) = (0usize, 0usize, 0usize, 0usize);
    for c in text.chars() {
        n_chars += 1;
        if c.is_ascii() {
            ascii[c as usize] += 1;
        } else {
            *other.entry(c).or_insert(0) += 1;
        }
        if !is_space(c) {
            non_space += 1;
            cjk += is_cjk_unit(c) as usize;
        }
        hashes += (c == '#') as usize;
    }
    let char_counts = ascii.iter().copied().filter(|&c| c > 0).chain(other.values().copied());
    s.set(Signal::NChars, n_chars as f64);
    s.set(Signal::CharEntropy, entropy(char_counts, n_chars));
    s.set(Signal::CjkCharFrac, ratio(cjk as f64, non_space as f64));
    if !text.is_empty() {
        s.set(
            Signal::CompressionRatio,
            zlib_size(text.as_bytes()) as f64 / text.len() as f64,
        );
    }

    // Words: interned ids, lengths, letters.
    let ws = words(text);
    let mut interned: FxHashMap<&str, u32> = FxHashMap::with_capacity_and_hasher(ws.len(), Default::default());
    let mut unigram_counts: Vec<u32> = Vec::new();
    let mut ids = Vec::with_capacity(ws.len());
    let mut word_chars = Vec::with_capacity(ws.len());
    let mut no_letter = 0usize;
    for w in &ws {
        let id = *interned.entry(w).or_insert_with(|| {
            unigram_counts.push(0);
            (unigram_counts.len() - 1) as u32
        });
        unigram_counts[id as usize] += 1;
        ids.push(id);
        word_chars.push(char_len(w) as u32);
        no_letter += !w.chars().any(is_letter) as usize;
    }
    let total_word_chars: u64 = word_chars.iter().map(|&c| c as u64).sum();
    let n_words = ws.len() as f64;
    s.set(Signal::NWords, n_words);
    s.set(Signal::MeanWordLength, ratio(total_word_chars as f64, n_words));
    s.set(Signal::WordEntropy, entropy(unigram_counts.iter().copied(), ws.len()));
    let total = total_word_chars as f64;
    s.set(Signal::NonAlphaWordFrac, ratio(no_letter as f64, n_words));
    let ellipses = text.matches("...").count() + text.matches('\u{2026}').count();
    s.set(Signal::HashWordRatio, ratio(hashes as f64, n_words));
    s.set(Signal::EllipsisWordRatio, ratio(ellipses as f64, n_words));

    // Word n-grams: entropy (2-4), top n-gram coverage (2-4), duplicate n-gram coverage (5-10).
    let entropy_signals = [Signal::Entropy2gram, Signal::Entropy3gram, Signal::Entropy4gram];
    let top_signals = [
        Signal::Top2gramCharFrac,
        Signal::Top3gramCharFrac,
        Signal::Top4gramCharFrac,
    ];
    let mut g = NGrams {
        all_unique: unigram_counts.len() == ids.len(),
        counts: unigram_counts,
        slot_of_window: ids.clone(),
    };
    for n in 2..=10 {
        let windows = (ids.len() + 1).saturating_sub(n);
        if g.all_unique {
            // No n-gram repeats: entropy is log2(windows), no top or duplicate n-gram.
            if n <= 4 {
                s.set(
                    entropy_signals[n - 2],
                    entropy(std::iter::repeat_n(1, windows), windows),
                );
            }
            continue;
        }
        g = extend(&g, &ids, n - 1);
        if n <= 4 {
            s.set(entropy_signals[n - 2], entropy(g.counts.iter().copied(), windows));
            let max = g.counts.iter().copied().max().unwrap_or(0);
            if max >= 2 {
                // The most frequent n-gram; ties go to the one that occurs first.
                let top = g
                    .slot_of_window
                    .iter()
                    .copied()
                    .find(|&w| g.counts[w as usize] == max)
                    .unwrap();
                let chars = covered_chars(&g, n, &word_chars, |slot| slot == top);
                s.set(top_signals[n - 2], ratio(chars as f64, total));
            }
        } else {
            let chars = repeated_chars(&g, n, &word_chars);
            s.0[Signal::Dup5gramCharFrac as usize + n - 5] = ratio(chars as f64, total);
        }
    }

    // Lines and paragraphs.
    let ls = lines(text);
    let n_lines = ls.len() as f64;
    s.set(Signal::NLines, n_lines);
    let (mut terminal, mut bullet, mut ellipsis) = (0usize, 0usize, 0usize);
    let mut seen_lines: FxHashMap<&str, ()> = FxHashMap::default();
    let (mut dup_lines, mut dup_line_chars) = (0usize, 0usize);
    for &(line, _) in &ls {
        let end = line.trim_end_matches(is_space);
        let start = line.trim_start_matches(is_space);
        terminal += end.ends_with(TERMINAL_PUNCTUATION) as usize;
        bullet += start.starts_with(BULLETS) as usize;
        ellipsis += (end.ends_with("...") || end.ends_with('\u{2026}')) as usize;
        if seen_lines.insert(line, ()).is_some() {
            dup_lines += 1;
            dup_line_chars += char_len(line);
        }
    }
    s.set(Signal::TerminalPunctLineFrac, ratio(terminal as f64, n_lines));
    s.set(Signal::BulletLineFrac, ratio(bullet as f64, n_lines));
    s.set(Signal::EllipsisLineFrac, ratio(ellipsis as f64, n_lines));
    s.set(Signal::DupLineFrac, ratio(dup_lines as f64, n_lines));
    s.set(Signal::DupLineCharFrac, ratio(dup_line_chars as f64, n_chars as f64));

    let mut seen_paras: FxHashMap<&str, ()> = FxHashMap::default();
    let (mut n_paras, mut dup_paras, mut dup_para_chars) = (0usize, 0usize, 0usize);
    let base = text.as_ptr() as usize;
    let mut i = 0;
    while i < ls.len() {
        let mut j = i;
        while j + 1 < ls.len() && ls[j + 1].1 == ls[i].1 {
            j += 1;
        }
        let from = ls[i].0.as_ptr() as usize - base;
        let to = ls[j].0.as_ptr() as usize - base + ls[j].0.len();
        let para = &text[from..to];
        n_paras += 1;
        if seen_paras.insert(para, ()).is_some() {
            dup_paras += 1;
            dup_para_chars += char_len(para);
        }
        i = j + 1;
    }
    s.set(Signal::DupParaFrac, ratio(dup_paras as f64, n_paras as f64));
    s.set(Signal::DupParaCharFrac, ratio(dup_para_chars as f64, n_chars as f64));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_blank_text_have_all_zero_signals() {
        assert_eq!(compute("").0, [0.0; NUM_SIGNALS]);
        for t in ["   \n\t \n", "\u{3000}"] {
            let s = compute(t);
            for (i, name) in SIGNAL_NAMES.iter().enumerate() {
                let whole_text = ["n_chars", "char_entropy", "compression_ratio"].contains(name);
                assert!(whole_text || s.0[i] == 0.0, "{t:?} {name}");
            }
        }
    }

    #[test]
    fn repetition_signals_match_hand_counts() {
        let s = compute("a b\na b\n\nc d e");
        assert_eq!(s.get(Signal::NLines), 3.0);
        assert_eq!(s.get(Signal::DupLineFrac), 1.0 / 3.0);
        assert_eq!(s.get(Signal::DupLineCharFrac), 3.0 / 14.0);
        assert_eq!(s.get(Signal::DupParaFrac), 0.0);
        // "a b" occurs twice, covering 4 of the 7 word characters.
        assert_eq!(s.get(Signal::Top2gramCharFrac), 4.0 / 7.0);
        assert_eq!(
            s.get(Signal::WordEntropy),
            -(2.0 * (2.0f64 / 7.0).log2() * 2.0 / 7.0 + 3.0 * (1.0f64 / 7.0).log2() / 7.0)
        );
    }

    #[test]
    fn duplicate_ngram_fractions_count_only_the_repeats() {
        // Three copies of a 5-word block (9 word characters) and one more word: 29 characters.
        // 5-grams: the block at word 5 repeats the one at word 0 (9 characters), the scan jumps
        // to word 10, where the block repeats again (9). 6-grams: the window at word 5 repeats
        // the one at word 0 (9 + 2 characters), then no later window repeats one seen before.
        let s = compute("aa b ccc d ee aa b ccc d ee aa b ccc d ee zz");
        let want = [18.0, 11.0, 12.0, 15.0, 16.0, 18.0];
        for (k, w) in want.iter().enumerate() {
            assert_eq!(s.0[Signal::Dup5gramCharFrac as usize + k], w / 29.0, "n = {}", k + 5);
        }
        assert_eq!(compute("p q r s t u v w x y z").get(Signal::Dup5gramCharFrac), 0.0);
    }

    #[test]
    fn hashes_and_ellipses_are_separate_ratios() {
        let s = compute("# a ## b ... c\u{2026} d e");
        assert_eq!(s.get(Signal::HashWordRatio), 3.0 / 8.0);
        assert_eq!(s.get(Signal::EllipsisWordRatio), 2.0 / 8.0);
    }

    #[test]
    fn repeated_paragraphs_are_found() {
        let s = compute("x y\nz\n\nx y\nz\n\nw");
        assert_eq!(s.get(Signal::DupParaFrac), 1.0 / 3.0);
        assert_eq!(s.get(Signal::DupParaCharFrac), 5.0 / 15.0);
    }

    #[test]
    fn compression_ratio_is_zlib_level_one() {
        let t = "the same sentence again. ".repeat(40);
        let r = compute(&t).get(Signal::CompressionRatio);
        assert!(r > 0.0 && r < 0.1, "{r}");
    }
}
