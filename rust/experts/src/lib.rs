//! SwiGLU experts over an expert-sorted token buffer, forward and backward, and a bias-free
//! linear layer over rows, in float32, for one instruction-set tier chosen by the caller
//! ([`Isa`]: AVX-512, AVX2+FMA, NEON or generic; [`Isa::available`] lists this CPU's).
//!
//! Every product runs through one GEMM kernel per tier (broadcast-A micro-kernel over packed
//! panels of the weights, see `mm.rs`), grouped over the experts and split over the threads by
//! blocks of rows and columns. [`swiglu_forward`] runs `x @ gate_up^T`, SwiGLU, `@ down^T`;
//! [`swiglu_backward`] the four products of the gradients.
//!
//! # Batch invariance
//! Within one tier, every output element is a sum over the reduced axis in index order, one
//! multiply-add at a time, starting from zero (fused on the vector tiers, product then sum on
//! the generic one). It depends on its own row and the weights only: never on the other rows
//! of the call, the row count, the thread count, or the tile or block it falls in. So a row
//! of [`swiglu_forward`]'s `out` and `h`, of [`swiglu_backward`]'s `grad_buf`, and of
//! [`linear_rows`]'s `out` is bitwise the same whichever rows share its call (and its expert),
//! for every tier and every row count. The weight gradients sum over an expert's rows in row
//! order: deterministic, but by nature a function of the whole batch. Tiers differ from each
//! other in rounding only.
#![deny(missing_docs)]

use rayon::prelude::*;

mod isa;
mod mm;

pub use isa::Isa;
use mm::{Out, View};

/// Why the experts could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpertsError {
    /// Lengths disagree with the shapes.
    #[error("{0}")]
    Shape(String),
    /// The expert offsets do not rise from 0 to the number of rows.
    #[error("{0}")]
    Offsets(String),
    /// An unknown instruction-set tier, or one this CPU does not run.
    #[error("{0}")]
    Isa(String),
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
fn experts_within(expert_offsets: &[i64], max_rows: usize) -> Vec<(usize, usize, usize)> {
    expert_offsets
        .windows(2)
        .enumerate()
        .filter_map(move |(e, w)| {
            let (s, t) = (w[0] as usize, w[1] as usize);
            (t > s && t - s <= max_rows).then_some((e, s, t))
        })
        .collect()
}

fn check_len(what: &str, len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(ExpertsError::Shape(format!(
            "{what} has {len} elements, expected {want}"
        )));
    }
    Ok(())
}

/// One product of a grouped matmul: `out = a @ b`, `a` being `out.rows` by `k`.
struct Product<'a> {
    a: View<'a>,
    b: View<'a>,
    k: usize,
    out: Out<'a>,
}

/// Multiply-adds below which a call runs on the calling thread: tens of microseconds, about
/// what handing tasks to the thread pool (and waking it) costs.
const SERIAL_MACS: usize = 1 << 21;

/// Rows per task at most: the weights are packed once per task, so a task's rows share them.
const ROW_CHUNK: usize = 256;

