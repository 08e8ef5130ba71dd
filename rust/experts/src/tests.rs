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
      for isa in Isa::available() {
        let rows = buf.len() / dims.hidden;
        let sentinel = 7.5f32;
        let mut out = vec![sentinel; rows * dims.hidden];
        let mut h = vec![sentinel; rows * 2 * dims.intermediate];
        let ran = swiglu_forward(&buf, &gate_up, &down, dims, &offsets, max_rows, &mut out, Some(&mut h), isa).unwrap();
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
                        prop_assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "{isa}: out {got} vs {want}");
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
    for isa in Isa::available() {
        swiglu_forward(&buf, &gate_up, &down, dims, &offsets, 8, &mut a, Some(&mut h), isa).unwrap();
        swiglu_forward(&buf, &gate_up, &down, dims, &offsets, 8, &mut b, None, isa).unwrap();
        assert_eq!(a, b, "{isa}");
    }
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
    let run = |offs: &[i64], out: &mut [f32]| swiglu_forward(&buf, &gu, &dn, dims, offs, 4, out, None, Isa::Generic);
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
    let offsets = [0i64, 2 * ROW_CHUNK as i64 + 22, 2 * ROW_CHUNK as i64 + 23];
    let rows = offsets[2] as usize;
    let wave =
        |n: usize, a: usize, m: usize| -> Vec<f32> { (0..n).map(|i| ((i * a) % m) as f32 / m as f32 - 0.5).collect() };
    let buf = wave(rows * 20, 37, 101);
    let gate_up = wave(2 * 18 * 20, 53, 97);
    let down = wave(2 * 20 * 9, 29, 89);
    let (want_out, want_h) = reference(&buf, &gate_up, &down, dims, &offsets);
    for isa in Isa::available() {
        let (mut out, mut h) = (vec![0f32; rows * 20], vec![0f32; rows * 18]);
        let ran = swiglu_forward(
            &buf,
            &gate_up,
            &down,
            dims,
            &offsets,
            usize::MAX,
            &mut out,
            Some(&mut h),
            isa,
        );
        assert_eq!(ran, Ok(2));
        for (got, want) in out.iter().zip(&want_out).chain(h.iter().zip(&want_h)) {
            assert!(
                (*got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{isa}: {got} vs {want}"
            );
        }
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
      for isa in Isa::available() {
        let rows = buf.len() / hd;
        let grad_out: Vec<f32> = (0..rows * hd).map(|i| (((i as u64 * 2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect();
        let mut h = vec![0f32; rows * 2 * f];
        let mut out = vec![0f32; rows * hd];
        swiglu_forward(&buf, &gate_up, &down, dims, &offsets, usize::MAX, &mut out, Some(&mut h), isa).unwrap();
        let sentinel = -3.25f32;
        let (mut gx, mut ggu, mut gd) = (vec![sentinel; rows * hd], vec![sentinel; gate_up.len()], vec![sentinel; down.len()]);
        let ran = swiglu_backward(&grad_out, &buf, &gate_up, &down, &h, dims, &offsets, max_rows, &mut gx, &mut ggu, &mut gd, isa).unwrap();
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
                    prop_assert!(close(got, want), "{isa}: {got} vs {want}");
                } else {
                    prop_assert_eq!(got, sentinel, "an expert outside the small ones was touched");
                }
            }
        }
        prop_assert_eq!(ran, expected_ran);
      }
    }
}

/// A deterministic stream of values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2048) as f32 / 1024.0 - 1.0
        })
        .collect()
}

/// One expert's row computed alone (forward `out`, `h`, and backward `grad_buf`).
fn alone(
    x: &[f32],
    dy: &[f32],
    gate_up: &[f32],
    down: &[f32],
    hd: usize,
    f: usize,
    isa: Isa,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dims = Dims {
        hidden: hd,
        intermediate: f,
        experts: 1,
    };
    let (mut out, mut h, mut gx) = (vec![0f32; hd], vec![0f32; 2 * f], vec![0f32; hd]);
    let (mut ggu, mut gd) = (vec![0f32; gate_up.len()], vec![0f32; down.len()]);
    swiglu_forward(x, gate_up, down, dims, &[0, 1], 1, &mut out, Some(&mut h), isa).unwrap();
    swiglu_backward(
        dy,
        x,
        gate_up,
        down,
        &h,
        dims,
        &[0, 1],
        1,
        &mut gx,
        &mut ggu,
        &mut gd,
        isa,
    )
    .unwrap();
    (out, h, gx)
}

