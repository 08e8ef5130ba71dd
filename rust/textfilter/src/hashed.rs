//! Hashed n-gram features (DSIR, Xie et al. 2023): lower-cased word unigrams and bigrams, each
//! hashed into one of `buckets` buckets with 64-bit FNV-1a (stable across runs and platforms).
//! A document becomes a sparse bag of bucket counts; DSIR's importance weight of a document is
//! then `sum_b count_b * (log p_target(b) - log p_raw(b))`, see [`log_importance`].

use crate::segment::words;
use crate::{FilterError, Result};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(FNV_PRIME))
}

/// The bucket of a unigram `w` or a bigram `w1 w2` (hashed as the words joined by one space).
pub fn bucket(ngram: &[&str], buckets: u32) -> u32 {
    let mut h = FNV_OFFSET;
    for (i, w) in ngram.iter().enumerate() {
        if i > 0 {
            h = fnv1a(h, b" ");
        }
        h = fnv1a(h, w.as_bytes());
    }
    (h % buckets as u64) as u32
}

fn check_buckets(buckets: u32) -> Result<()> {
    if buckets == 0 {
        return Err(FilterError::InvalidArgument("buckets must be at least 1".into()));
    }
    Ok(())
}

/// The (bucket, count) pairs of `text`, sorted by bucket, zero counts left out.
pub fn features(text: &str, buckets: u32) -> Result<Vec<(u32, u32)>> {
    check_buckets(buckets)?;
    let lower: Vec<String> = words(text).into_iter().map(str::to_lowercase).collect();
    let mut hits: Vec<u32> = Vec::with_capacity(2 * lower.len());
    for (i, w) in lower.iter().enumerate() {
        hits.push(bucket(&[w], buckets));
        if let Some(next) = lower.get(i + 1) {
            hits.push(bucket(&[w, next], buckets));
        }
    }
    hits.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for b in hits {
        match out.last_mut() {
            Some((last, c)) if *last == b => *c += 1,
            _ => out.push((b, 1)),
        }
    }
    Ok(out)
}

/// DSIR log importance weight of `text` given per-bucket `log p_target - log p_raw`, and the
/// number of features it sums over.
pub fn log_importance(text: &str, log_ratio: &[f64]) -> Result<(f64, u32)> {
    let buckets =
        u32::try_from(log_ratio.len()).map_err(|_| FilterError::InvalidArgument("too many buckets for u32".into()))?;
    let f = features(text, buckets)?;
    let n = f.iter().map(|p| p.1).sum();
    Ok((f.into_iter().map(|(b, c)| c as f64 * log_ratio[b as usize]).sum(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vector() {
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn features_count_unigrams_and_bigrams() {
        let f = features("A a", 1).unwrap();
        assert_eq!(f, [(0, 3)]);
        let f = features("x y x y", 1 << 20).unwrap();
        assert_eq!(f.iter().map(|p| p.1).sum::<u32>(), 7);
        assert!(features("x", 0).is_err());
        let (w, n) = log_importance("x y", &[0.5, -1.0]).unwrap();
        assert_eq!(n, 3);
        let f = features("x y", 2).unwrap();
        let want: f64 = f.iter().map(|&(b, c)| c as f64 * [0.5, -1.0][b as usize]).sum();
        assert_eq!(w, want);
    }
}
