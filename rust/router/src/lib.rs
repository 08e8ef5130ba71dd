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

    /// Writes the indices of the `ids.len()` best entries of `row` to `ids` in routing order:
    /// descending value, ties to the lower index. `row` holds no NaN and at least `ids.len()`
    /// entries above `-inf`; `values` and `keys` are scratch of `row.len()` entries.
    #[inline(always)]
    fn best_into(row: &[Self], values: &mut [Self], _keys: &mut [i64], ids: &mut [i64]) {
        best_by_argmax(row, values, ids);
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

    /// Packs each entry into one `i64` key, the value's order-preserving bits above the
    /// reversed index, so that keys are distinct and their order is the routing order. Each
    /// next best is then one masked integer-max pass below the previous key: no float
    /// compares, no index tracking and no writes between passes.
    #[inline(always)]
    fn best_into(row: &[f32], _values: &mut [f32], keys: &mut [i64], ids: &mut [i64]) {
        let last = row.len() as i64 - 1;
        for (i, (key, &v)) in keys.iter_mut().zip(row).enumerate() {
            let bits = (v + 0.0).to_bits() as i32; // + 0.0 turns -0.0 into +0.0: they tie
            let ordered = bits ^ (((bits >> 31) as u32) >> 1) as i32; // negatives: flip magnitude
            *key = ((ordered as i64) << 32) | (last - i as i64);
        }
        best_keys(keys, last, ids);
    }
}

/// Writes `last - (low 32 bits)` of the `ids.len()` largest `keys` to `ids`, largest first:
/// one masked integer-max pass below the previous key per pick. Uses the AVX-512 form where
/// the CPU has it.
#[inline(always)]
fn best_keys(keys: &[i64], last: i64, ids: &mut [i64]) {
    #[cfg(target_arch = "x86_64")]
    if isa_cap() >= IsaCap::Avx512 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected on this CPU just above.
        unsafe { avx512::best_keys(keys, last, ids) };
        return;
    }
    best_keys_portable(keys, last, ids);
}

/// The portable form of [`best_keys`].
#[inline(always)]
fn best_keys_portable(keys: &[i64], last: i64, ids: &mut [i64]) {
    let mut prev = i64::MAX;
    for id in ids {
        let mut lanes = [i64::MIN; KEY_LANES];
        let chunks = keys.chunks_exact(KEY_LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..KEY_LANES {
                let k = if c[i] < prev { c[i] } else { i64::MIN };
                lanes[i] = lanes[i].max(k);
            }
        }
        let below = tail.iter().copied().filter(|&k| k < prev);
        prev = below.chain(lanes).fold(i64::MIN, i64::max);
        *id = last - (prev & 0xffff_ffff);
    }
}