/// Checks, bitwise, that every row listed in `probe` of a batch of experts equals the row
/// computed alone, in every tier this CPU runs.
fn check_batch_invariance(hd: usize, f: usize, sizes: &[usize], probe: &[usize], seed: u64) {
    let experts = sizes.len();
    let dims = Dims {
        hidden: hd,
        intermediate: f,
        experts,
    };
    let mut offsets = vec![0i64];
    for &n in sizes {
        offsets.push(offsets.last().unwrap() + n as i64);
    }
    let rows = *offsets.last().unwrap() as usize;
    let buf = values(rows * hd, seed);
    let dy = values(rows * hd, seed ^ 1);
    let gate_up = values(experts * 2 * f * hd, seed ^ 2);
    let down = values(experts * hd * f, seed ^ 3);
    for isa in Isa::available() {
        let (mut out, mut h, mut gx) = (vec![0f32; rows * hd], vec![0f32; rows * 2 * f], vec![0f32; rows * hd]);
        let (mut ggu, mut gd) = (vec![0f32; gate_up.len()], vec![0f32; down.len()]);
        swiglu_forward(
            &buf,
            &gate_up,
            &down,
            dims,
            &offsets,
            usize::MAX,
            &mut out,
            Some(&mut h),
            isa,
        )
        .unwrap();
        swiglu_backward(
            &dy,
            &buf,
            &gate_up,
            &down,
            &h,
            dims,
            &offsets,
            usize::MAX,
            &mut gx,
            &mut ggu,
            &mut gd,
            isa,
        )
        .unwrap();
        for &m in probe {
            let e = offsets.windows(2).position(|w| w[1] as usize > m).unwrap();
            let (gu_e, d_e) = (2 * f * hd, hd * f);
            let (o, hh, g) = alone(
                &buf[m * hd..(m + 1) * hd],
                &dy[m * hd..(m + 1) * hd],
                &gate_up[e * gu_e..(e + 1) * gu_e],
                &down[e * d_e..(e + 1) * d_e],
                hd,
                f,
                isa,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out[m * hd..(m + 1) * hd]), bits(&o), "{isa}: out of row {m}");
            assert_eq!(bits(&h[m * 2 * f..(m + 1) * 2 * f]), bits(&hh), "{isa}: h of row {m}");
            assert_eq!(bits(&gx[m * hd..(m + 1) * hd]), bits(&g), "{isa}: grad_buf of row {m}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A row computed alone is bitwise the same row inside a larger random batch, at a random
    /// position, in every tier.
    #[test]
    fn rows_are_batch_invariant(
        hd in 1usize..90,
        f in 1usize..40,
        sizes in proptest::collection::vec(0usize..40, 1..4),
        picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..4),
        seed in any::<u64>(),
    ) {
        let rows: usize = sizes.iter().sum();
        prop_assume!(rows > 0);
        let probe: Vec<usize> = picks.iter().map(|i| i.index(rows)).collect();
        check_batch_invariance(hd, f, &sizes, &probe, seed);
    }

    /// `linear_rows`: the definition in f64 (every tier), and a row alone equals it in a batch.
    #[test]
    fn linear_rows_match_the_definition_and_are_batch_invariant(
        rows in 0usize..30,
        inputs in 0usize..70,
        outputs in 0usize..90,
        pick in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let x = values(rows * inputs, seed);
        let w = values(outputs * inputs, seed ^ 5);
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; rows * outputs];
            linear_rows(&x, &w, rows, inputs, outputs, &mut out, isa).unwrap();
            for r in 0..rows {
                for j in 0..outputs {
                    let want: f64 = (0..inputs).map(|c| x[r * inputs + c] as f64 * w[j * inputs + c] as f64).sum();
                    let got = out[r * outputs + j];
                    prop_assert!((got as f64 - want).abs() <= 1e-5 * (1.0 + inputs as f64), "{isa}: {got} vs {want}");
                }
            }
            if rows > 0 {
                let r = pick.index(rows);
                let mut one = vec![0f32; outputs];
                linear_rows(&x[r * inputs..(r + 1) * inputs], &w, 1, inputs, outputs, &mut one, isa).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&one), bits(&out[r * outputs..(r + 1) * outputs]), "{}", isa);
            }
        }
    }
}

/// Large enough to run on the thread pool, split into row and column blocks, with `k` over
/// several packed panels.
#[test]
fn threaded_and_blocked_calls_stay_batch_invariant() {
    check_batch_invariance(
        300,
        70,
        &[3, 2 * ROW_CHUNK + 41, 1],
        &[0, 5, 200, 300, 2 * ROW_CHUNK + 43],
        7,
    );
    let (rows, inputs, outputs) = (2 * ROW_CHUNK + 5, 600, 130);
    let x = values(rows * inputs, 11);
    let w = values(outputs * inputs, 12);
    for isa in Isa::available() {
        let mut out = vec![0f32; rows * outputs];
        linear_rows(&x, &w, rows, inputs, outputs, &mut out, isa).unwrap();
        for r in [0, 1, ROW_CHUNK, rows - 1] {
            let mut one = vec![0f32; outputs];
            linear_rows(&x[r * inputs..(r + 1) * inputs], &w, 1, inputs, outputs, &mut one, isa).unwrap();
            assert_eq!(one, out[r * outputs..(r + 1) * outputs], "{isa}: row {r}");
            for (j, &got) in one.iter().enumerate() {
                let want: f64 = (0..inputs)
                    .map(|c| x[r * inputs + c] as f64 * w[j * inputs + c] as f64)
                    .sum();
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{isa}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn tiers_parse_by_name_and_this_cpu_lists_what_it_runs() {
    for isa in Isa::ALL {
        assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
    }
    assert!(matches!("sse9".parse::<Isa>(), Err(ExpertsError::Isa(m)) if m.contains("sse9") && m.contains("generic")));
    let available = Isa::available();
    assert_eq!(available.last(), Some(&Isa::Generic));
    assert_eq!(Isa::best(), available[0]);
    for isa in Isa::ALL {
        assert_eq!(isa.supported(), available.contains(&isa));
        assert_eq!(isa.check().is_ok(), isa.supported());
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert!(!Isa::Neon.supported());
        let (x, w, mut out) = ([1f32], [2f32], [0f32]);
        let err = linear_rows(&x, &w, 1, 1, 1, &mut out, Isa::Neon).unwrap_err();
        assert!(
            matches!(&err, ExpertsError::Isa(m) if m.contains("neon") && m.contains("available: ")),
            "{err}"
        );
    }
}
