//! Expert selection for Mixture-of-Experts layers.
//!
//! Three rules, all over router logits laid out row-major as `[tokens, experts]`:
//!
//! * [`softmax_top_k`]: softmax over all experts, keep the `k` largest (Mixtral, Qwen-MoE);
//! * [`softmax_top_p`]: progressive expert activation, keep the smallest prefix of the
//!   descending probabilities whose mass reaches `p`, between `min_k` and `max_k` experts
//!   (Huang et al. 2024, "Harder Tasks Need More Experts");
//! * [`sigmoid_group_limited`]: sigmoid scores, a selection-only bias and group-limited
//!   top-k (DeepSeek-V3).
//!
//! The result is a per-token CSR ([`Routing`]) so a variable number of experts per token
//! needs no padding. Within a token, experts are listed by descending selection score;
//! ties go to the lower expert index. [`route_backward`] gives the gradient of the
//! selected weights with respect to the logits.
#![deny(missing_docs)]

use num_traits::Float;
use rayon::prelude::*;

/// Tokens handled by one parallel task; fixed so results do not depend on the thread count.
const TOKENS_PER_TASK: usize = 256;

/// Floating-point element types the router works on.
pub trait Real: Float + Send + Sync + std::fmt::Debug + 'static {
    /// `exp(x)` for `x <= 0`, the only range softmax needs. The default is the exact `exp`.
    #[inline(always)]
    fn exp_nonpositive(x: Self) -> Self {
        x.exp()
    }

    /// Whether every element is finite.
    fn all_finite(row: &[Self]) -> bool {
        row.iter().all(|v| v.is_finite())
    }
}

impl Real for f64 {}

impl Real for f32 {
    /// Cephes' `expf` (range reduction by ln 2, degree-6 polynomial; about 1 ulp) written with
    /// no branches or libm calls so the softmax loops vectorise. Inputs below -87.3 (where
    /// `exp` underflows) give about 1e-38 instead of 0.
    #[inline(always)]
    fn exp_nonpositive(x: f32) -> f32 {
        const SHIFTER: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
        let x = x.max(-87.3);
        let t = x * std::f32::consts::LOG2_E + SHIFTER;
        let n = t - SHIFTER;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        let y = p * r * r + r + 1.0;
        // n is in -126..=0 here, so the exponent field n + 127 stays normal.
        let scale = f32::from_bits(((t.to_bits() as i32 - SHIFTER.to_bits() as i32 + 127) as u32) << 23);
        y * scale
    }

    fn all_finite(row: &[f32]) -> bool {
        // Exponent bits all set means inf or NaN; an OR over the row vectorises.
        row.iter()
            .fold(0u32, |acc, v| acc | ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32)
            == 0
    }
}

/// Why routing could not be done.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouterError {
    /// Input lengths disagree with the stated shape.
    #[error("{0}")]
    Shape(String),
    /// A parameter is out of its allowed range.
    #[error("{0}")]
    Value(String),
    /// A logit (or bias) is NaN or infinite.
    #[error("router logits must be finite, found {value} at token {token}, expert {expert}")]
    NonFinite {
        /// Token row of the bad value.
        token: usize,
        /// Expert column of the bad value.
        expert: usize,
        /// The value itself.
        value: f64,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, RouterError>;

/// Per-token CSR of the selected experts.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing<F> {
    /// `tokens + 1` offsets: token `t` owns pairs `token_offsets[t]..token_offsets[t + 1]`.
    pub token_offsets: Vec<i64>,
    /// Expert of each (token, expert) pair.
    pub expert_ids: Vec<i64>,
    /// Combine weight of each pair.
    pub weights: Vec<F>,
    /// Number of pairs routed to each expert.
    pub expert_counts: Vec<i64>,
}

/// How scores are made from logits; decides the backward formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// `softmax(logits)` over all experts.
    Softmax,
    /// `sigmoid(logits)` per expert.
    Sigmoid,
}