/// Runs every product: on the calling thread when they hold fewer than [`SERIAL_MACS`]
/// multiply-adds in all, else split into blocks of rows and columns (about 4 per thread) on
/// the thread pool. The split changes no result (see the crate documentation).
fn run_products(isa: Isa, products: Vec<Product<'_>>) {
    let macs = |p: &Product| p.out.rows * p.out.cols * p.k;
    let total: usize = products.iter().map(macs).sum();
    if total < SERIAL_MACS {
        let mut packed = Vec::new();
        for p in products {
            mm::matmul(isa, p.a, p.b, p.k, p.out, &mut packed);
        }
        return;
    }
    let want = 4 * rayon::current_num_threads();
    let nr = mm::panel_width(isa);
    let mut tasks = Vec::new();
    for p in products {
        let (rows, cols) = (p.out.rows, p.out.cols);
        if rows == 0 || cols == 0 {
            continue;
        }
        let parts = ((want as f64 * macs(&p) as f64 / total as f64).ceil() as usize).max(1);
        let row_parts = rows.div_ceil(ROW_CHUNK);
        let col_parts = parts.div_ceil(row_parts).clamp(1, cols.div_ceil(nr));
        let width = cols.div_ceil(col_parts).div_ceil(nr) * nr;
        for r0 in (0..rows).step_by(ROW_CHUNK) {
            let r1 = (r0 + ROW_CHUNK).min(rows);
            for c0 in (0..cols).step_by(width) {
                let c1 = (c0 + width).min(cols);
                tasks.push(Product {
                    a: View {
                        data: &p.a.data[r0 * p.a.rs..],
                        ..p.a
                    },
                    b: View {
                        data: &p.b.data[c0 * p.b.cs..],
                        ..p.b
                    },
                    k: p.k,
                    out: p.out.block(r0, r1, c0, c1),
                });
            }
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Vec::new, |packed, p| mm::matmul(isa, p.a, p.b, p.k, p.out, packed));
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// Runs the SwiGLU experts whose segment holds between 1 and `max_rows` rows, and leaves the
/// rows of every other expert untouched (a caller runs large segments another way), in the
/// tier `isa` (an [`ExpertsError::Isa`] when this CPU does not run it).
///
/// Row-major layouts: `buf` `[N, H]` expert-sorted token rows, expert `e` owning rows
/// `expert_offsets[e]..expert_offsets[e + 1]`; `gate_up` `[E, 2F, H]` (gate rows first, then
/// up rows); `down` `[E, H, F]`; `out` `[N, H]`; `h`, when given, `[N, 2F]` receives the gate
/// and up pre-activations the backward pass needs. For a row `x` of expert `e`:
/// `out = down[e] @ (silu(gate[e] @ x) * (up[e] @ x))`. Returns how many experts ran.
/// Batch-invariant (see the crate documentation).
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
    isa: Isa,
) -> Result<usize> {
    let Dims {
        hidden: hd,
        intermediate: f,
        experts,
    } = dims;
    isa.check()?;
    let rows = check_offsets(expert_offsets, experts)?;
    check_len("buf", buf.len(), rows * hd)?;
    check_len("out", out.len(), rows * hd)?;
    check_len("gate_up", gate_up.len(), experts * 2 * f * hd)?;
    check_len("down", down.len(), experts * hd * f)?;
    if let Some(h) = &h {
        check_len("h", h.len(), rows * 2 * f)?;
    }
    let run = experts_within(expert_offsets, max_rows);
    // Row offsets of the experts that run, packed one after the other (for scratch).
    let packed_rows: Vec<usize> = run
        .iter()
        .scan(0, |at, &(_, s, t)| {
            *at += t - s;
            Some(*at - (t - s))
        })
        .collect();
    let run_rows: usize = run.iter().map(|&(_, s, t)| t - s).sum();
    // The pre-activations go to `h`, or to scratch holding only the rows that run.
    let mut own_h = Vec::new();
    let (h, h_rows, h_first): (&mut [f32], usize, Vec<usize>) = match h {
        Some(h) => (h, rows, run.iter().map(|&(_, s, _)| s).collect()),
        None => {
            own_h.resize(run_rows * 2 * f, 0.0);
            (&mut own_h, run_rows, packed_rows.clone())
        }
    };
    let (gu_size, d_size) = (2 * f * hd, hd * f);

    // h = x @ gate_up^T, expert by expert.
    let h_all = Out::new(h, 2 * f, h_rows, 2 * f);
    let products = run
        .iter()
        .zip(&h_first)
        .map(|(&(e, s, t), &hr)| Product {
            a: View {
                data: &buf[s * hd..t * hd],
                rs: hd,
                cs: 1,
            },
            b: View {
                data: &gate_up[e * gu_size..(e + 1) * gu_size],
                rs: 1,
                cs: hd,
            },
            k: hd,
            out: h_all.block(hr, hr + t - s, 0, 2 * f),
        })
        .collect();
    run_products(isa, products);

    // act = silu(gate) * up, row by row.
    let mut act = vec![0f32; run_rows * f];
    if f > 0 {
        let h: &[f32] = h;
        let mut pairs = Vec::with_capacity(run.len());
        let mut rest = act.as_mut_slice();
        for (&(_, s, t), &hr) in run.iter().zip(&h_first) {
            let (mine, r) = rest.split_at_mut((t - s) * f);
            rest = r;
            pairs.push((&h[hr * 2 * f..(hr + t - s) * 2 * f], mine));
        }
        let swiglu = |(h, act): (&[f32], &mut [f32])| {
            for (hr, ar) in h.chunks_exact(2 * f).zip(act.chunks_exact_mut(f)) {
                let (g, u) = hr.split_at(f);
                for ((a, &g), &u) in ar.iter_mut().zip(g).zip(u) {
                    *a = silu(g) * u;
                }
            }
        };
        if run_rows * f >= ELEMENTWISE_SERIAL {
            pairs.into_par_iter().for_each(swiglu);
        } else {
            pairs.into_iter().for_each(swiglu);
        }
    }

    // out = act @ down^T, expert by expert.
    let out_all = Out::new(out, hd, rows, hd);
    let products = run
        .iter()
        .zip(&packed_rows)
        .map(|(&(e, s, t), &ar)| Product {
            a: View {
                data: &act[ar * f..(ar + t - s) * f],
                rs: f,
                cs: 1,
            },
            b: View {
                data: &down[e * d_size..(e + 1) * d_size],
                rs: 1,
                cs: f,
            },
            k: f,
            out: out_all.block(s, t, 0, hd),
        })
        .collect();
    run_products(isa, products);
    Ok(run.len())
}

/// Elements below which an elementwise pass runs on the calling thread.
const ELEMENTWISE_SERIAL: usize = 1 << 16;

/// Gradients of [`swiglu_forward`] for the experts whose segment holds 1 to `max_rows` rows,
/// from `h`, the pre-activations the forward saved: writes those experts' rows of `grad_buf`
/// and their whole slices of `grad_gate_up` and `grad_down`, and leaves everything else
/// untouched. Shapes as in [`swiglu_forward`], with `grad_out` like `out`, `grad_buf` like
/// `buf`, and the weight gradients like the weights. Returns how many experts ran. A row of
/// `grad_buf` is batch-invariant (see the crate documentation); the weight gradients sum
/// over the expert's rows in row order.
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
    isa: Isa,
) -> Result<usize> {
    let Dims {
        hidden: hd,
        intermediate: f,
        experts,
    } = dims;
    isa.check()?;
    let rows = check_offsets(expert_offsets, experts)?;
    for (what, len, want) in [
        ("grad_out", grad_out.len(), rows * hd),
        ("buf", buf.len(), rows * hd),
        ("grad_buf", grad_buf.len(), rows * hd),
        ("h", h.len(), rows * 2 * f),
        ("gate_up", gate_up.len(), experts * 2 * f * hd),
        ("grad_gate_up", grad_gate_up.len(), experts * 2 * f * hd),
        ("down", down.len(), experts * hd * f),
        ("grad_down", grad_down.len(), experts * hd * f),
    ] {
        check_len(what, len, want)?;
    }
    let run = experts_within(expert_offsets, max_rows);
    let packed_rows: Vec<usize> = run
        .iter()
        .scan(0, |at, &(_, s, t)| {
            *at += t - s;
            Some(*at - (t - s))
        })
        .collect();
    let run_rows: usize = run.iter().map(|&(_, s, t)| t - s).sum();
    let (gu_size, d_size) = (2 * f * hd, hd * f);

    // grad_act = grad_out @ down, expert by expert (rows packed).
    let mut grad_act = vec![0f32; run_rows * f];
    let ga_all = Out::new(&mut grad_act, f, run_rows, f);
    let products = run
        .iter()
        .zip(&packed_rows)
        .map(|(&(e, s, t), &pr)| Product {
            a: View {
                data: &grad_out[s * hd..t * hd],
                rs: hd,
                cs: 1,
            },
            b: View {
                data: &down[e * d_size..(e + 1) * d_size],
                rs: f,
                cs: 1,
            },
            k: hd,
            out: ga_all.block(pr, pr + t - s, 0, f),
        })
        .collect();
    run_products(isa, products);

    // act and grad_h = d(act)/d(gate, up) * grad_act, row by row (rows packed).
    let mut act = vec![0f32; run_rows * f];
    let mut grad_h = vec![0f32; run_rows * 2 * f];
    if f > 0 {
        let mut work = Vec::with_capacity(run.len());
        let (mut act_rest, mut gh_rest) = (act.as_mut_slice(), grad_h.as_mut_slice());
        for (&(_, s, t), &pr) in run.iter().zip(&packed_rows) {
            let n = t - s;
            let (a, ar) = act_rest.split_at_mut(n * f);
            let (g, gr) = gh_rest.split_at_mut(n * 2 * f);
            (act_rest, gh_rest) = (ar, gr);
            work.push((&h[s * 2 * f..t * 2 * f], &grad_act[pr * f..(pr + n) * f], a, g));
        }
        let step = |(h, ga, act, gh): (&[f32], &[f32], &mut [f32], &mut [f32])| {
            let rows = h.chunks_exact(2 * f).zip(ga.chunks_exact(f));
            for ((hr, gar), (ar, ghr)) in rows.zip(act.chunks_exact_mut(f).zip(gh.chunks_exact_mut(2 * f))) {
                let (gg, gu) = ghr.split_at_mut(f);
                for j in 0..f {
                    let (g, u) = (hr[j], hr[f + j]);
                    let sig = 1.0 / (1.0 + (-g).exp());
                    let silu = g * sig;
                    ar[j] = silu * u;
                    gg[j] = gar[j] * u * sig * (1.0 + g * (1.0 - sig));
                    gu[j] = gar[j] * silu;
                }
            }
        };
        if run_rows * f >= ELEMENTWISE_SERIAL {
            work.into_par_iter().for_each(step);
        } else {
            work.into_iter().for_each(step);
        }
    }

    // grad_down = grad_out^T @ act, grad_buf = grad_h @ gate_up, grad_gate_up = grad_h^T @ x.
    let gx_all = Out::new(grad_buf, hd, rows, hd);
    let ggu_all = Out::new(grad_gate_up, hd, experts * 2 * f, hd);
    let gd_all = Out::new(grad_down, f, experts * hd, f);
    let mut products = Vec::with_capacity(3 * run.len());
    for (&(e, s, t), &pr) in run.iter().zip(&packed_rows) {
        let n = t - s;
        let act_e = &act[pr * f..(pr + n) * f];
        let gh_e = &grad_h[pr * 2 * f..(pr + n) * 2 * f];
        products.push(Product {
            a: View {
                data: &grad_out[s * hd..t * hd],
                rs: 1,
                cs: hd,
            },
            b: View {
                data: act_e,
                rs: f,
                cs: 1,
            },
            k: n,
            out: gd_all.block(e * hd, (e + 1) * hd, 0, f),
        });
        products.push(Product {
            a: View {
                data: gh_e,
                rs: 2 * f,
                cs: 1,
            },
            b: View {
                data: &gate_up[e * gu_size..(e + 1) * gu_size],
                rs: hd,
                cs: 1,
            },
            k: 2 * f,
            out: gx_all.block(s, t, 0, hd),
        });
        products.push(Product {
            a: View {
                data: gh_e,
                rs: 1,
                cs: 2 * f,
            },
            b: View {
                data: &buf[s * hd..t * hd],
                rs: hd,
                cs: 1,
            },
            k: n,
            out: ggu_all.block(e * 2 * f, (e + 1) * 2 * f, 0, hd),
        });
    }
    run_products(isa, products);
    Ok(run.len())
}

/// A linear layer without bias over rows: `out[r, j] = x[r] . w[j]` for `x` `[rows, inputs]`,
/// `w` `[outputs, inputs]` and `out` `[rows, outputs]`, row-major, in the tier `isa`.
/// Batch-invariant (see the crate documentation): a row of `out` is bitwise the same
/// whichever other rows share the call. Threaded over blocks of rows and columns when large.
pub fn linear_rows(
    x: &[f32],
    w: &[f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
    out: &mut [f32],
    isa: Isa,
) -> Result<()> {
    isa.check()?;
    check_len("x", x.len(), rows * inputs)?;
    check_len("w", w.len(), outputs * inputs)?;
    check_len("out", out.len(), rows * outputs)?;
    let product = Product {
        a: View {
            data: x,
            rs: inputs,
            cs: 1,
        },
        b: View {
            data: w,
            rs: 1,
            cs: inputs,
        },
        k: inputs,
        out: Out::new(out, outputs, rows, outputs),
    };
    run_products(isa, vec![product]);
    Ok(())
}

#[cfg(test)]
mod tests;
