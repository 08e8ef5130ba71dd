use super::*;
use proptest::prelude::*;

/// A random routing: per-token distinct experts, as the router produces.
fn routing_strategy() -> impl Strategy<Value = (usize, Vec<i64>, Vec<i64>)> {
    (1usize..10, 0usize..50).prop_flat_map(|(e, t)| {
        let token = prop::collection::btree_set(0..e as i64, 0..=e.min(4)).prop_shuffle_ids();
        (Just(e), prop::collection::vec(token, t)).prop_map(|(e, tokens)| {
            let mut offsets = vec![0i64];
            let mut ids = Vec::new();
            for t in tokens {
                ids.extend(t);
                offsets.push(ids.len() as i64);
            }
            (e, offsets, ids)
        })
    })
}

trait ShuffleIds {
    fn prop_shuffle_ids(self) -> BoxedStrategy<Vec<i64>>;
}
impl<S: Strategy<Value = std::collections::BTreeSet<i64>> + 'static> ShuffleIds for S {
    fn prop_shuffle_ids(self) -> BoxedStrategy<Vec<i64>> {
        self.prop_map(|s| s.into_iter().collect::<Vec<_>>())
            .prop_shuffle()
            .boxed()
    }
}

fn values(n: usize, seed: u64) -> Vec<f64> {
    (0..n)
        .map(|i| (((i as u64 + seed) * 2654435761) % 1000) as f64 / 250.0 - 2.0)
        .collect()
}