/// Parameters of the DeepSeek-V3 group-limited rule.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimited {
    /// Experts per token.
    pub top_k: usize,
    /// Number of equal expert groups.
    pub n_group: usize,
    /// Groups a token may draw experts from.
    pub topk_group: usize,
    /// Divide the selected scores by their sum.
    pub renormalize: bool,
}

fn check_logits<F: Real>(logits: &[F], num_experts: usize) -> Result<usize> {
    if num_experts == 0 {
        return Err(RouterError::Shape("router logits need at least one expert".into()));
    }
    if logits.len() % num_experts != 0 {
        return Err(RouterError::Shape(format!(
            "router logits of length {} are not a whole number of rows of {num_experts} experts",
            logits.len()
        )));
    }
    Ok(logits.len() / num_experts)
}

fn check_finite<F: Real>(row: &[F], token: usize) -> Result<()> {
    if F::all_finite(row) {
        return Ok(());
    }
    match row.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(expert) => Err(RouterError::NonFinite {
            token,
            expert,
            value: row[expert].to_f64().unwrap_or(f64::NAN),
        }),
    }
}

/// Indices of the `k` largest `scores` (only where `allowed`), in descending order, ties to
/// the lower index. Insertion keeps it O(E k) with no allocation beyond `out`; the k-th best
/// score is kept in a local so most experts cost one comparison.
fn top_indices<F: Real>(scores: &[F], k: usize, allowed: impl Fn(usize) -> bool, out: &mut Vec<usize>) {
    out.clear();
    let mut threshold = F::neg_infinity();
    for (e, &v) in scores.iter().enumerate() {
        if (out.len() == k && v <= threshold) || !allowed(e) {
            continue;
        }
        if out.len() == k {
            out.pop();
        }
        // Shift smaller scores right; equal scores stay ahead (lower index).
        let mut pos = out.len();
        while pos > 0 && scores[out[pos - 1]] < v {
            pos -= 1;
        }
        out.insert(pos, e);
        if out.len() == k {
            threshold = scores[out[k - 1]];
        }
    }
}

/// Eight fixed partial accumulators: lets the loops vectorise, and the order never changes.
const LANES: usize = 8;