/// AVX-512 form of [`best_keys`]: the autovectorised loop keeps its lanes in memory; here
/// each pass is a compare and a masked max per register.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::best_keys`] in AVX-512 instructions.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn best_keys(keys: &[i64], last: i64, ids: &mut [i64]) {
        let chunks = keys.chunks_exact(8);
        let tail = chunks.remainder();
        let full = keys.len() / 8;
        let tail_mask: __mmask8 = (1u16 << tail.len()) as u8 - 1;
        let mut prev = _mm512_set1_epi64(i64::MAX);
        for id in ids {
            let mut best = _mm512_set1_epi64(i64::MIN);
            for c in 0..full {
                // SAFETY: chunk `c` holds 8 keys.
                let k = unsafe { _mm512_loadu_epi64(keys.as_ptr().add(8 * c)) };
                best = _mm512_mask_max_epi64(best, _mm512_cmplt_epi64_mask(k, prev), best, k);
            }
            if !tail.is_empty() {
                // SAFETY: the mask limits the load to the tail's keys.
                let k = unsafe { _mm512_maskz_loadu_epi64(tail_mask, tail.as_ptr()) };
                let below = _mm512_cmplt_epi64_mask(k, prev) & tail_mask;
                best = _mm512_mask_max_epi64(best, below, best, k);
            }
            let key = _mm512_reduce_max_epi64(best);
            prev = _mm512_set1_epi64(key);
            *id = last - (key & 0xffff_ffff);
        }
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
    if num_experts > u32::MAX as usize {
        // Selection packs an expert index into 32 bits.
        return Err(RouterError::Shape(format!(
            "at most {} experts, got {num_experts}",
            u32::MAX
        )));
    }
    if !logits.len().is_multiple_of(num_experts) {
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

/// Sixteen fixed partial lanes (one AVX-512 register of f32): lets the row loops vectorise,
/// and the order never changes.
const LANES: usize = 16;

/// Lanes of the `i64` key passes of [`Real::best_into`]: eight fill one AVX-512 register.
const KEY_LANES: usize = 8;

/// Index and value of the largest element of `row`, ties to the lower index. Two simple
/// passes (the maximum, then the first position holding it) vectorise where one fused
/// compare-and-track pass does not. `row` must hold no NaN.
#[inline(always)]
fn argmax<F: Real>(row: &[F]) -> (usize, F) {
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
    for (c, chunk) in row.chunks_exact(LANES).enumerate() {
        let mut hits = 0u32;
        for (i, &v) in chunk.iter().enumerate() {
            hits |= ((v == max) as u32) << i;
        }
        if hits != 0 {
            return (c * LANES + hits.trailing_zeros() as usize, max);
        }
    }
    let base = row.len() - tail.len();
    let at = tail.iter().position(|&v| v == max).map_or(0, |j| base + j);
    (at, max)
}

/// Writes the indices of the `ids.len()` best entries of `row` to `ids` in routing order
/// (descending value, ties to the lower index), by repeated [`argmax`] on a copy in `scratch`
/// whose taken entries become `-inf`. `row` must hold no NaN and at least `ids.len()` entries
/// above `-inf`. The generic path of [`Real::best_into`].
#[inline(always)]
fn best_by_argmax<F: Real>(row: &[F], scratch: &mut [F], ids: &mut [i64]) {
    scratch.copy_from_slice(row);
    for id in ids {
        let e = argmax(scratch).0;
        scratch[e] = F::neg_infinity();
        *id = e as i64;
    }
}

/// `sum_e exp(z_e - max)`: the softmax denominator of a row whose largest logit is `max`.
#[inline(always)]
fn exp_sum<F: Real>(row: &[F], max: F) -> F {
    let mut sums = [F::zero(); LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            sums[i] = sums[i] + F::exp_nonpositive(c[i] - max);
        }
    }
    let sum = tail.iter().fold(F::zero(), |s, &z| s + F::exp_nonpositive(z - max));
    sums.iter().fold(sum, |s, &v| s + v)
}

/// Softmax of one row: `(max, sum of exp(z - max))`, so `p_e = exp(z_e - max) / sum`.
#[inline(always)]
fn softmax_stats<F: Real>(row: &[F]) -> (F, F) {
    let max = argmax(row).1;
    (max, exp_sum(row, max))
}

#[inline(always)]
fn sigmoid<F: Real>(z: F) -> F {
    F::one() / (F::one() + (-z).exp())
}

/// The widest instruction set the kernels may use, capped by the environment variable
/// `DEEPSEEK_RS_CPU_ISA` (`avx512`, `avx2` or `generic`), as `ONEDNN_MAX_CPU_ISA` caps oneDNN's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsaCap {
    /// Portable code only.
    Generic,
    /// Up to AVX2.
    Avx2,
    /// Up to AVX-512 (no cap).
    Avx512,
}

impl IsaCap {
    /// The cap a value of `DEEPSEEK_RS_CPU_ISA` names: `Avx512` (no cap) when it is unset, empty
    /// or unknown (the Python side validates the variable and reports a bad value).
    pub fn from_env_value(value: Option<&str>) -> IsaCap {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("avx2") => IsaCap::Avx2,
            Some("generic") => IsaCap::Generic,
            _ => IsaCap::Avx512,
        }
    }
}

/// The cap of this process, read from `DEEPSEEK_RS_CPU_ISA` once (the first time a kernel runs).
/// Results are bitwise the same under every cap; only the speed differs.
pub fn isa_cap() -> IsaCap {
    static CAP: std::sync::OnceLock<IsaCap> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| IsaCap::from_env_value(std::env::var("DEEPSEEK_RS_CPU_ISA").ok().as_deref()))
}

/// A loop over token rows, run through [`with_best_isa`]. `run` must be `#[inline(always)]`
/// (and so must everything it calls) so that it is compiled with the detected extension:
/// closures are not inlined into `#[target_feature]` functions, trait methods are.
trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `kernel` compiled for the widest vector extension this CPU has. The code is the same
/// on every path and Rust never fuses or reorders float operations, so results are bitwise
/// identical whichever path runs; only the speed differs.
fn with_best_isa<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        fn avx512<K: Kernel>(kernel: K) -> K::Output {
            kernel.run()
        }
        #[target_feature(enable = "avx2")]
        fn avx2<K: Kernel>(kernel: K) -> K::Output {
            kernel.run()
        }
        if isa_cap() >= IsaCap::Avx512
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the features were detected on this CPU just above.
            return unsafe { avx512(kernel) };
        }
        if isa_cap() >= IsaCap::Avx2 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { avx2(kernel) };
        }
    }
    kernel.run()
}

