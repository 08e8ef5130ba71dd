//! Word and line segmentation shared by every signal.
//!
//! Words are whitespace-separated tokens, except that Chinese and Japanese script has no spaces
//! between words: every Han, Hiragana or Katakana character (and every CJK or full-width
//! punctuation mark) is a word of its own, as in BERT's basic tokenizer. Hangul is not split:
//! Korean separates its words with spaces.

use unicode_general_category::{GeneralCategory as G, get_general_category};

/// Whitespace as Python's `str.isspace` sees it: Unicode `White_Space` plus the four ASCII
/// information separators U+001C..U+001F, so that words match `str.split()`.
#[inline]
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A character that forms a word by itself: Han ideographs (BERT's ranges), Hiragana,
/// Katakana, CJK symbols and punctuation, and the half-width and full-width forms block.
#[inline]
pub fn is_cjk_unit(c: char) -> bool {
    matches!(c as u32,
        0x3001..=0x303F          // CJK symbols and punctuation (U+3000 is a space)
        | 0x3040..=0x30FF        // Hiragana, Katakana
        | 0x31F0..=0x31FF        // Katakana phonetic extensions
        | 0x3400..=0x4DBF        // CJK extension A
        | 0x4E00..=0x9FFF        // CJK unified ideographs
        | 0xF900..=0xFAFF        // CJK compatibility ideographs
        | 0xFF00..=0xFFEF        // half-width and full-width forms
        | 0x20000..=0x2FA1F // CJK extensions B..F and compatibility supplement
    )
}

/// A letter: Unicode general category L* (Python's `str.isalpha`).
#[inline]
pub fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    matches!(
        get_general_category(c),
        G::UppercaseLetter | G::LowercaseLetter | G::TitlecaseLetter | G::ModifierLetter | G::OtherLetter
    )
}

/// The words of `text` as slices of it, in order.
pub fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::with_capacity(text.len() / 5 + 1);
    let mut start: Option<usize> = None;
    for (i, c) in text.char_indices() {
        if is_space(c) {
            if let Some(s) = start.take() {
                out.push(&text[s..i]);
            }
        } else if is_cjk_unit(c) {
            if let Some(s) = start.take() {
                out.push(&text[s..i]);
            }
            out.push(&text[i..i + c.len_utf8()]);
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}

/// The non-blank lines of `text` (split on `\n`; a line of only whitespace is blank), each with
/// the index of its paragraph: paragraphs are runs of non-blank lines separated by blank ones.
pub fn lines(text: &str) -> Vec<(&str, usize)> {
    let mut out = Vec::new();
    let mut paragraph = 0usize;
    let mut gap = false;
    for line in text.split('\n') {
        if line.chars().all(is_space) {
            gap = true;
            continue;
        }
        if gap && !out.is_empty() {
            paragraph += 1;
        }
        gap = false;
        out.push((line, paragraph));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cjk_characters_are_words_and_latin_runs_stay_whole() {
        assert_eq!(
            words("DeepSeek模型，很好 ok"),
            ["DeepSeek", "模", "型", "，", "很", "好", "ok"]
        );
        assert_eq!(words("한국어 문장"), ["한국어", "문장"]);
        assert_eq!(words(" \t\u{3000}\u{1c}"), Vec::<&str>::new());
    }

    #[test]
    fn paragraphs_are_separated_by_blank_lines() {
        let ls = lines("a\nb\n \n\nc\n");
        assert_eq!(ls, [("a", 0), ("b", 0), ("c", 1)]);
    }
}
