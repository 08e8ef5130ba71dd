//! Dropless token dispatch for Mixture-of-Experts layers.
//!
//! A routing is a per-token CSR of (token, expert) pairs. [`sort_by_expert`] orders the pairs
//! by expert with a stable counting sort, so every expert's tokens form one contiguous segment
//! of the expert buffer. [`gather`] copies token rows into that buffer and [`combine`] sums
//! expert output rows back into token order, weighted, in a fixed per-token order (no atomics,
//! so results are bitwise the same whatever the thread count). Together with
//! [`combine_weight_grad`] they are also each other's backward passes.
#![deny(missing_docs)]

use num_traits::Float;
use rayon::prelude::*;

/// Pairs counted by one parallel task of the counting sort; fixed, so the work split does not
/// depend on the thread count.
const PAIRS_PER_TASK: usize = 16384;
/// Rows below which a parallel task is not worth its scheduling cost.
const MIN_ROWS_PER_TASK: usize = 16;
/// Elements below which a call runs on the calling thread: handing work to the thread pool and
/// waiting for it costs tens of microseconds (measured 29 us for a 96-row gather that copies in
/// 2), as much as moving this many floats.
const SERIAL_ELEMENTS: usize = 1 << 16;

/// Why a dispatch step could not be done.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    /// Input lengths disagree with each other.
    #[error("{0}")]
    Shape(String),
    /// An index or offset is out of range.
    #[error("{0}")]
    Index(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DispatchError>;

/// The most experts [`sort_by_expert`] takes (16M, far above any model's).
pub const MAX_EXPERTS: usize = 1 << 24;

/// The expert-sorted order of the (token, expert) pairs of a routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Permutation {
    /// For each row of the expert buffer, the pair it holds.
    pub sorted_pair: Vec<i64>,
    /// For each row of the expert buffer, the token it came from.
    pub sorted_token: Vec<i64>,
    /// For each pair, its row in the expert buffer (the inverse of `sorted_pair`).
    pub pair_position: Vec<i64>,
    /// `experts + 1` offsets: expert `e` owns rows `expert_offsets[e]..expert_offsets[e + 1]`.
    pub expert_offsets: Vec<i64>,
}

/// Checks a token CSR and returns the number of tokens.
fn check_offsets(token_offsets: &[i64], pairs: usize) -> Result<usize> {
    let Some((&first, rest)) = token_offsets.split_first() else {
        return Err(DispatchError::Shape(
            "token_offsets needs at least one entry (tokens + 1)".into(),
        ));
    };
    if first != 0 || token_offsets.windows(2).any(|w| w[0] > w[1]) || rest.last().map_or(0, |&l| l) as usize != pairs {
        return Err(DispatchError::Index(format!(
            "token_offsets must rise from 0 to the number of pairs ({pairs})"
        )));
    }
    Ok(token_offsets.len() - 1)
}

fn check_rows(what: &str, index: &[i64], rows: usize) -> Result<()> {
    match index.iter().find(|&&i| i < 0 || i as usize >= rows) {
        None => Ok(()),
        Some(i) => Err(DispatchError::Index(format!("{what} holds {i}, outside 0..{rows}"))),
    }
}

fn check_matrix(what: &str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 {
        return Ok(0);
    }
    if !len.is_multiple_of(cols) {
        return Err(DispatchError::Shape(format!(
            "{what} of length {len} is not a whole number of rows of {cols}"
        )));
    }
    Ok(len / cols)
}