/// Softmax of one row: returns `(max, sum of exp(z - max))` so `p_e = exp(z_e - max) / sum`.
fn softmax_stats<F: Real>(row: &[F]) -> (F, F) {
    let mut lanes = [F::neg_infinity(); LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let max = tail
        .iter()
        .chain(&lanes)
        .fold(F::neg_infinity(), |m, &v| if v > m { v } else { m });
    let mut sums = [F::zero(); LANES];
    let chunks = row.chunks_exact(LANES);
    for c in chunks {
        for i in 0..LANES {
            sums[i] = sums[i] + F::exp_nonpositive(c[i] - max);
        }
    }
    let sum = tail.iter().fold(F::zero(), |s, &z| s + F::exp_nonpositive(z - max));
    (max, sums.iter().fold(sum, |s, &v| s + v))
}

fn sigmoid<F: Real>(z: F) -> F {
    F::one() / (F::one() + (-z).exp())
}

/// Per-task output: expert ids, weights and per-token counts, concatenated in token order.
struct Part<F> {
    ids: Vec<i64>,
    weights: Vec<F>,
    per_token: Vec<i64>,
}

/// Runs `select` on every token row in fixed-size parallel tasks and assembles the CSR.
/// `select(token, row, ids, weights)` appends that token's pairs.
fn route_rows<F, S>(logits: &[F], num_experts: usize, select: S) -> Result<Routing<F>>
where
    F: Real,
    S: Fn(usize, &[F], &mut Vec<usize>, &mut Vec<F>) -> Result<()> + Sync,
{
    let tokens = check_logits(logits, num_experts)?;
    let parts: Vec<Result<Part<F>>> = logits
        .par_chunks(TOKENS_PER_TASK * num_experts)
        .enumerate()
        .map(|(task, rows)| {
            let mut part = Part {
                ids: Vec::new(),
                weights: Vec::new(),
                per_token: Vec::new(),
            };
            let (mut ids, mut ws) = (Vec::new(), Vec::new());
            for (i, row) in rows.chunks_exact(num_experts).enumerate() {
                let token = task * TOKENS_PER_TASK + i;
                check_finite(row, token)?;
                ids.clear();
                ws.clear();
                select(token, row, &mut ids, &mut ws)?;
                part.per_token.push(ids.len() as i64);
                part.ids.extend(ids.iter().map(|&e| e as i64));
                part.weights.extend_from_slice(&ws);
            }
            Ok(part)
        })
        .collect();
    let mut token_offsets = Vec::with_capacity(tokens + 1);
    token_offsets.push(0i64);
    let (mut expert_ids, mut weights) = (Vec::new(), Vec::new());
    for part in parts {
        // The first error in token order wins, whatever order the tasks finished in.
        let part = part?;
        for n in part.per_token {
            token_offsets.push(token_offsets.last().copied().unwrap_or(0) + n);
        }
        expert_ids.extend(part.ids);
        weights.extend(part.weights);
    }
    let mut expert_counts = vec![0i64; num_experts];
    for &e in &expert_ids {
        expert_counts[e as usize] += 1;
    }
    Ok(Routing {
        token_offsets,
        expert_ids,
        weights,
        expert_counts,
    })
}

fn renormalize_in_place<F: Real>(ws: &mut [F], eps: F) {
    let sum = ws.iter().fold(F::zero(), |s, &w| s + w) + eps;
    for w in ws.iter_mut() {
        *w = *w / sum;
    }
}

/// Softmax top-k: the `k` most probable experts of each token, weighted by their softmax
/// probability, or by the probability renormalised over the `k` when `renormalize`.
pub fn softmax_top_k<F: Real>(logits: &[F], num_experts: usize, k: usize, renormalize: bool) -> Result<Routing<F>> {
    if k == 0 || k > num_experts {
        return Err(RouterError::Value(format!(
            "top_k must be in 1..={num_experts}, got {k}"
        )));
    }
    route_rows(logits, num_experts, |_, row, ids, ws| {
        // Softmax is monotone, so selecting on the logits is exact and skips E divisions.
        top_indices(row, k, |_| true, ids);
        let (max, sum) = softmax_stats(row);
        ws.extend(ids.iter().map(|&e| F::exp_nonpositive(row[e] - max) / sum));
        if renormalize {
            renormalize_in_place(ws, F::zero());
        }
        Ok(())
    })
}

/// Progressive top-p: per token, the smallest prefix of the experts sorted by descending
/// probability whose cumulative probability reaches `p`, clamped to `min_k..=max_k` experts.
pub fn softmax_top_p<F: Real>(
    logits: &[F],
    num_experts: usize,
    p: f64,
    min_k: usize,
    max_k: usize,
    renormalize: bool,
) -> Result<Routing<F>> {
    if !(p > 0.0 && p <= 1.0) {
        return Err(RouterError::Value(format!("top_p must be in (0, 1], got {p}")));
    }
    if min_k == 0 || min_k > max_k || max_k > num_experts {
        return Err(RouterError::Value(format!(
            "need 1 <= min_k <= max_k <= num_experts ({num_experts}), got min_k={min_k}, max_k={max_k}"
        )));
    }
    route_rows(logits, num_experts, |_, row, ids, ws| {
        top_indices(row, max_k, |_| true, ids);
        let (max, sum) = softmax_stats(row);
        // The mass is accumulated in f64 so the stopping point does not drift with F.
        let mut mass = 0.0f64;
        let mut keep = 0;
        for &e in ids.iter() {
            if keep >= min_k && mass >= p {
                break;
            }
            let prob = F::exp_nonpositive(row[e] - max) / sum;
            mass += prob.to_f64().unwrap_or(0.0);
            ws.push(prob);
            keep += 1;
        }
        ids.truncate(keep);
        if renormalize {
            renormalize_in_place(ws, F::zero());
        }
        Ok(())
    })
}

/// DeepSeek-V3 routing: `s = sigmoid(logits)`; experts are chosen on `s + bias` (the bias only
/// steers selection), first the `topk_group` groups with the largest sum of their two best
/// scores, then the `top_k` best experts inside those groups. Weights are the unbiased `s`,
/// divided by their sum (plus 1e-20) when `renormalize`.
pub fn sigmoid_group_limited<F: Real>(
    logits: &[F],
    bias: &[F],
    num_experts: usize,
    rule: GroupLimited,
) -> Result<Routing<F>> {
    let GroupLimited {
        top_k,
        n_group,
        topk_group,
        renormalize,
    } = rule;
    if bias.len() != num_experts {
        return Err(RouterError::Shape(format!(
            "selection bias has {} entries, expected one per expert ({num_experts})",
            bias.len()
        )));
    }
    if let Some(e) = bias.iter().position(|b| !b.is_finite()) {
        return Err(RouterError::Value(format!(
            "selection bias must be finite, found {:?} at expert {e}",
            bias[e]
        )));
    }
    if n_group == 0 || num_experts % n_group != 0 {
        return Err(RouterError::Value(format!(
            "n_group ({n_group}) must divide num_experts ({num_experts})"
        )));
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(RouterError::Value(format!(
            "topk_group must be in 1..={n_group}, got {topk_group}"
        )));
    }
    let group_size = num_experts / n_group;
    if top_k == 0 || top_k > topk_group * group_size {
        return Err(RouterError::Value(format!(
            "top_k must be in 1..={} (topk_group * experts per group), got {top_k}",
            topk_group * group_size
        )));
    }
    let eps = F::from(1e-20).unwrap_or(F::zero());
    route_rows(logits, num_experts, |_, row, ids, ws| {
        let choice: Vec<F> = row.iter().zip(bias).map(|(&z, &b)| sigmoid(z) + b).collect();
        let mut best = Vec::with_capacity(2);
        let group_scores: Vec<F> = choice
            .chunks_exact(group_size)
            .map(|g| {
                top_indices(g, group_size.min(2), |_| true, &mut best);
                best.iter().fold(F::zero(), |s, &i| s + g[i])
            })
            .collect();
        let mut groups = Vec::with_capacity(topk_group);
        top_indices(&group_scores, topk_group, |_| true, &mut groups);
        let mut in_group = vec![false; n_group];
        for &g in &groups {
            in_group[g] = true;
        }
        top_indices(&choice, top_k, |e| in_group[e / group_size], ids);
        ws.extend(ids.iter().map(|&e| sigmoid(row[e])));
        if renormalize {
            renormalize_in_place(ws, eps);
        }
        Ok(())
    })
}

/// Gradient of the loss with respect to the logits, given the gradient of the routing
/// weights (`grad_weights`, one per pair) of a routing made by the rule named by `scoring`.
/// `scale` is the factor the weights were multiplied by after routing (for example
/// DeepSeek-V3's `routed_scaling_factor`): the caller passes the gradient of the scaled
/// weights and this function accounts for it.
#[allow(clippy::too_many_arguments)]
pub fn route_backward<F: Real>(
    logits: &[F],
    num_experts: usize,
    token_offsets: &[i64],
    expert_ids: &[i64],
    grad_weights: &[F],
    scoring: Scoring,
    renormalize: bool,
    scale: F,
) -> Result<Vec<F>> {
    let tokens = check_logits(logits, num_experts)?;
    check_csr(token_offsets, expert_ids, tokens, num_experts)?;
    if grad_weights.len() != expert_ids.len() {
        return Err(RouterError::Shape(format!(
            "grad_weights has {} entries, expected one per routed pair ({})",
            grad_weights.len(),
            expert_ids.len()
        )));
    }
    let eps = F::from(1e-20).unwrap_or(F::zero());
    let mut grad = vec![F::zero(); logits.len()];
    grad.par_chunks_mut(num_experts)
        .zip(logits.par_chunks(num_experts))
        .enumerate()
        .with_min_len(TOKENS_PER_TASK)
        .for_each(|(t, (gz, row))| {
            let pairs = token_offsets[t] as usize..token_offsets[t + 1] as usize;
            let ids = &expert_ids[pairs.clone()];
            let g: Vec<F> = grad_weights[pairs].iter().map(|&g| g * scale).collect();
            match scoring {
                Scoring::Softmax => {
                    let (max, sum) = softmax_stats(row);
                    let prob = |e: usize| F::exp_nonpositive(row[e] - max) / sum;
                    if renormalize {
                        // The renormalised weights are a softmax over the selected logits only.
                        let sel = ids.iter().fold(F::zero(), |s, &e| s + prob(e as usize));
                        let w: Vec<F> = ids.iter().map(|&e| prob(e as usize) / sel).collect();
                        let dot = g.iter().zip(&w).fold(F::zero(), |s, (&g, &w)| s + g * w);
                        for ((&e, &w), &g) in ids.iter().zip(&w).zip(&g) {
                            gz[e as usize] = w * (g - dot);
                        }
                    } else {
                        let dot = ids
                            .iter()
                            .zip(&g)
                            .fold(F::zero(), |s, (&e, &g)| s + g * prob(e as usize));
                        for (e, gz) in gz.iter_mut().enumerate() {
                            *gz = -prob(e) * dot;
                        }
                        for (&e, &g) in ids.iter().zip(&g) {
                            let e = e as usize;
                            gz[e] = gz[e] + prob(e) * g;
                        }
                    }
                }
                Scoring::Sigmoid => {
                    let s: Vec<F> = ids.iter().map(|&e| sigmoid(row[e as usize])).collect();
                    let ds: Vec<F> = if renormalize {
                        let denom = s.iter().fold(F::zero(), |a, &s| a + s) + eps;
                        let dot = g.iter().zip(&s).fold(F::zero(), |a, (&g, &s)| a + g * s / denom);
                        g.iter().map(|&g| (g - dot) / denom).collect()
                    } else {
                        g
                    };
                    for ((&e, &s), &ds) in ids.iter().zip(&s).zip(&ds) {
                        gz[e as usize] = ds * s * (F::one() - s);
                    }
                }
            }
        });
    Ok(grad)
}

/// Checks that a CSR is well formed for `tokens` rows and `num_experts` experts.
fn check_csr(token_offsets: &[i64], expert_ids: &[i64], tokens: usize, num_experts: usize) -> Result<()> {
    if token_offsets.len() != tokens + 1 {
        return Err(RouterError::Shape(format!(
            "token_offsets has {} entries, expected tokens + 1 = {}",
            token_offsets.len(),
            tokens + 1
        )));
    }
    if token_offsets[0] != 0
        || token_offsets.windows(2).any(|w| w[0] > w[1])
        || token_offsets[tokens] as usize != expert_ids.len()
    {
        return Err(RouterError::Value(format!(
            "token_offsets must rise from 0 to the number of pairs ({})",
            expert_ids.len()
        )));
    }
    if let Some(&e) = expert_ids.iter().find(|&&e| e < 0 || e as usize >= num_experts) {
        return Err(RouterError::Value(format!("expert id {e} is outside 0..{num_experts}")));
    }
    for w in token_offsets.windows(2) {
        let ids = &expert_ids[w[0] as usize..w[1] as usize];
        for (i, e) in ids.iter().enumerate() {
            if ids[..i].contains(e) {
                return Err(RouterError::Value(format!("expert {e} appears twice for one token")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
