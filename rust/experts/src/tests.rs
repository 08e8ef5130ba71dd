use super::*;
use proptest::prelude::*;

/// The definition, in f64: `down @ (silu(gate @ x) * (up @ x))` row by row.
fn reference(buf: &[f32], gate_up: &[f32], down: &[f32], dims: Dims, offsets: &[i64]) -> (Vec<f64>, Vec<f64>) {
    let Dims {
        hidden: hd,
        intermediate: f,
        experts,
    } = dims;
    let rows = buf.len() / hd.max(1);
    let (mut out, mut h) = (vec![0f64; rows * hd], vec![0f64; rows * 2 * f]);
    for e in 0..experts {
        for m in offsets[e] as usize..offsets[e + 1] as usize {
            let x = &buf[m * hd..(m + 1) * hd];
            let mut act = vec![0f64; f];
            for j in 0..f {
                let w = |r: usize| &gate_up[(e * 2 * f + r) * hd..(e * 2 * f + r + 1) * hd];
                let dotp = |w: &[f32]| w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
                let (g, u) = (dotp(w(j)), dotp(w(f + j)));
                h[m * 2 * f + j] = g;
                h[m * 2 * f + f + j] = u;
                act[j] = g / (1.0 + (-g).exp()) * u;
            }
            for c in 0..hd {
                let w = &down[(e * hd + c) * f..(e * hd + c + 1) * f];
                out[m * hd + c] = w.iter().zip(&act).map(|(&a, &b)| a as f64 * b).sum();
            }
        }
    }
    (out, h)
}

fn case() -> impl Strategy<Value = (Dims, Vec<i64>, Vec<f32>, Vec<f32>, Vec<f32>, usize)> {
    (
        1usize..40,
        1usize..24,
        1usize..5,
        proptest::collection::vec(0i64..11, 1..5),
        0usize..12,
    )
        .prop_flat_map(|(hd, f, experts, sizes, max_rows)| {
            let mut offsets = vec![0i64];
            for e in 0..experts {
                offsets.push(offsets[e] + sizes[e % sizes.len()]);
            }
            let rows = *offsets.last().unwrap() as usize;
            let dims = Dims {
                hidden: hd,
                intermediate: f,
                experts,
            };
            (
                Just(dims),
                Just(offsets),
                proptest::collection::vec(-2f32..2.0, rows * hd),
                proptest::collection::vec(-1f32..1.0, experts * 2 * f * hd),
                proptest::collection::vec(-1f32..1.0, experts * hd * f),
                Just(max_rows),
            )
        })
}

proptest! {
    #[test]
    fn small_experts_match_the_definition((dims, offsets, buf, gate_up, down, max_rows) in case()) {
        let rows = buf.len() / dims.hidden;
        let sentinel = 7.5f32;
        let mut out = vec![sentinel; rows * dims.hidden];
        let mut h = vec![sentinel; rows * 2 * dims.intermediate];
        let ran = swiglu_forward(&buf, &gate_up, &down, dims, &offsets, max_rows, &mut out, Some(&mut h)).unwrap();
        let (want_out, want_h) = reference(&buf, &gate_up, &down, dims, &offsets);
        let mut expected_ran = 0;
        for e in 0..dims.experts {
            let (s, t) = (offsets[e] as usize, offsets[e + 1] as usize);
            let small = t > s && t - s <= max_rows;
            expected_ran += small as usize;
            for m in s..t {
                for c in 0..dims.hidden {
                    let got = out[m * dims.hidden + c];
                    if small {
                        let want = want_out[m * dims.hidden + c];
                        prop_assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "out {got} vs {want}");
                    } else {
                        prop_assert_eq!(got, sentinel, "a large segment's rows were touched");
                    }
                }
                for c in 0..2 * dims.intermediate {
                    let got = h[m * 2 * dims.intermediate + c];
                    if small {
                        let want = want_h[m * 2 * dims.intermediate + c];
                        prop_assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()));
                    } else {
                        prop_assert_eq!(got, sentinel);
                    }
                }
            }
        }
        prop_assert_eq!(ran, expected_ran);
    }

    #[test]
    fn tile_kernels_agree(k in 0usize..70, seed in any::<u64>()) {
        let mut state = seed | 1;
        let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; (state % 2001) as f32 / 1000.0 - 1.0 };
        let rows: Vec<Vec<f32>> = (0..8).map(|_| (0..k).map(|_| next()).collect()).collect();
        let a: [&[f32]; 4] = std::array::from_fn(|i| rows[i].as_slice());
        let b: [&[f32]; 4] = std::array::from_fn(|i| rows[4 + i].as_slice());
        let (fast, slow) = (dot::best()(&a, &b), dot::portable(&a, &b));
        for i in 0..4 {
            for j in 0..4 {
                let exact: f64 = a[i].iter().zip(b[j]).map(|(&x, &y)| x as f64 * y as f64).sum();
                prop_assert!((fast[i][j] as f64 - exact).abs() <= 1e-4 * (1.0 + k as f64));
                prop_assert!((slow[i][j] as f64 - exact).abs() <= 1e-4 * (1.0 + k as f64));
            }
        }
    }
}