/// Stable counting sort of the pairs of a routing by expert: per-task histograms, a prefix
/// sum over (expert, task), then each task scatters its own pairs in order.
pub fn sort_by_expert(token_offsets: &[i64], expert_ids: &[i64], num_experts: usize) -> Result<Permutation> {
    if num_experts > MAX_EXPERTS {
        // Each task keeps a histogram of `num_experts` counters: refuse before allocating them.
        return Err(DispatchError::Index(format!(
            "num_experts must be at most {MAX_EXPERTS}, got {num_experts}"
        )));
    }
    let pairs = expert_ids.len();
    check_offsets(token_offsets, pairs)?;
    check_rows("expert_ids", expert_ids, num_experts)?;

    let histograms: Vec<Vec<i64>> = expert_ids
        .par_chunks(PAIRS_PER_TASK)
        .map(|chunk| {
            let mut h = vec![0i64; num_experts];
            for &e in chunk {
                h[e as usize] += 1;
            }
            h
        })
        .collect();
    let mut expert_offsets = vec![0i64; num_experts + 1];
    for h in &histograms {
        for (e, &n) in h.iter().enumerate() {
            expert_offsets[e + 1] += n;
        }
    }
    for e in 0..num_experts {
        expert_offsets[e + 1] += expert_offsets[e];
    }
    // Where each task starts writing inside each expert's segment.
    let mut starts = Vec::with_capacity(histograms.len());
    let mut next = expert_offsets[..num_experts].to_vec();
    for h in &histograms {
        starts.push(next.clone());
        for (n, &c) in next.iter_mut().zip(h) {
            *n += c;
        }
    }
    let mut pair_position = vec![0i64; pairs];
    pair_position
        .par_chunks_mut(PAIRS_PER_TASK)
        .zip(expert_ids.par_chunks(PAIRS_PER_TASK))
        .zip(starts.into_par_iter())
        .for_each(|((pos, ids), mut cursor)| {
            for (p, &e) in pos.iter_mut().zip(ids) {
                *p = cursor[e as usize];
                cursor[e as usize] += 1;
            }
        });
    let mut pair_token = vec![0i64; pairs];
    for (t, w) in token_offsets.windows(2).enumerate() {
        pair_token[w[0] as usize..w[1] as usize].fill(t as i64);
    }
    let mut sorted_pair = vec![0i64; pairs];
    let mut sorted_token = vec![0i64; pairs];
    for (j, &p) in pair_position.iter().enumerate() {
        sorted_pair[p as usize] = j as i64;
        sorted_token[p as usize] = pair_token[j];
    }
    Ok(Permutation {
        sorted_pair,
        sorted_token,
        pair_position,
        expert_offsets,
    })
}

/// `out[r] = src[index[r]]` row by row (`cols` elements a row): the dispatch of token rows
/// into the expert buffer. Works on any element type since it only copies.
pub fn gather<T: Copy + Send + Sync>(src: &[T], cols: usize, index: &[i64], out: &mut [T]) -> Result<()> {
    let rows = check_matrix("gather source", src.len(), cols)?;
    if out.len() != index.len() * cols {
        return Err(DispatchError::Shape(format!(
            "gather output has {} elements, expected {} rows of {cols}",
            out.len(),
            index.len()
        )));
    }
    check_rows("gather index", index, rows)?;
    if cols == 0 {
        return Ok(());
    }
    let copy = |(dst, &i): (&mut [T], &i64)| dst.copy_from_slice(&src[i as usize * cols..(i as usize + 1) * cols]);
    if out.len() < SERIAL_ELEMENTS {
        out.chunks_mut(cols).zip(index).for_each(copy);
    } else {
        out.par_chunks_mut(cols)
            .zip(index.par_iter())
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(copy);
    }
    Ok(())
}

/// `out[r] = scale[r] * src[index[r]]`: the backward of [`combine`] with respect to the expert
/// buffer (`scale` is the routing weight of the pair each buffer row holds).
pub fn gather_scaled<F: Float + Send + Sync>(
    src: &[F],
    cols: usize,
    index: &[i64],
    scale: &[F],
    out: &mut [F],
) -> Result<()> {
    if scale.len() != index.len() {
        return Err(DispatchError::Shape(format!(
            "gather scale has {} entries, expected one per row ({})",
            scale.len(),
            index.len()
        )));
    }
    gather(src, cols, index, out)?;
    if cols == 0 {
        return Ok(());
    }
    let scale_row = |(row, &s): (&mut [F], &F)| row.iter_mut().for_each(|v| *v = *v * s);
    if out.len() < SERIAL_ELEMENTS {
        out.chunks_mut(cols).zip(scale).for_each(scale_row);
    } else {
        out.par_chunks_mut(cols)
            .zip(scale.par_iter())
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(scale_row);
    }
    Ok(())
}

/// Checks the arguments shared by [`combine`] and [`combine_weight_grad`]; returns the number
/// of tokens.
fn check_combine(buf_len: usize, cols: usize, pair_position: &[i64], token_offsets: &[i64]) -> Result<usize> {
    let rows = check_matrix("expert buffer", buf_len, cols)?;
    let tokens = check_offsets(token_offsets, pair_position.len())?;
    if cols > 0 {
        check_rows("pair_position", pair_position, rows)?;
    }
    Ok(tokens)
}

