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
