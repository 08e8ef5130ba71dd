//! The engine of the pre-training data filter: per-document quality signals (entropy,
//! compression, Gopher repetition, FineWeb line signals) in one pass per document, DSIR hashed
//! n-gram features, and streaming JSONL shards. Pure Rust; `deepseek_rs._core` binds it.
//!
//! Batch functions run over documents in parallel (rayon); every result depends only on its
//! document, so it is the same whatever the thread count.
#![deny(missing_docs)]

use rayon::prelude::*;

pub mod hashed;
pub mod jsonl;
pub mod segment;
pub mod signals;

pub use signals::{NUM_SIGNALS, SIGNAL_NAMES, Signal, Signals, compute};

/// Why a filter step could not be done.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// An argument is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// Reading or writing a file failed.
    #[error("{path}: {}{source}", if *line > 0 { format!("line {line}: ") } else { String::new() })]
    Io {
        /// The file.
        path: String,
        /// The 1-based line where it failed, 0 if not at a line.
        line: u64,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, FilterError>;

/// The signals of every document, row-major `[docs, NUM_SIGNALS]`.
pub fn compute_batch<S: AsRef<str> + Sync>(texts: &[S]) -> Vec<f64> {
    let rows: Vec<Signals> = texts.par_iter().map(|t| compute(t.as_ref())).collect();
    rows.into_iter().flat_map(|s| s.0).collect()
}

/// Hashed n-gram features of every document as a CSR matrix `(indptr, buckets, counts)`.
pub fn features_batch<S: AsRef<str> + Sync>(texts: &[S], buckets: u32) -> Result<(Vec<i64>, Vec<u32>, Vec<u32>)> {
    let rows: Vec<Vec<(u32, u32)>> = texts
        .par_iter()
        .map(|t| hashed::features(t.as_ref(), buckets))
        .collect::<Result<_>>()?;
    let mut indptr = Vec::with_capacity(rows.len() + 1);
    indptr.push(0i64);
    let (mut idx, mut cnt) = (Vec::new(), Vec::new());
    for r in rows {
        for (b, c) in r {
            idx.push(b);
            cnt.push(c);
        }
        indptr.push(idx.len() as i64);
    }
    Ok((indptr, idx, cnt))
}

/// DSIR log importance weights of every document; with `per_feature`, divided by the number of
/// hashed features of the document (0 for a document without words), so lengths compare.
pub fn log_importance_batch<S: AsRef<str> + Sync>(
    texts: &[S],
    log_ratio: &[f64],
    per_feature: bool,
) -> Result<Vec<f64>> {
    if log_ratio.is_empty() {
        return Err(FilterError::InvalidArgument(
            "log_ratio must have at least one bucket".into(),
        ));
    }
    if let Some(i) = log_ratio.iter().position(|v| !v.is_finite()) {
        return Err(FilterError::InvalidArgument(format!("log_ratio[{i}] is not finite")));
    }
    texts
        .par_iter()
        .map(|t| {
            let (w, n) = hashed::log_importance(t.as_ref(), log_ratio)?;
            Ok(match (per_feature, n) {
                (false, _) => w,
                (true, 0) => 0.0,
                (true, n) => w / n as f64,
            })
        })
        .collect()
}