/// `out[t] = sum over the pairs j of token t, in CSR order, of weights[j] * buf[pair_position[j]]`
/// (weight 1 when `weights` is `None`): the weighted combine of expert outputs back into token
/// order. Without weights it is the backward of [`gather`]. A token with no pairs gets zeros.
pub fn combine<F: Float + Send + Sync>(
    buf: &[F],
    cols: usize,
    pair_position: &[i64],
    token_offsets: &[i64],
    weights: Option<&[F]>,
    out: &mut [F],
) -> Result<()> {
    let tokens = check_combine(buf.len(), cols, pair_position, token_offsets)?;
    if let Some(w) = weights
        && w.len() != pair_position.len()
    {
        return Err(DispatchError::Shape(format!(
            "combine weights have {} entries, expected one per pair ({})",
            w.len(),
            pair_position.len()
        )));
    }
    if out.len() != tokens * cols {
        return Err(DispatchError::Shape(format!(
            "combine output has {} elements, expected {tokens} tokens of {cols}",
            out.len()
        )));
    }
    if cols == 0 {
        return Ok(());
    }
    let sum_token = |(t, dst): (usize, &mut [F])| {
        let pairs = token_offsets[t] as usize..token_offsets[t + 1] as usize;
        if pairs.is_empty() {
            dst.fill(F::zero());
        }
        for (n, j) in pairs.enumerate() {
            let p = pair_position[j] as usize;
            let row = &buf[p * cols..(p + 1) * cols];
            let w = weights.map_or(F::one(), |w| w[j]);
            if n == 0 {
                dst.iter_mut().zip(row).for_each(|(d, &r)| *d = w * r);
            } else {
                dst.iter_mut().zip(row).for_each(|(d, &r)| *d = *d + w * r);
            }
        }
    };
    if buf.len() + out.len() < SERIAL_ELEMENTS {
        out.chunks_mut(cols).enumerate().for_each(sum_token);
    } else {
        out.par_chunks_mut(cols)
            .enumerate()
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(sum_token);
    }
    Ok(())
}

/// Gradient of [`combine`] with respect to its weights:
/// `grad_weights[j] = dot(grad_out[token of j], buf[pair_position[j]])`.
pub fn combine_weight_grad<F: Float + Send + Sync>(
    grad_out: &[F],
    buf: &[F],
    cols: usize,
    pair_position: &[i64],
    token_offsets: &[i64],
) -> Result<Vec<F>> {
    let tokens = check_combine(buf.len(), cols, pair_position, token_offsets)?;
    if grad_out.len() != tokens * cols {
        return Err(DispatchError::Shape(format!(
            "grad_out has {} elements, expected {tokens} tokens of {cols}",
            grad_out.len()
        )));
    }
    let mut grad = vec![F::zero(); pair_position.len()];
    if cols == 0 {
        return Ok(grad);
    }
    // Each token owns a contiguous run of pairs: hand every token its own slice of `grad`.
    let mut per_token = Vec::with_capacity(tokens);
    let mut rest = grad.as_mut_slice();
    for w in token_offsets.windows(2) {
        let (mine, tail) = rest.split_at_mut((w[1] - w[0]) as usize);
        per_token.push(mine);
        rest = tail;
    }
    let dots = |(t, dst): (usize, &mut [F])| {
        let g = &grad_out[t * cols..(t + 1) * cols];
        for (d, &p) in dst.iter_mut().zip(&pair_position[token_offsets[t] as usize..]) {
            let p = p as usize;
            *d = dot(g, &buf[p * cols..(p + 1) * cols]);
        }
    };
    if buf.len() + grad_out.len() < SERIAL_ELEMENTS {
        per_token.into_iter().enumerate().for_each(dots);
    } else {
        per_token
            .into_par_iter()
            .enumerate()
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(dots);
    }
    Ok(grad)
}

/// Dot product with eight fixed partial sums: vectorises, and the order never changes.
fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    let mut acc = [F::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = acc[i] + x[i] * y[i];
        }
    }
    let mut s = ra.iter().zip(rb).fold(F::zero(), |s, (&x, &y)| s + x * y);
    for v in acc {
        s = s + v;
    }
    s
}

#[cfg(test)]
mod tests;