/// Working memory of the selection loops, `num_experts` entries each, reused across tokens.
struct Scratch<F> {
    choice: Vec<F>,
    values: Vec<F>,
    keys: Vec<i64>,
}

impl<F: Real> Scratch<F> {
    fn new(num_experts: usize) -> Self {
        Scratch {
            choice: vec![F::zero(); num_experts],
            values: vec![F::zero(); num_experts],
            keys: vec![0; num_experts],
        }
    }

    /// [`Real::best_into`] with this scratch.
    #[inline(always)]
    fn best_into(&mut self, row: &[F], ids: &mut [i64]) {
        F::best_into(row, &mut self.values, &mut self.keys, ids);
    }
}

/// Per-token selection rule: fills `ids` and `weights` for one logit row and returns how many
/// pairs it wrote (at most `ids.len()`).
trait Select<F>: Sync {
    fn select(&self, row: &[F], scratch: &mut Scratch<F>, ids: &mut [i64], weights: &mut [F]) -> usize;
}

/// One parallel task: routes `rows` (the tokens from `first_token` on) with `rule`, packing
/// each token's pairs from the front of `ids` and `weights`.
struct Task<'a, F, S> {
    rows: &'a [F],
    first_token: usize,
    num_experts: usize,
    width: usize,
    rule: &'a S,
    ids: &'a mut [i64],
    weights: &'a mut [F],
}

/// What a [`Task`] wrote: pairs per token and pairs per expert.
struct TaskOut {
    per_token: Vec<i64>,
    expert_counts: Vec<i64>,
}

impl<F: Real, S: Select<F>> Kernel for Task<'_, F, S> {
    type Output = Result<TaskOut>;

    #[inline(always)]
    fn run(self) -> Result<TaskOut> {
        let mut out = TaskOut {
            per_token: Vec::with_capacity(TOKENS_PER_TASK),
            expert_counts: vec![0; self.num_experts],
        };
        let mut scratch = Scratch::new(self.num_experts);
        let mut written = 0;
        for (i, row) in self.rows.chunks_exact(self.num_experts).enumerate() {
            check_finite(row, self.first_token + i)?;
            let room = written..written + self.width;
            let n = self
                .rule
                .select(row, &mut scratch, &mut self.ids[room.clone()], &mut self.weights[room]);
            for &e in &self.ids[written..written + n] {
                out.expert_counts[e as usize] += 1;
            }
            out.per_token.push(n as i64);
            written += n;
        }
        Ok(out)
    }
}

