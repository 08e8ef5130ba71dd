//! Times the SwiGLU expert kernels of `deepseek-experts` in every instruction-set tier this CPU
//! runs, beside the same computation through the `gemm` crate (candle's CPU matmul), for one
//! expert of `H` x `F` with 1 to 1024 rows, forward and backward, and prints GFLOP/s.
//!
//! `cargo run --release --manifest-path rust/experts/bench/Cargo.toml -- [--threads N] [--quick]`
//!
//! Each figure is the best of several runs (at least 3, and at least 0.3 s of them) after a
//! warm-up; the median is printed beside it, since the machines this runs on are shared.

use std::time::{Duration, Instant};

use deepseek_experts::{Dims, Isa, swiglu_backward, swiglu_forward};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2048) as f32 / 2048.0 - 0.5
        })
        .collect()
}

/// (best, median) seconds of `f`.
fn time(mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut runs = Vec::new();
    let start = Instant::now();
    while runs.len() < 3 || (start.elapsed() < Duration::from_millis(300) && runs.len() < 200) {
        let t = Instant::now();
        f();
        runs.push(t.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    (runs[0], runs[runs.len() / 2])
}

struct Case {
    hd: usize,
    f: usize,
    rows: usize,
    x: Vec<f32>,
    dy: Vec<f32>,
    gate_up: Vec<f32>,
    down: Vec<f32>,
}

impl Case {
    fn new(hd: usize, f: usize, rows: usize) -> Case {
        Case {
            hd,
            f,
            rows,
            x: values(rows * hd, 1),
            dy: values(rows * hd, 2),
            gate_up: values(2 * f * hd, 3).iter().map(|v| v / (hd as f32).sqrt()).collect(),
            down: values(hd * f, 4).iter().map(|v| v / (f as f32).sqrt()).collect(),
        }
    }

    fn dims(&self) -> Dims {
        Dims {
            hidden: self.hd,
            intermediate: self.f,
            experts: 1,
        }
    }

    fn ours_forward(&self, isa: Isa, out: &mut [f32], h: &mut [f32]) {
        let offsets = [0, self.rows as i64];
        let (x, gu, d) = (&self.x, &self.gate_up, &self.down);
        swiglu_forward(x, gu, d, self.dims(), &offsets, usize::MAX, out, Some(h), isa).unwrap();
    }

    fn ours_backward(&self, isa: Isa, h: &[f32], g: &mut [Vec<f32>; 3]) {
        let offsets = [0, self.rows as i64];
        let [gx, ggu, gd] = g;
        let (x, gu, d) = (&self.x, &self.gate_up, &self.down);
        swiglu_backward(
            &self.dy,
            x,
            gu,
            d,
            h,
            self.dims(),
            &offsets,
            usize::MAX,
            gx,
            ggu,
            gd,
            isa,
        )
        .unwrap();
    }
}

/// `dst[m, n] = lhs @ rhs` through the gemm crate, every matrix given by (pointer, row stride,
/// column stride).
#[allow(clippy::too_many_arguments)]
fn gemm_crate(
    m: usize,
    n: usize,
    k: usize,
    dst: (&mut [f32], usize, usize),
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    par: gemm::Parallelism,
) {
    // SAFETY: the callers pass matrices whose every (row, column) lies in their slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0.as_mut_ptr(),
            dst.2 as isize,
            dst.1 as isize,
            false,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

impl Case {
    fn crate_forward(&self, par: gemm::Parallelism, out: &mut [f32], h: &mut [f32], act: &mut [f32]) {
        let (hd, f, m) = (self.hd, self.f, self.rows);
        gemm_crate(
            m,
            2 * f,
            hd,
            (h, 2 * f, 1),
            (&self.x, hd, 1),
            (&self.gate_up, 1, hd),
            par,
        );
        for (hr, ar) in h.chunks_exact(2 * f).zip(act.chunks_exact_mut(f)) {
            for j in 0..f {
                ar[j] = silu(hr[j]) * hr[f + j];
            }
        }
        gemm_crate(m, hd, f, (out, hd, 1), (act, f, 1), (&self.down, 1, f), par);
    }

    fn crate_backward(&self, par: gemm::Parallelism, h: &[f32], s: &mut [Vec<f32>; 6]) {
        let (hd, f, m) = (self.hd, self.f, self.rows);
        let [gx, ggu, gd, ga, act, gh] = s;
        gemm_crate(m, f, hd, (ga, f, 1), (&self.dy, hd, 1), (&self.down, f, 1), par);
        for r in 0..m {
            for j in 0..f {
                let (g, u) = (h[r * 2 * f + j], h[r * 2 * f + f + j]);
                let sig = 1.0 / (1.0 + (-g).exp());
                let a = ga[r * f + j];
                act[r * f + j] = g * sig * u;
                gh[r * 2 * f + j] = a * u * sig * (1.0 + g * (1.0 - sig));
                gh[r * 2 * f + f + j] = a * g * sig;
            }
        }
        gemm_crate(hd, f, m, (gd, f, 1), (&self.dy, 1, hd), (act, f, 1), par);
        gemm_crate(m, hd, 2 * f, (gx, hd, 1), (gh, 2 * f, 1), (&self.gate_up, hd, 1), par);
        gemm_crate(2 * f, hd, m, (ggu, hd, 1), (gh, 1, 2 * f), (&self.x, hd, 1), par);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .map_or(1, |v| v.parse().expect("--threads N"));
    let quick = args.iter().any(|a| a == "--quick");
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let par = if threads == 1 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    };
    let shapes: &[(usize, usize)] = if quick {
        &[(1024, 512)]
    } else {
        &[(1024, 512), (2048, 768), (64, 32)]
    };
    let rows_list: &[usize] = if quick {
        &[1, 16, 256]
    } else {
        &[1, 4, 16, 64, 256, 1024]
    };
    println!("threads: {threads}; GFLOP/s best (median) of one expert, H x F, forward and backward");
    let mut columns: Vec<String> = Isa::available().iter().map(|i| i.name().to_string()).collect();
    columns.push("gemm crate".into());
    println!("| H x F | rows | pass | {} |", columns.join(" | "));
    println!("|---|---|---|{}", "---|".repeat(columns.len()));
    for &(hd, f) in shapes {
        for &rows in rows_list {
            let case = Case::new(hd, f, rows);
            let (mut out, mut h, mut act) = (vec![0f32; rows * hd], vec![0f32; rows * 2 * f], vec![0f32; rows * f]);
            case.ours_forward(Isa::Generic, &mut out, &mut h);
            let h_saved = h.clone();
            let mut grads = [vec![0f32; rows * hd], vec![0f32; 2 * f * hd], vec![0f32; hd * f]];
            let mut scratch = [
                vec![0f32; rows * hd],
                vec![0f32; 2 * f * hd],
                vec![0f32; hd * f],
                vec![0f32; rows * f],
                vec![0f32; rows * f],
                vec![0f32; rows * 2 * f],
            ];
            let fwd_flops = (rows * 6 * hd * f) as f64;
            let cell = |(best, median): (f64, f64), flops: f64| {
                format!("{:.1} ({:.1})", flops / best / 1e9, flops / median / 1e9)
            };
            let mut fwd = Vec::new();
            let mut bwd = Vec::new();
            for isa in Isa::available() {
                fwd.push(cell(time(|| case.ours_forward(isa, &mut out, &mut h)), fwd_flops));
                bwd.push(cell(
                    time(|| case.ours_backward(isa, &h_saved, &mut grads)),
                    2.0 * fwd_flops,
                ));
            }
            fwd.push(cell(
                time(|| case.crate_forward(par, &mut out, &mut h, &mut act)),
                fwd_flops,
            ));
            bwd.push(cell(
                time(|| case.crate_backward(par, &h_saved, &mut scratch)),
                2.0 * fwd_flops,
            ));
            println!("| {hd} x {f} | {rows} | forward | {} |", fwd.join(" | "));
            println!("| {hd} x {f} | {rows} | backward | {} |", bwd.join(" | "));
        }
    }
}
