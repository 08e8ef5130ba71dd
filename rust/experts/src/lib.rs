//! SwiGLU experts over an expert-sorted token buffer, forward and backward, in float32.
//!
//! [`swiglu_forward`] splits each expert's rows into blocks of 64 and runs every block
//! as one task that streams the expert's weight rows past it: each pass computes a tile of up to
//! 4 tokens by 4 weight rows as dot products along the contiguous `hidden` (or `intermediate`)
//! axis, keeps those 4 weight rows in L1 for every tile of tokens, and applies SwiGLU between the
//! two products without leaving the task. With a handful of tokens per expert (serving batches)
//! this reads the weights once, where BLAS libraries tuned for large blocks run well below that
//! floor; with many, the block's rows stay in L2 while the weights stream. [`swiglu_backward`]
//! runs one task per expert with a broadcast-A GEMM kernel. Each output element is computed in a
//! fixed order, so results are bitwise the same whatever the thread count.
#![deny(missing_docs)]

use rayon::prelude::*;

mod dot;
mod gemm;

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

/// Checks `experts + 1` offsets rising from 0 and returns the number of rows.
fn check_offsets(expert_offsets: &[i64], experts: usize) -> Result<usize> {
    if expert_offsets.len() != experts + 1 {
        return Err(ExpertsError::Shape(format!(
            "expert_offsets has {} entries, expected experts + 1 = {}",
            expert_offsets.len(),
            experts + 1
        )));
    }
    if expert_offsets[0] != 0 || expert_offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(ExpertsError::Offsets("expert_offsets must rise from 0".into()));
    }
    Ok(expert_offsets[experts] as usize)
}

/// The experts whose segment holds 1 to `max_rows` rows, with their row ranges.
fn experts_within(expert_offsets: &[i64], max_rows: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    expert_offsets.windows(2).enumerate().filter_map(move |(e, w)| {
        let (s, t) = (w[0] as usize, w[1] as usize);
        (t > s && t - s <= max_rows).then_some((e, s, t))
    })
}

/// Zeroes the rows of the experts with 1 to `max_rows` rows; returns how many experts that was.
fn zero_rows(m: &mut [f32], width: usize, expert_offsets: &[i64], max_rows: usize) -> usize {
    experts_within(expert_offsets, max_rows)
        .map(|(_, s, t)| m[s * width..t * width].fill(0.0))
        .count()
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
    let rows = check_offsets(expert_offsets, experts)?;
    check_len("buf", buf.len(), rows * hidden)?;
    check_len("out", out.len(), rows * hidden)?;
    check_len("gate_up", gate_up.len(), experts * 2 * intermediate * hidden)?;
    check_len("down", down.len(), experts * hidden * intermediate)?;
    if let Some(h) = &h {
        check_len("h", h.len(), rows * 2 * intermediate)?;
    }
    if hidden == 0 || intermediate == 0 {
        // Empty products: the output rows are sums of nothing.
        return Ok(zero_rows(out, hidden, expert_offsets, max_rows));
    }

    // Tasks over blocks of the experts' rows, each owning its rows of `out` and `h`.
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
    let rows_run: usize = tasks.iter().map(|t| t.x.len() / hidden).sum();
    run_tasks(
        tasks,
        rows_run * 3 * hidden * intermediate,
        |task, act: &mut Vec<f32>| task.run(dims, dot, act),
    );
    Ok(done)
}

/// Gradients of [`swiglu_forward`] for the experts whose segment holds 1 to `max_rows` rows,
/// from `h`, the pre-activations the forward saved: writes those experts' rows of `grad_buf`
/// and their whole slices of `grad_gate_up` and `grad_down`, and leaves everything else
/// untouched. Shapes as in [`swiglu_forward`], with `grad_out` like `out`, `grad_buf` like
/// `buf`, and the weight gradients like the weights. Returns how many experts ran.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_backward(
    grad_out: &[f32],
    buf: &[f32],
    gate_up: &[f32],
    down: &[f32],
    h: &[f32],
    dims: Dims,
    expert_offsets: &[i64],
    max_rows: usize,
    grad_buf: &mut [f32],
    grad_gate_up: &mut [f32],
    grad_down: &mut [f32],
) -> Result<usize> {
    let Dims {
        hidden,
        intermediate,
        experts,
    } = dims;
    let rows = check_offsets(expert_offsets, experts)?;
    for (what, len, want) in [
        ("grad_out", grad_out.len(), rows * hidden),
        ("buf", buf.len(), rows * hidden),
        ("grad_buf", grad_buf.len(), rows * hidden),
        ("h", h.len(), rows * 2 * intermediate),
        ("gate_up", gate_up.len(), experts * 2 * intermediate * hidden),
        ("grad_gate_up", grad_gate_up.len(), experts * 2 * intermediate * hidden),
        ("down", down.len(), experts * hidden * intermediate),
        ("grad_down", grad_down.len(), experts * hidden * intermediate),
    ] {
        check_len(what, len, want)?;
    }
    if hidden == 0 || intermediate == 0 {
        // The output is identically zero, so is the input's gradient; the weights are empty.
        return Ok(zero_rows(grad_buf, hidden, expert_offsets, max_rows));
    }
    let (gu_size, d_size) = (2 * intermediate * hidden, hidden * intermediate);
    let mut tasks = Vec::new();
    let mut grad_buf_rest = grad_buf;
    let weight_grads = grad_gate_up.chunks_mut(gu_size).zip(grad_down.chunks_mut(d_size));
    for (e, (grad_gu, grad_d)) in weight_grads.enumerate() {
        let (s, t) = (expert_offsets[e] as usize, expert_offsets[e + 1] as usize);
        let (seg, rest) = grad_buf_rest.split_at_mut((t - s) * hidden);
        grad_buf_rest = rest;
        if t == s || t - s > max_rows {
            continue;
        }
        tasks.push(ExpertGrad {
            grad_out: &grad_out[s * hidden..t * hidden],
            x: &buf[s * hidden..t * hidden],
            h: &h[s * 2 * intermediate..t * 2 * intermediate],
            wgu: &gate_up[e * gu_size..(e + 1) * gu_size],
            wd: &down[e * d_size..(e + 1) * d_size],
            grad_x: seg,
            grad_wgu: grad_gu,
            grad_wd: grad_d,
        });
    }
    let done = tasks.len();
    let gemm = gemm::best();
    let rows_run: usize = tasks.iter().map(|t| t.x.len() / hidden).sum();
    run_tasks(
        tasks,
        rows_run * 6 * hidden * intermediate,
        |task, scratch: &mut GradScratch| task.run(dims, gemm, scratch),
    );
    Ok(done)
}

