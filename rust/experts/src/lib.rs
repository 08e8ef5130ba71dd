//! SwiGLU experts over an expert-sorted token buffer, for the small segments of serving batches.
//!
//! With a handful of tokens per expert, an expert's two products are skinny: a few rows against
//! a weight matrix of `3 * hidden * intermediate` floats, so their cost is reading the weights
//! once. BLAS libraries tuned for large blocks pack the weights and run well below that floor
//! there. [`swiglu_forward`] instead runs every small expert as one task that streams its weight
//! rows once: each pass computes a tile of up to 4 tokens by 4 weight rows as dot products along
//! the contiguous `hidden` (or `intermediate`) axis, keeps those 4 weight rows in L1 for every
//! tile of tokens, and applies SwiGLU between the two products without leaving the task.
//! Each output element is one dot product in a fixed order, so results are bitwise the same
//! whatever the thread count.
#![deny(missing_docs)]

use rayon::prelude::*;

mod dot;

/// Why the experts could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpertsError {
    /// Lengths disagree with the shapes.
    #[error("{0}")]
    Shape(String),
    /// The expert offsets do not rise from 0 to the number of rows.
    #[error("{0}")]
    Offsets(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ExpertsError>;

/// Shapes of a stack of SwiGLU experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Width of a token row (`H`).
    pub hidden: usize,
    /// Width of an expert's hidden layer (`F`).
    pub intermediate: usize,
    /// Number of experts (`E`).
    pub experts: usize,
}

fn check_len(what: &str, len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(ExpertsError::Shape(format!(
            "{what} has {len} elements, expected {want}"
        )));
    }
    Ok(())
}

/// Runs the SwiGLU experts whose segment holds between 1 and `max_rows` rows, and leaves the
/// rows of every other expert untouched (a caller runs large segments with a blocked GEMM).
///
/// Row-major layouts: `buf` `[N, H]` expert-sorted token rows, expert `e` owning rows
/// `expert_offsets[e]..expert_offsets[e + 1]`; `gate_up` `[E, 2F, H]` (gate rows first, then
/// up rows); `down` `[E, H, F]`; `out` `[N, H]`; `h`, when given, `[N, 2F]` receives the gate
/// and up pre-activations the backward pass needs. For a row `x` of expert `e`:
/// `out = down[e] @ (silu(gate[e] @ x) * (up[e] @ x))`. Returns how many experts ran.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_forward(
    buf: &[f32],
    gate_up: &[f32],
    down: &[f32],
    dims: Dims,
    expert_offsets: &[i64],
    max_rows: usize,
    out: &mut [f32],
    h: Option<&mut [f32]>,
) -> Result<usize> {
    let Dims {
        hidden,
        intermediate,
        experts,
    } = dims;
    if expert_offsets.len() != experts + 1 {
        return Err(ExpertsError::Shape(format!(
            "expert_offsets has {} entries, expected experts + 1 = {}",
            expert_offsets.len(),
            experts + 1
        )));
    }
    let rows = *expert_offsets.last().unwrap_or(&0);
    if expert_offsets[0] != 0 || expert_offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(ExpertsError::Offsets("expert_offsets must rise from 0".into()));
    }
    let rows = rows as usize;
    check_len("buf", buf.len(), rows * hidden)?;
    check_len("out", out.len(), rows * hidden)?;
    check_len("gate_up", gate_up.len(), experts * 2 * intermediate * hidden)?;
    check_len("down", down.len(), experts * hidden * intermediate)?;
    if let Some(h) = &h {
        check_len("h", h.len(), rows * 2 * intermediate)?;
    }
    if hidden == 0 || intermediate == 0 {
        // Empty products: the output rows are sums of nothing.
        for e in 0..experts {
            let (s, t) = (expert_offsets[e] as usize, expert_offsets[e + 1] as usize);
            if t > s && t - s <= max_rows {
                out[s * hidden..t * hidden].fill(0.0);
            }
        }
        return Ok(0);
    }

    // Tasks over blocks of the small experts' rows, each owning its rows of `out` and `h`.
    let mut tasks = Vec::new();
    let mut out_rest = out;
    let mut h_rest = h;
    let mut done = 0;
    for e in 0..experts {
        let (s, t) = (expert_offsets[e] as usize, expert_offsets[e + 1] as usize);
        let n = t - s;
        let (seg_out, rest) = out_rest.split_at_mut(n * hidden);
        out_rest = rest;
        let seg_h = match h_rest.take() {
            Some(hr) => {
                let (seg, rest) = hr.split_at_mut(n * 2 * intermediate);
                h_rest = Some(rest);
                Some(seg)
            }
            None => None,
        };
        if n == 0 || n > max_rows {
            continue;
        }
        let wgu = &gate_up[e * 2 * intermediate * hidden..(e + 1) * 2 * intermediate * hidden];
        let wd = &down[e * hidden * intermediate..(e + 1) * hidden * intermediate];
        let x = &buf[s * hidden..t * hidden];
        // One task per block of rows: the block's rows stay in L2 while the expert's weights
        // stream past them, and a large segment still spreads over the threads.
        let out_blocks = seg_out.chunks_mut(ROW_BLOCK * hidden);
        let mut h_blocks = seg_h.map(|h| h.chunks_mut(ROW_BLOCK * 2 * intermediate));
        for (x, out) in x.chunks(ROW_BLOCK * hidden).zip(out_blocks) {
            let h = h_blocks.as_mut().and_then(|b| b.next());
            tasks.push(Expert { x, wgu, wd, out, h });
        }
        done += 1;
    }
    let dot = dot::best();
    tasks
        .into_par_iter()
        .for_each_init(Vec::new, |act, task| task.run(dims, dot, act));
    Ok(done)
}

