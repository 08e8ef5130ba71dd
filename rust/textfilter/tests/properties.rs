//! Properties of the signals that hold for every text.

use deepseek_textfilter::{NUM_SIGNALS, SIGNAL_NAMES, Signal, compute, compute_batch, features_batch, segment};
use proptest::prelude::*;

/// Text from a mix of scripts, whitespace, punctuation and repetition-prone tiny alphabets.
fn text() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        any::<String>(),
        "[ab \n.#]{0,40}",
        "[模型数据。，\u{3000} \n]{0,30}",
        "[a-z가-힣😀\u{0301} \t\n…!?]{0,40}",
    ];
    prop::collection::vec(pieces, 0..6).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn fractions_are_in_unit_interval_and_everything_finite(t in text()) {
        let s = compute(&t);
        for (i, v) in s.0.iter().enumerate() {
            prop_assert!(v.is_finite() && *v >= 0.0, "{} = {v}", SIGNAL_NAMES[i]);
            if SIGNAL_NAMES[i].ends_with("_frac") {
                prop_assert!(*v <= 1.0 + 1e-12, "{} = {v}", SIGNAL_NAMES[i]);
            }
        }
        let n_words = s.get(Signal::NWords);
        prop_assert!(s.get(Signal::WordEntropy) <= n_words.max(1.0).log2() + 1e-9);
        prop_assert!(s.get(Signal::CharEntropy) <= s.get(Signal::NChars).max(1.0).log2() + 1e-9);
    }

    #[test]
    fn words_cover_exactly_the_non_space_characters(t in text()) {
        let joined: String = segment::words(&t).concat();
        let non_space: String = t.chars().filter(|&c| !segment::is_space(c)).collect();
        prop_assert_eq!(joined, non_space);
    }

    #[test]
    fn a_document_repeated_is_all_duplicate_paragraphs_after_the_first(t in "[a-z]{1,8}( [a-z]{1,8}){0,12}") {
        let twice = format!("{t}\n\n{t}");
        let s = compute(&twice);
        prop_assert_eq!(s.get(Signal::DupParaFrac), 0.5);
        prop_assert_eq!(s.get(Signal::DupLineFrac), 0.5);
    }

    #[test]
    fn batches_agree_with_single_documents(ts in prop::collection::vec(text(), 0..8)) {
        let flat = compute_batch(&ts);
        prop_assert_eq!(flat.len(), ts.len() * NUM_SIGNALS);
        for (i, t) in ts.iter().enumerate() {
            prop_assert_eq!(&flat[i * NUM_SIGNALS..(i + 1) * NUM_SIGNALS], &compute(t).0[..]);
        }
        let (indptr, _, counts) = features_batch(&ts, 97).unwrap();
        for (i, t) in ts.iter().enumerate() {
            let n = segment::words(t).len() as u32;
            let got: u32 = counts[indptr[i] as usize..indptr[i + 1] as usize].iter().sum();
            prop_assert_eq!(got, if n == 0 { 0 } else { 2 * n - 1 });
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_non_blank_line_is_a_document_or_a_reported_error(
        lines in prop::collection::vec(prop_oneof![
            text().prop_map(|t| serde_json::json!({"id": 1, "text": t}).to_string().into_bytes()),
            prop::collection::vec(any::<u8>(), 0..60),
        ], 0..40),
        batch_docs in 1usize..7,
        max_line_bytes in 8usize..200,
    ) {
        use deepseek_textfilter::jsonl::{ReadLimits, read_all};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let lines: Vec<Vec<u8>> = lines.into_iter().map(|l| l.into_iter().filter(|&b| b != b'\n').collect()).collect();
        std::fs::write(&path, lines.join(&b'\n')).unwrap();
        let limits = ReadLimits { batch_docs, batch_bytes: 1 << 20, max_line_bytes };
        let all = read_all(&path, limits).unwrap();
        let mut seen: Vec<u64> = all.records.iter().map(|r| r.line).chain(all.errors.iter().map(|e| e.line)).collect();
        seen.sort_unstable();
        let want: Vec<u64> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                // the limit counts the bytes before the newline (a CR included)
                let blank = l.strip_suffix(b"\r").unwrap_or(l).iter().all(u8::is_ascii_whitespace);
                !blank || l.len() > max_line_bytes
            })
            .map(|(i, _)| i as u64 + 1)
            .collect();
        prop_assert_eq!(seen, want);
        for r in &all.records {
            prop_assert!(r.raw.len() <= max_line_bytes);
        }
    }
}