/// One expert's rows, saved pre-activations, weights and the gradients it owns.
struct ExpertGrad<'a> {
    grad_out: &'a [f32],
    x: &'a [f32],
    h: &'a [f32],
    wgu: &'a [f32],
    wd: &'a [f32],
    grad_x: &'a mut [f32],
    grad_wgu: &'a mut [f32],
    grad_wd: &'a mut [f32],
}

#[derive(Default)]
struct GradScratch {
    act: Vec<f32>,
    grad_act: Vec<f32>,
    grad_h: Vec<f32>,
}

impl ExpertGrad<'_> {
    fn run(self, dims: Dims, gemm: gemm::Gemm, scratch: &mut GradScratch) {
        use gemm::Strided;
        let (hd, f) = (dims.hidden, dims.intermediate);
        let n = self.x.len() / hd;
        let GradScratch { act, grad_act, grad_h } = scratch;
        for v in [&mut *act, &mut *grad_act] {
            v.clear();
            v.resize(n * f, 0.0);
        }
        grad_h.clear();
        grad_h.resize(n * 2 * f, 0.0);
        // grad_act = grad_out @ down
        gemm(
            Strided {
                data: self.grad_out,
                rs: hd,
                ks: 1,
            },
            self.wd,
            f,
            hd,
            grad_act,
            f,
            n,
            f,
        );
        for m in 0..n {
            for j in 0..f {
                let (g, u) = (self.h[m * 2 * f + j], self.h[m * 2 * f + f + j]);
                let sig = 1.0 / (1.0 + (-g).exp());
                let silu = g * sig;
                let ga = grad_act[m * f + j];
                act[m * f + j] = silu * u;
                grad_h[m * 2 * f + j] = ga * u * sig * (1.0 + g * (1.0 - sig));
                grad_h[m * 2 * f + f + j] = ga * silu;
            }
        }
        // grad_down = grad_out^T @ act
        gemm(
            Strided {
                data: self.grad_out,
                rs: 1,
                ks: hd,
            },
            act,
            f,
            n,
            self.grad_wd,
            f,
            hd,
            f,
        );
        // grad_x = grad_h @ gate_up
        gemm(
            Strided {
                data: grad_h,
                rs: 2 * f,
                ks: 1,
            },
            self.wgu,
            hd,
            2 * f,
            self.grad_x,
            hd,
            n,
            hd,
        );
        // grad_gate_up = grad_h^T @ x
        gemm(
            Strided {
                data: grad_h,
                rs: 1,
                ks: 2 * f,
            },
            self.x,
            hd,
            n,
            self.grad_wgu,
            hd,
            2 * f,
            hd,
        );
    }
}

/// Multiply-adds below which a call runs on the calling thread: tens of microseconds, about
/// what handing tasks to the thread pool (and waking it) costs.
const SERIAL_MACS: usize = 1 << 21;

/// Runs every task with a reused scratch `S`: on the calling thread when they hold fewer than
/// [`SERIAL_MACS`] multiply-adds in all, else on the thread pool.
fn run_tasks<T: Send, S: Default>(tasks: Vec<T>, macs: usize, run: impl Fn(T, &mut S) + Sync + Send) {
    if macs < SERIAL_MACS {
        let mut scratch = S::default();
        tasks.into_iter().for_each(|task| run(task, &mut scratch));
    } else {
        tasks
            .into_par_iter()
            .for_each_init(S::default, |scratch, task| run(task, scratch));
    }
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