/// Rows per task: 64 rows of a 1024-wide hidden state are 256 KiB, which stay in L2.
const ROW_BLOCK: usize = 64;

/// A block of one expert's rows, and the expert's weights.
struct Expert<'a> {
    x: &'a [f32],
    wgu: &'a [f32],
    wd: &'a [f32],
    out: &'a mut [f32],
    h: Option<&'a mut [f32]>,
}

/// Up to 4 consecutive rows `first..first + count` of a row-major matrix; missing rows repeat
/// the last one (their results are computed and dropped: simpler than edge kernels).
fn rows4(m: &[f32], width: usize, first: usize, count: usize) -> [&[f32]; 4] {
    std::array::from_fn(|i| {
        let r = first + i.min(count - 1);
        &m[r * width..(r + 1) * width]
    })
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

impl Expert<'_> {
    fn run(self, dims: Dims, dot: dot::Dot, act: &mut Vec<f32>) {
        let (hd, f) = (dims.hidden, dims.intermediate);
        let n = self.x.len() / hd;
        act.clear();
        act.resize(n * f, 0.0);
        let mut h = self.h;
        // Gate/up: 2 gate rows and their 2 up rows per pass, so SwiGLU completes in the tile.
        for j in (0..f).step_by(2) {
            let pair = (f - j).min(2);
            let g1 = j + pair - 1;
            let w = [
                &self.wgu[j * hd..(j + 1) * hd],
                &self.wgu[g1 * hd..(g1 + 1) * hd],
                &self.wgu[(f + j) * hd..(f + j + 1) * hd],
                &self.wgu[(f + g1) * hd..(f + g1 + 1) * hd],
            ];
            for m0 in (0..n).step_by(4) {
                let count = (n - m0).min(4);
                let tile = dot(&rows4(self.x, hd, m0, count), &w);
                for (i, r) in tile.iter().enumerate().take(count) {
                    let m = m0 + i;
                    for c in 0..pair {
                        let (g, u) = (r[c], r[2 + c]);
                        act[m * f + j + c] = silu(g) * u;
                        if let Some(h) = h.as_deref_mut() {
                            h[m * 2 * f + j + c] = g;
                            h[m * 2 * f + f + j + c] = u;
                        }
                    }
                }
            }
        }
        // Down: 4 output columns per pass.
        for c0 in (0..hd).step_by(4) {
            let cols = (hd - c0).min(4);
            let w = rows4(self.wd, f, c0, cols);
            for m0 in (0..n).step_by(4) {
                let count = (n - m0).min(4);
                let tile = dot(&rows4(act, f, m0, count), &w);
                for (i, r) in tile.iter().enumerate().take(count) {
                    let row = &mut self.out[(m0 + i) * hd + c0..(m0 + i) * hd + c0 + cols];
                    row.copy_from_slice(&r[..cols]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