/// Routes every token row in fixed-size parallel tasks and assembles the CSR. Each task
/// writes into its own `width` slots per token; a rule that may pick fewer than `width`
/// experts is compacted afterwards.
fn route_rows<F: Real, S: Select<F>>(logits: &[F], num_experts: usize, width: usize, rule: S) -> Result<Routing<F>> {
    let tokens = check_logits(logits, num_experts)?;
    let task_pairs = TOKENS_PER_TASK * width;
    let mut expert_ids = vec![0i64; tokens * width];
    let mut weights = vec![F::zero(); tokens * width];
    let outs: Vec<Result<TaskOut>> = logits
        .par_chunks(TOKENS_PER_TASK * num_experts)
        .zip(expert_ids.par_chunks_mut(task_pairs))
        .zip(weights.par_chunks_mut(task_pairs))
        .enumerate()
        .map(|(task, ((rows, ids), weights))| {
            with_best_isa(Task {
                rows,
                first_token: task * TOKENS_PER_TASK,
                num_experts,
                width,
                rule: &rule,
                ids,
                weights,
            })
        })
        .collect();
    let mut token_offsets = Vec::with_capacity(tokens + 1);
    token_offsets.push(0i64);
    let mut expert_counts = vec![0i64; num_experts];
    for (task, out) in outs.into_iter().enumerate() {
        // The first error in token order wins, whatever order the tasks finished in.
        let out = out?;
        let (start, end) = (token_offsets[token_offsets.len() - 1] as usize, task * task_pairs);
        let written = out.per_token.iter().sum::<i64>() as usize;
        if start != end {
            expert_ids.copy_within(end..end + written, start);
            weights.copy_within(end..end + written, start);
        }
        for n in out.per_token {
            token_offsets.push(token_offsets[token_offsets.len() - 1] + n);
        }
        for (total, n) in expert_counts.iter_mut().zip(out.expert_counts) {
            *total += n;
        }
    }
    let pairs = token_offsets[tokens] as usize;
    expert_ids.truncate(pairs);
    weights.truncate(pairs);
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

struct TopK {
    k: usize,
    renormalize: bool,
}

impl<F: Real> Select<F> for TopK {
    #[inline(always)]
    fn select(&self, row: &[F], scratch: &mut Scratch<F>, ids: &mut [i64], ws: &mut [F]) -> usize {
        // Softmax is monotone, so selecting on the logits is exact and skips E divisions.
        scratch.best_into(row, &mut ids[..self.k]);
        let max = row[ids[0] as usize];
        let sum = exp_sum(row, max);
        for (w, &e) in ws.iter_mut().zip(ids.iter()) {
            *w = F::exp_nonpositive(row[e as usize] - max) / sum;
        }
        if self.renormalize {
            renormalize_in_place(&mut ws[..self.k], F::zero());
        }
        self.k
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
    route_rows(logits, num_experts, k, TopK { k, renormalize })
}

struct TopP {
    p: f64,
    min_k: usize,
    max_k: usize,
    renormalize: bool,
}

impl<F: Real> Select<F> for TopP {
    #[inline(always)]
    fn select(&self, row: &[F], scratch: &mut Scratch<F>, ids: &mut [i64], ws: &mut [F]) -> usize {
        // All `max_k` candidates at once: a few passes more than needed for some tokens, but
        // no data-dependent branch inside the vector loops.
        scratch.best_into(row, &mut ids[..self.max_k]);
        let max = row[ids[0] as usize];
        let sum = exp_sum(row, max);
        // The mass is accumulated in f64 so the stopping point does not drift with F.
        let mut mass = 0.0f64;
        let mut keep = 0;
        while keep < self.max_k && !(keep >= self.min_k && mass >= self.p) {
            let prob = F::exp_nonpositive(row[ids[keep] as usize] - max) / sum;
            mass += prob.to_f64().unwrap_or(0.0);
            ws[keep] = prob;
            keep += 1;
        }
        if self.renormalize {
            renormalize_in_place(&mut ws[..keep], F::zero());
        }
        keep
    }
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
    let rule = TopP {
        p,
        min_k,
        max_k,
        renormalize,
    };
    route_rows(logits, num_experts, max_k, rule)
}

struct Grouped<'a, F> {
    bias: &'a [F],
    rule: GroupLimited,
    eps: F,
}

impl<F: Real> Select<F> for Grouped<'_, F> {
    #[inline(always)]
    fn select(&self, row: &[F], scratch: &mut Scratch<F>, ids: &mut [i64], ws: &mut [F]) -> usize {
        let GroupLimited {
            top_k,
            n_group,
            topk_group,
            renormalize,
        } = self.rule;
        let group_size = row.len() / n_group;
        let mut choice = std::mem::take(&mut scratch.choice);
        for ((c, &z), &b) in choice.iter_mut().zip(row).zip(self.bias) {
            *c = sigmoid(z) + b;
        }
        // A group scores the sum of its two best choice scores (its one score if it has one).
        // Routing never has more than a few dozen groups, so the scores fit on the stack.
        let mut group_scores = [F::neg_infinity(); MAX_GROUPS];
        let group_scores = &mut group_scores[..n_group];
        for (score, g) in group_scores.iter_mut().zip(choice.chunks_exact(group_size)) {
            let (mut first, mut second) = (F::neg_infinity(), F::neg_infinity());
            for &v in g {
                if v > first {
                    (first, second) = (v, first);
                } else if v > second {
                    second = v;
                }
            }
            *score = if group_size == 1 { first } else { first + second };
        }
        // Experts of the groups not among the best `topk_group` are taken out of the running.
        let mut chosen = [false; MAX_GROUPS];
        for _ in 0..topk_group {
            let g = argmax(group_scores).0;
            group_scores[g] = F::neg_infinity();
            chosen[g] = true;
        }
        for (g, c) in choice.chunks_exact_mut(group_size).enumerate() {
            if !chosen[g] {
                c.fill(F::neg_infinity());
            }
        }
        scratch.best_into(&choice, &mut ids[..top_k]);
        scratch.choice = choice;
        for (w, &e) in ws.iter_mut().zip(ids.iter()) {
            *w = sigmoid(row[e as usize]);
        }
        if renormalize {
            renormalize_in_place(&mut ws[..top_k], self.eps);
        }
        top_k
    }
}

