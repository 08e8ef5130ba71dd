use super::*;
use proptest::prelude::*;

/// Experts of one row in descending score, ties to the lower index (a full stable sort).
fn ranked(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    idx
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|z| (z - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn rows(r: &Routing<f64>, t: usize) -> (Vec<usize>, Vec<f64>) {
    let span = r.token_offsets[t] as usize..r.token_offsets[t + 1] as usize;
    (
        r.expert_ids[span.clone()].iter().map(|&e| e as usize).collect(),
        r.weights[span].to_vec(),
    )
}

fn logits_strategy() -> impl Strategy<Value = (usize, Vec<f64>)> {
    (1usize..12, 0usize..40).prop_flat_map(|(e, t)| {
        // A coarse grid makes exact ties common.
        (
            Just(e),
            prop::collection::vec((-8i32..8).prop_map(|v| v as f64 * 0.5), e * t),
        )
    })
}

proptest! {
    #[test]
    fn top_k_matches_sorted_reference((e, logits) in logits_strategy(), k in 1usize..12, renorm: bool) {
        let k = k.min(e);
        let r = softmax_top_k(&logits, e, k, renorm).unwrap();
        for (t, row) in logits.chunks(e).enumerate() {
            let p = softmax(row);
            let want: Vec<usize> = ranked(row)[..k].to_vec();
            let (ids, ws) = rows(&r, t);
            prop_assert_eq!(&ids, &want);
            let total: f64 = want.iter().map(|&i| p[i]).sum();
            for (&i, &w) in ids.iter().zip(&ws) {
                let expect = if renorm { p[i] / total } else { p[i] };
                prop_assert!((w - expect).abs() < 1e-12);
            }
        }
        let counted: i64 = r.expert_counts.iter().sum();
        prop_assert_eq!(counted as usize, r.expert_ids.len());
    }

    #[test]
    fn top_p_keeps_smallest_prefix((e, logits) in logits_strategy(), p in 0.05f64..1.0, min_k in 1usize..4, extra in 0usize..8) {
        let min_k = min_k.min(e);
        let max_k = (min_k + extra).min(e);
        let r = softmax_top_p(&logits, e, p, min_k, max_k, false).unwrap();
        for (t, row) in logits.chunks(e).enumerate() {
            let probs = softmax(row);
            let order = ranked(row);
            let mut mass = 0.0;
            let mut n = 0;
            while n < max_k && (n < min_k || mass < p) {
                mass += probs[order[n]];
                n += 1;
            }
            let (ids, _) = rows(&r, t);
            prop_assert_eq!(ids, order[..n].to_vec());
        }
    }

    #[test]
    fn softmax_backward_matches_finite_differences((e, logits) in logits_strategy(), k in 1usize..12, renorm: bool, seed in 0u64..1000) {
        let k = k.min(e);
        let r = softmax_top_k(&logits, e, k, renorm).unwrap();
        let g: Vec<f64> = (0..r.weights.len()).map(|i| ((i as u64 * 7919 + seed) % 13) as f64 / 13.0 - 0.5).collect();
        let grad = route_backward(&logits, e, &r.token_offsets, &r.expert_ids, &g, Scoring::Softmax, renorm, 1.0).unwrap();
        // The selection is fixed; the weights are a smooth function of the logits around it.
        let loss = |z: &[f64]| -> f64 {
            let mut s = 0.0;
            for (t, row) in z.chunks(e).enumerate() {
                let p = softmax(row);
                let (ids, _) = rows(&r, t);
                let total: f64 = ids.iter().map(|&i| p[i]).sum();
                for (j, &i) in ids.iter().enumerate() {
                    let w = if renorm { p[i] / total } else { p[i] };
                    s += g[r.token_offsets[t] as usize + j] * w;
                }
            }
            s
        };
        let h = 1e-6;
        for i in 0..logits.len() {
            let mut up = logits.clone();
            up[i] += h;
            let mut down = logits.clone();
            down[i] -= h;
            let fd = (loss(&up) - loss(&down)) / (2.0 * h);
            prop_assert!((fd - grad[i]).abs() < 1e-6, "logit {}: fd {} analytic {}", i, fd, grad[i]);
        }
    }
}

/// f32 logits with frequent exact ties, signed zeros, subnormals and extremes.
fn f32_logits_strategy() -> impl Strategy<Value = (usize, Vec<f32>)> {
    let value = prop_oneof![
        8 => (-8i32..8).prop_map(|v| v as f32 * 0.5),
        1 => Just(-0.0f32),
        1 => prop::sample::select(vec![f32::MAX, -f32::MAX, f32::MIN_POSITIVE / 4.0, -1e-40, 88.0, -100.0]),
        2 => -50.0f32..50.0,
    ];
    (1usize..80, 0usize..6).prop_flat_map(move |(e, t)| (Just(e), prop::collection::vec(value.clone(), e * t)))
}

proptest! {
    #[test]
    fn f32_top_k_matches_sorted_reference((e, logits) in f32_logits_strategy(), k in 1usize..80) {
        let k = k.min(e);
        let r = softmax_top_k(&logits, e, k, false).unwrap();
        for (t, row) in logits.chunks(e).enumerate() {
            let wide: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            let want: Vec<i64> = ranked(&wide)[..k].iter().map(|&i| i as i64).collect();
            prop_assert_eq!(&r.expert_ids[t * k..(t + 1) * k], &want[..]);
            let p = softmax(&wide);
            for (&i, &w) in want.iter().zip(&r.weights[t * k..(t + 1) * k]) {
                prop_assert!((w as f64 - p[i as usize]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn key_passes_agree_with_portable_form(keys in prop::collection::hash_set(any::<i64>(), 1..70), k in 1usize..70) {
        let keys: Vec<i64> = keys.into_iter().map(|k| k & !0xffff_ffff).enumerate().map(|(i, k)| k | i as i64).collect();
        let k = k.min(keys.len());
        let last = 100;
        let (mut fast, mut portable) = (vec![0; k], vec![0; k]);
        best_keys(&keys, last, &mut fast);
        best_keys_portable(&keys, last, &mut portable);
        prop_assert_eq!(&fast, &portable);
        let mut sorted = keys.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let want: Vec<i64> = sorted[..k].iter().map(|&key| last - (key & 0xffff_ffff)).collect();
        prop_assert_eq!(&fast, &want);
    }
}

#[test]
fn ties_choose_lower_index() {
    let r = softmax_top_k(&[1.0f32, 1.0, 1.0, 1.0], 4, 2, false).unwrap();
    assert_eq!(r.expert_ids, vec![0, 1]);
    assert_eq!(r.weights, vec![0.25, 0.25]);
}

#[test]
fn top_p_uses_more_experts_for_flat_rows() {
    // A peaked token needs one expert to reach p = 0.5, a flat one needs three of four.
    let logits = [10.0f64, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let r = softmax_top_p(&logits, 4, 0.5, 1, 4, false).unwrap();
    assert_eq!(r.token_offsets, vec![0, 1, 3]);
    let r = softmax_top_p(&logits, 4, 0.6, 1, 4, false).unwrap();
    assert_eq!(r.token_offsets, vec![0, 1, 4]);
}

#[test]
fn zero_tokens_give_empty_routing() {
    let r = softmax_top_k::<f32>(&[], 8, 2, true).unwrap();
    assert_eq!(r.token_offsets, vec![0]);
    assert!(r.expert_ids.is_empty());
    assert_eq!(r.expert_counts, vec![0; 8]);
}

#[test]
fn bad_input_is_an_error() {
    assert!(matches!(
        softmax_top_k(&[0.0f32, f32::NAN], 2, 1, false),
        Err(RouterError::NonFinite {
            token: 0,
            expert: 1,
            ..
        })
    ));
    assert!(matches!(
        softmax_top_k(&[0.0f32; 6], 4, 1, false),
        Err(RouterError::Shape(_))
    ));
    assert!(matches!(
        softmax_top_k(&[0.0f32; 4], 4, 5, false),
        Err(RouterError::Value(_))
    ));
    assert!(matches!(
        softmax_top_p(&[0.0f32; 4], 4, 1.5, 1, 2, false),
        Err(RouterError::Value(_))
    ));
    assert!(matches!(
        softmax_top_p(&[0.0f32; 4], 4, 0.5, 3, 2, false),
        Err(RouterError::Value(_))
    ));
    let rule = GroupLimited {
        top_k: 2,
        n_group: 3,
        topk_group: 1,
        renormalize: true,
    };
    assert!(matches!(
        sigmoid_group_limited(&[0.0f32; 4], &[0.0; 4], 4, rule),
        Err(RouterError::Value(_))
    ));
}

#[test]
fn group_limited_follows_deepseek_v3() {
    // Two groups of two. Group 1 holds the two best biased scores, so only experts 2 and 3
    // can be chosen although expert 0 has the largest raw logit.
    let logits = [3.0f64, -4.0, 1.0, 1.0];
    let bias = [0.0, 0.0, 0.5, 0.5];
    let rule = GroupLimited {
        top_k: 2,
        n_group: 2,
        topk_group: 1,
        renormalize: true,
    };
    let r = sigmoid_group_limited(&logits, &bias, 4, rule).unwrap();
    assert_eq!(r.expert_ids, vec![2, 3]);
    assert!((r.weights[0] - 0.5).abs() < 1e-15);
    // The bias steers selection (experts 2 and 3 beat expert 0) but never the weights.
    let plain = GroupLimited {
        top_k: 2,
        n_group: 1,
        topk_group: 1,
        renormalize: false,
    };
    let r = sigmoid_group_limited(&logits, &bias, 4, plain).unwrap();
    assert_eq!(r.expert_ids, vec![2, 3]);
    assert!((r.weights[0] - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-15);
    let unbiased = sigmoid_group_limited(&logits, &[0.0; 4], 4, plain).unwrap();
    assert_eq!(unbiased.expert_ids, vec![0, 2]);
}

#[test]
fn sigmoid_backward_matches_finite_differences() {
    let logits = [0.3f64, -1.2, 2.0, 0.7, -0.1, 0.4, 1.1, -2.0];
    let bias = [0.0; 4];
    for renorm in [false, true] {
        let rule = GroupLimited {
            top_k: 2,
            n_group: 2,
            topk_group: 2,
            renormalize: renorm,
        };
        let r = sigmoid_group_limited(&logits, &bias, 4, rule).unwrap();
        let g = [0.5, -1.0, 0.25, 2.0];
        let grad = route_backward(
            &logits,
            4,
            &r.token_offsets,
            &r.expert_ids,
            &g,
            Scoring::Sigmoid,
            renorm,
            2.5,
        )
        .unwrap();
        let loss = |z: &[f64]| -> f64 {
            let mut s = 0.0;
            for t in 0..2 {
                let span = r.token_offsets[t] as usize..r.token_offsets[t + 1] as usize;
                let sig: Vec<f64> = r.expert_ids[span.clone()]
                    .iter()
                    .map(|&e| 1.0 / (1.0 + (-z[t * 4 + e as usize]).exp()))
                    .collect();
                let total: f64 = sig.iter().sum::<f64>() + 1e-20;
                for (j, s_j) in sig.iter().enumerate() {
                    let w = if renorm { s_j / total } else { *s_j };
                    s += g[span.start + j] * 2.5 * w;
                }
            }
            s
        };
        for i in 0..logits.len() {
            let (mut up, mut down) = (logits, logits);
            up[i] += 1e-6;
            down[i] -= 1e-6;
            let fd = (loss(&up) - loss(&down)) / 2e-6;
            assert!(
                (fd - grad[i]).abs() < 1e-6,
                "renorm {renorm} logit {i}: fd {fd} analytic {}",
                grad[i]
            );
        }
    }
}

#[test]
fn result_does_not_depend_on_thread_count() {
    let logits: Vec<f32> = (0..64 * 3000)
        .map(|i| ((i * 2654435761u64 as usize) % 1000) as f32 / 100.0)
        .collect();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let four = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
    let a = one.install(|| softmax_top_p(&logits, 64, 0.5, 1, 8, true).unwrap());
    let b = four.install(|| softmax_top_p(&logits, 64, 0.5, 1, 8, true).unwrap());
    assert_eq!(a, b);
}

#[test]
fn f32_exp_is_accurate_to_a_few_ulp() {
    let mut worst = 0.0f64;
    for i in 0..=870_000 {
        let x = -(i as f32) * 1e-4;
        let got = <f32 as Real>::exp_nonpositive(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max(((got - want) / want).abs());
    }
    assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst}");
    assert!(<f32 as Real>::exp_nonpositive(-1000.0) < 1e-37);
    assert!(!<f32 as Real>::all_finite(&[0.0, f32::NAN]) && !<f32 as Real>::all_finite(&[f32::NEG_INFINITY]));
    assert!(<f32 as Real>::all_finite(&[0.0, -1e30, f32::MIN_POSITIVE]));
}

#[test]
fn the_isa_cap_reads_known_names_and_ignores_the_rest() {
    assert_eq!(IsaCap::from_env_value(None), IsaCap::Avx512);
    assert_eq!(IsaCap::from_env_value(Some("")), IsaCap::Avx512);
    assert_eq!(IsaCap::from_env_value(Some("avx512")), IsaCap::Avx512);
    assert_eq!(IsaCap::from_env_value(Some("avx2")), IsaCap::Avx2);
    assert_eq!(IsaCap::from_env_value(Some(" Generic ")), IsaCap::Generic);
    assert_eq!(IsaCap::from_env_value(Some("sse9")), IsaCap::Avx512);
    assert!(IsaCap::Generic < IsaCap::Avx2 && IsaCap::Avx2 < IsaCap::Avx512);
}