proptest! {
    #[test]
    fn sort_is_a_stable_grouping((e, offsets, ids) in routing_strategy()) {
        let p = sort_by_expert(&offsets, &ids, e).unwrap();
        let n = ids.len();
        // Inverse permutations of each other.
        for j in 0..n {
            prop_assert_eq!(p.sorted_pair[p.pair_position[j] as usize], j as i64);
        }
        // Grouped by expert, pair order kept inside each expert (stability).
        let mut want: Vec<usize> = (0..n).collect();
        want.sort_by_key(|&j| ids[j]);
        prop_assert_eq!(p.sorted_pair.iter().map(|&j| j as usize).collect::<Vec<_>>(), want);
        for ex in 0..e {
            for r in p.expert_offsets[ex]..p.expert_offsets[ex + 1] {
                prop_assert_eq!(ids[p.sorted_pair[r as usize] as usize], ex as i64);
            }
        }
        for (r, &j) in p.sorted_pair.iter().enumerate() {
            let t = offsets.partition_point(|&o| o <= j) - 1;
            prop_assert_eq!(p.sorted_token[r], t as i64);
        }
    }

    #[test]
    fn combine_matches_reference((e, offsets, ids) in routing_strategy(), cols in 0usize..9, weighted: bool) {
        let p = sort_by_expert(&offsets, &ids, e).unwrap();
        let tokens = offsets.len() - 1;
        let n = ids.len();
        let buf = values(n * cols, 3);
        let w = values(n, 11);
        let weights = weighted.then_some(w.as_slice());
        let mut out = vec![f64::NAN; tokens * cols];
        combine(&buf, cols, &p.pair_position, &offsets, weights, &mut out).unwrap();
        for t in 0..tokens {
            for c in 0..cols {
                let mut want = 0.0;
                for j in offsets[t] as usize..offsets[t + 1] as usize {
                    want += weights.map_or(1.0, |w| w[j]) * buf[p.pair_position[j] as usize * cols + c];
                }
                prop_assert!((out[t * cols + c] - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn gather_and_combine_are_adjoint((e, offsets, ids) in routing_strategy(), cols in 1usize..9) {
        // <gather(x), b> == <x, combine(b)> and <combine_w(b), g> == <w, combine_weight_grad(g, b)>.
        let p = sort_by_expert(&offsets, &ids, e).unwrap();
        let tokens = offsets.len() - 1;
        let n = ids.len();
        let x = values(tokens * cols, 1);
        let b = values(n * cols, 2);
        let g = values(tokens * cols, 5);
        let w = values(n, 7);
        let mut gx = vec![0.0; n * cols];
        gather(&x, cols, &p.sorted_token, &mut gx).unwrap();
        let mut cb = vec![0.0; tokens * cols];
        combine(&b, cols, &p.pair_position, &offsets, None, &mut cb).unwrap();
        let lhs: f64 = gx.iter().zip(&b).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&cb).map(|(a, b)| a * b).sum();
        prop_assert!((lhs - rhs).abs() < 1e-9);
        // Buffer gradient of the weighted combine: scaled gather of g.
        let w_sorted: Vec<f64> = p.sorted_pair.iter().map(|&j| w[j as usize]).collect();
        let mut gb = vec![0.0; n * cols];
        gather_scaled(&g, cols, &p.sorted_token, &w_sorted, &mut gb).unwrap();
        let mut cwb = vec![0.0; tokens * cols];
        combine(&b, cols, &p.pair_position, &offsets, Some(&w), &mut cwb).unwrap();
        let lhs: f64 = cwb.iter().zip(&g).map(|(a, b)| a * b).sum();
        let rhs: f64 = gb.iter().zip(&b).map(|(a, b)| a * b).sum();
        prop_assert!((lhs - rhs).abs() < 1e-9);
        let gw = combine_weight_grad(&g, &b, cols, &p.pair_position, &offsets).unwrap();
        let rhs: f64 = gw.iter().zip(&w).map(|(a, b)| a * b).sum();
        prop_assert!((lhs - rhs).abs() < 1e-9);
    }
}

#[test]
fn bad_indices_are_errors() {
    assert!(matches!(
        sort_by_expert(&[0, 2], &[0, 4], 4),
        Err(DispatchError::Index(_))
    ));
    assert!(matches!(
        sort_by_expert(&[0, 3], &[0, 1], 4),
        Err(DispatchError::Index(_))
    ));
    assert!(matches!(sort_by_expert(&[], &[], 4), Err(DispatchError::Shape(_))));
    // A huge expert count is refused before its histograms are allocated.
    for e in [MAX_EXPERTS + 1, usize::MAX] {
        assert!(matches!(sort_by_expert(&[0, 1], &[0], e), Err(DispatchError::Index(_))));
    }
    assert!(sort_by_expert(&[0, 1], &[0], 1).is_ok());
    let mut out = [0.0f32; 4];
    assert!(matches!(
        gather(&[1.0f32; 4], 2, &[0, 2], &mut out),
        Err(DispatchError::Index(_))
    ));
    assert!(matches!(
        gather(&[1.0f32; 4], 2, &[0], &mut out),
        Err(DispatchError::Shape(_))
    ));
    assert!(matches!(
        combine(&[1.0f32; 4], 2, &[0, 5], &[0, 2], None, &mut out[..2]),
        Err(DispatchError::Index(_))
    ));
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let tokens = 3000;
    let k = 6;
    let e = 64;
    let ids: Vec<i64> = (0..tokens * k).map(|i| ((i * 7 + i / k * 13) % e) as i64).collect();
    let offsets: Vec<i64> = (0..=tokens).map(|t| (t * k) as i64).collect();
    let cols = 33;
    let buf: Vec<f32> = (0..tokens * k * cols).map(|i| (i % 97) as f32 * 0.37 - 11.0).collect();
    let w: Vec<f32> = (0..tokens * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let p = sort_by_expert(&offsets, &ids, e).unwrap();
            let mut out = vec![0.0f32; tokens * cols];
            combine(&buf, cols, &p.pair_position, &offsets, Some(&w), &mut out).unwrap();
            let gw = combine_weight_grad(&out, &buf, cols, &p.pair_position, &offsets).unwrap();
            (p, out, gw)
        })
    };
    let (p, out, _) = run(4);
    // The parallel path (this call is above SERIAL_ELEMENTS) computes the plain definition.
    for t in (0..tokens).step_by(97) {
        for c in 0..cols {
            let want: f32 =
                (t * k..(t + 1) * k).fold(0.0, |acc, j| acc + w[j] * buf[p.pair_position[j] as usize * cols + c]);
            assert!((out[t * cols + c] - want).abs() <= 1e-4 * want.abs().max(1.0));
        }
    }
    assert_eq!(run(1), run(4));
}