/// Most expert groups [`sigmoid_group_limited`] accepts (DeepSeek-V3 uses 8).
pub const MAX_GROUPS: usize = 256;

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
        ..
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
    if n_group == 0 || n_group > MAX_GROUPS || !num_experts.is_multiple_of(n_group) {
        return Err(RouterError::Value(format!(
            "n_group ({n_group}) must divide num_experts ({num_experts}) and be at most {MAX_GROUPS}"
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
    route_rows(logits, num_experts, top_k, Grouped { bias, rule, eps })
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
    let mut grad = vec![F::zero(); logits.len()];
    grad.par_chunks_mut(TOKENS_PER_TASK * num_experts)
        .zip(logits.par_chunks(TOKENS_PER_TASK * num_experts))
        .enumerate()
        .for_each(|(task, (grad, rows))| {
            with_best_isa(BackwardTask {
                rows,
                grad,
                first_token: task * TOKENS_PER_TASK,
                num_experts,
                token_offsets,
                expert_ids,
                grad_weights,
                scoring,
                renormalize,
                scale,
            })
        });
    Ok(grad)
}

/// One parallel task of [`route_backward`].
struct BackwardTask<'a, F> {
    rows: &'a [F],
    grad: &'a mut [F],
    first_token: usize,
    num_experts: usize,
    token_offsets: &'a [i64],
    expert_ids: &'a [i64],
    grad_weights: &'a [F],
    scoring: Scoring,
    renormalize: bool,
    scale: F,
}

impl<F: Real> Kernel for BackwardTask<'_, F> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let eps = F::from(1e-20).unwrap_or(F::zero());
        let rows = self
            .grad
            .chunks_exact_mut(self.num_experts)
            .zip(self.rows.chunks_exact(self.num_experts));
        for (i, (gz, row)) in rows.enumerate() {
            let t = self.first_token + i;
            let pairs = self.token_offsets[t] as usize..self.token_offsets[t + 1] as usize;
            let (ids, g) = (&self.expert_ids[pairs.clone()], &self.grad_weights[pairs]);
            token_backward(row, ids, g, gz, self.scoring, self.renormalize, self.scale, eps);
        }
    }
}

/// The logit gradient `gz` (zero on entry) of one token with selected experts `ids`, given
/// the gradient `g` of its weights; the math of [`route_backward`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn token_backward<F: Real>(
    row: &[F],
    ids: &[i64],
    g: &[F],
    gz: &mut [F],
    scoring: Scoring,
    renormalize: bool,
    scale: F,
    eps: F,
) {
    let pairs = || ids.iter().map(|&e| e as usize).zip(g.iter().map(|&g| g * scale));
    match scoring {
        Scoring::Softmax => {
            let (max, sum) = softmax_stats(row);
            let prob = |e: usize| F::exp_nonpositive(row[e] - max) / sum;
            if renormalize {
                // The renormalised weights w are a softmax over the selected logits only:
                // dz_e = w_e (g_e - sum_i g_i w_i).
                let sel = ids.iter().fold(F::zero(), |s, &e| s + prob(e as usize));
                let dot = pairs().fold(F::zero(), |s, (e, g)| s + g * (prob(e) / sel));
                for (e, g) in pairs() {
                    gz[e] = prob(e) / sel * (g - dot);
                }
            } else {
                // dz_e = p_e (g_e [e selected] - sum_i g_i p_i).
                let dot = pairs().fold(F::zero(), |s, (e, g)| s + g * prob(e));
                for (e, gz) in gz.iter_mut().enumerate() {
                    *gz = -prob(e) * dot;
                }
                for (e, g) in pairs() {
                    gz[e] = gz[e] + prob(e) * g;
                }
            }
        }
        Scoring::Sigmoid => {
            let s = |e: usize| sigmoid(row[e]);
            if renormalize {
                // w = s / (sum s + eps): ds_e = (g_e - sum_i g_i w_i) / denom.
                let denom = ids.iter().fold(F::zero(), |a, &e| a + s(e as usize)) + eps;
                let dot = pairs().fold(F::zero(), |a, (e, g)| a + g * s(e) / denom);
                for (e, g) in pairs() {
                    gz[e] = (g - dot) / denom * s(e) * (F::one() - s(e));
                }
            } else {
                for (e, g) in pairs() {
                    gz[e] = g * s(e) * (F::one() - s(e));
                }
            }
        }
    }
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