#[test]
fn without_h_the_output_is_the_same() {
    let dims = Dims {
        hidden: 33,
        intermediate: 17,
        experts: 2,
    };
    let offsets = [0i64, 3, 8];
    let buf: Vec<f32> = (0..8 * 33).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
    let gate_up: Vec<f32> = (0..2 * 2 * 17 * 33)
        .map(|i| ((i * 53) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let down: Vec<f32> = (0..2 * 33 * 17).map(|i| ((i * 29) % 89) as f32 / 89.0 - 0.5).collect();
    let (mut a, mut b, mut h) = (vec![0f32; 8 * 33], vec![0f32; 8 * 33], vec![0f32; 8 * 34]);
    swiglu_forward(&buf, &gate_up, &down, dims, &offsets, 8, &mut a, Some(&mut h)).unwrap();
    swiglu_forward(&buf, &gate_up, &down, dims, &offsets, 8, &mut b, None).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_shapes_are_errors() {
    let dims = Dims {
        hidden: 4,
        intermediate: 2,
        experts: 2,
    };
    let (buf, gu, dn) = (vec![0f32; 12], vec![0f32; 32], vec![0f32; 16]);
    let mut out = vec![0f32; 12];
    let run = |offs: &[i64], out: &mut [f32]| swiglu_forward(&buf, &gu, &dn, dims, offs, 4, out, None);
    assert!(matches!(run(&[0, 3], &mut out), Err(ExpertsError::Shape(_))));
    assert!(matches!(run(&[1, 2, 3], &mut out), Err(ExpertsError::Offsets(_))));
    assert!(matches!(run(&[0, 2, 1], &mut out), Err(ExpertsError::Offsets(_))));
    assert!(matches!(run(&[0, 1, 2], &mut out), Err(ExpertsError::Shape(_))));
    assert_eq!(run(&[0, 1, 3], &mut out), Ok(2));
}

#[test]
fn segments_longer_than_a_row_block_match_the_definition() {
    let dims = Dims {
        hidden: 20,
        intermediate: 9,
        experts: 2,
    };
    let offsets = [0i64, 2 * ROW_BLOCK as i64 + 22, 2 * ROW_BLOCK as i64 + 23];
    let rows = offsets[2] as usize;
    let wave =
        |n: usize, a: usize, m: usize| -> Vec<f32> { (0..n).map(|i| ((i * a) % m) as f32 / m as f32 - 0.5).collect() };
    let buf = wave(rows * 20, 37, 101);
    let gate_up = wave(2 * 18 * 20, 53, 97);
    let down = wave(2 * 20 * 9, 29, 89);
    let (mut out, mut h) = (vec![0f32; rows * 20], vec![0f32; rows * 18]);
    assert_eq!(
        swiglu_forward(
            &buf,
            &gate_up,
            &down,
            dims,
            &offsets,
            usize::MAX,
            &mut out,
            Some(&mut h)
        ),
        Ok(2)
    );
    let (want_out, want_h) = reference(&buf, &gate_up, &down, dims, &offsets);
    for (got, want) in out.iter().zip(&want_out).chain(h.iter().zip(&want_h)) {
        assert!(
            (*got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "{got} vs {want}"
        );
    }
}

/// Gradients of the definition, in f64: (grad_buf, grad_gate_up, grad_down).
fn reference_grads(
    grad_out: &[f32],
    buf: &[f32],
    gate_up: &[f32],
    down: &[f32],
    dims: Dims,
    offsets: &[i64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let Dims {
        hidden: hd,
        intermediate: f,
        experts,
    } = dims;
    let rows = buf.len() / hd;
    let (mut gx, mut ggu, mut gd) = (
        vec![0f64; rows * hd],
        vec![0f64; experts * 2 * f * hd],
        vec![0f64; experts * hd * f],
    );
    for e in 0..experts {
        let wgu = |r: usize, c: usize| gate_up[(e * 2 * f + r) * hd + c] as f64;
        let wd = |r: usize, c: usize| down[(e * hd + r) * f + c] as f64;
        for m in offsets[e] as usize..offsets[e + 1] as usize {
            let x = |c: usize| buf[m * hd + c] as f64;
            let dy = |c: usize| grad_out[m * hd + c] as f64;
            for j in 0..f {
                let g: f64 = (0..hd).map(|c| wgu(j, c) * x(c)).sum();
                let u: f64 = (0..hd).map(|c| wgu(f + j, c) * x(c)).sum();
                let sig = 1.0 / (1.0 + (-g).exp());
                let act = g * sig * u;
                let ga: f64 = (0..hd).map(|c| wd(c, j) * dy(c)).sum();
                let (gg, gu) = (ga * u * sig * (1.0 + g * (1.0 - sig)), ga * g * sig);
                for c in 0..hd {
                    gd[(e * hd + c) * f + j] += dy(c) * act;
                    gx[m * hd + c] += wgu(j, c) * gg + wgu(f + j, c) * gu;
                    ggu[(e * 2 * f + j) * hd + c] += gg * x(c);
                    ggu[(e * 2 * f + f + j) * hd + c] += gu * x(c);
                }
            }
        }
    }
    (gx, ggu, gd)
}

proptest! {
    #[test]
    fn small_expert_gradients_match_the_definition(
        (dims, offsets, buf, gate_up, down, max_rows) in case(),
        seed in any::<u64>(),
    ) {
        let Dims { hidden: hd, intermediate: f, experts } = dims;
        let rows = buf.len() / hd;
        let grad_out: Vec<f32> = (0..rows * hd).map(|i| (((i as u64 * 2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect();
        let mut h = vec![0f32; rows * 2 * f];
        let mut out = vec![0f32; rows * hd];
        swiglu_forward(&buf, &gate_up, &down, dims, &offsets, usize::MAX, &mut out, Some(&mut h)).unwrap();
        let sentinel = -3.25f32;
        let (mut gx, mut ggu, mut gd) = (vec![sentinel; rows * hd], vec![sentinel; gate_up.len()], vec![sentinel; down.len()]);
        let ran = swiglu_backward(&grad_out, &buf, &gate_up, &down, &h, dims, &offsets, max_rows, &mut gx, &mut ggu, &mut gd).unwrap();
        let (want_x, want_gu, want_d) = reference_grads(&grad_out, &buf, &gate_up, &down, dims, &offsets);
        let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-3 * (1.0 + want.abs());
        let mut expected_ran = 0;
        for e in 0..experts {
            let (s, t) = (offsets[e] as usize, offsets[e + 1] as usize);
            let small = t > s && t - s <= max_rows;
            expected_ran += small as usize;
            let weights = (e * 2 * f * hd..(e + 1) * 2 * f * hd).map(|i| (ggu[i], want_gu[i]))
                .chain((e * hd * f..(e + 1) * hd * f).map(|i| (gd[i], want_d[i])));
            for (got, want) in (s * hd..t * hd).map(|i| (gx[i], want_x[i])).chain(weights) {
                if small {
                    prop_assert!(close(got, want), "{got} vs {want}");
                } else {
                    prop_assert_eq!(got, sentinel, "an expert outside the small ones was touched");
                }
            }
        }
        prop_assert_eq!(ran, expected_ran);
    }

    #[test]
    fn gemm_kernels_agree(rows in 0usize..9, cols in 0usize..80, k in 0usize..20, transposed in any::<bool>()) {
        let a_data: Vec<f32> = (0..rows.max(1) * k.max(1)).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
        let (rs, ks) = if transposed { (1, rows.max(1)) } else { (k.max(1), 1) };
        let a = gemm::Strided { data: &a_data, rs, ks };
        let b: Vec<f32> = (0..k * cols).map(|i| ((i * 7) % 13) as f32 / 6.0 - 1.0).collect();
        let (mut fast, mut slow) = (vec![9f32; rows * cols], vec![9f32; rows * cols]);
        gemm::best()(a, &b, cols, k, &mut fast, cols, rows, cols);
        gemm::portable(a, &b, cols, k, &mut slow, cols, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                let exact: f64 = (0..k).map(|kk| a_data[r * rs + kk * ks] as f64 * b[kk * cols + c] as f64).sum();
                prop_assert!((fast[r * cols + c] as f64 - exact).abs() <= 1e-4 * (1.0 + k as f64));
                prop_assert!((slow[r * cols + c] as f64 - exact).abs() <= 1e-4 * (1.0 + k as f64));
            }
        }
    }
}
