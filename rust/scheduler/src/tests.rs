use super::*;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config(min_size: usize, max_size: usize) -> Config {
    Config {
        min_size,
        max_size,
        max_queue_delay: ms(10),
        max_queue_size: 100,
        ..Config::default()
    }
}

fn batch(p: Poll) -> Vec<u64> {
    match p {
        Poll::Batch(b) => b.ids,
        other => panic!("expected a batch, got {other:?}"),
    }
}

#[test]
fn waits_for_min_size_but_not_past_the_delay() {
    let t0 = Instant::now();
    let mut q = BatchQueue::new(config(3, 8)).unwrap();
    q.submit(Request::new(1), t0).unwrap();
    q.submit(Request::new(2), t0 + ms(1)).unwrap();
    assert_eq!(q.poll(t0 + ms(2)), Poll::Wait(Some(t0 + ms(10))));
    assert_eq!(batch(q.poll(t0 + ms(10))), vec![1, 2]);
    for id in 3..6 {
        q.submit(Request::new(id), t0 + ms(11)).unwrap();
    }
    assert_eq!(batch(q.poll(t0 + ms(11))), vec![3, 4, 5]);
    assert_eq!(q.poll(t0 + ms(11)), Poll::Wait(None));
}

#[test]
fn max_size_and_cost_budget_cut_batches() {
    let t0 = Instant::now();
    let mut cfg = config(1, 3);
    cfg.max_batch_cost = Some(10);
    let mut q = BatchQueue::new(cfg).unwrap();
    for (id, cost) in [(1, 2), (2, 2), (3, 2), (4, 2), (5, 9), (6, 1)] {
        q.submit(
            Request {
                cost,
                ..Request::new(id)
            },
            t0,
        )
        .unwrap();
    }
    assert_eq!(batch(q.poll(t0)), vec![1, 2, 3]);
    assert_eq!(batch(q.poll(t0)), vec![4]); // 2 + 9 > 10: stop, keep FIFO
    assert_eq!(batch(q.poll(t0)), vec![5, 6]);
    let err = q
        .submit(
            Request {
                cost: 11,
                ..Request::new(7)
            },
            t0,
        )
        .unwrap_err();
    assert_eq!(err, SchedulerError::CostOverBudget { cost: 11, budget: 10 });
}

#[test]
fn buckets_are_never_mixed_and_the_best_head_goes_first() {
    let t0 = Instant::now();
    let mut q = BatchQueue::new(config(2, 4)).unwrap();
    q.submit(
        Request {
            bucket: 7,
            ..Request::new(1)
        },
        t0,
    )
    .unwrap();
    q.submit(
        Request {
            bucket: 9,
            ..Request::new(2)
        },
        t0,
    )
    .unwrap();
    q.submit(
        Request {
            bucket: 9,
            ..Request::new(3)
        },
        t0,
    )
    .unwrap();
    // Bucket 9 is ready (2 >= min_size); bucket 7 waits for its delay.
    assert_eq!(
        q.poll(t0),
        Poll::Batch(Batch {
            ids: vec![2, 3],
            bucket: 9,
            cost: 2
        })
    );
    assert_eq!(q.poll(t0), Poll::Wait(Some(t0 + ms(10))));
    assert_eq!(
        q.poll(t0 + ms(10)),
        Poll::Batch(Batch {
            ids: vec![1],
            bucket: 7,
            cost: 1
        })
    );
}

#[test]
fn priorities_then_fifo() {
    let t0 = Instant::now();
    let mut q = BatchQueue::new(config(1, 2)).unwrap();
    for (id, priority) in [(1, 2), (2, 0), (3, 1), (4, 0), (5, 2)] {
        q.submit(
            Request {
                priority,
                ..Request::new(id)
            },
            t0,
        )
        .unwrap();
    }
    assert_eq!(batch(q.poll(t0)), vec![2, 4]);
    assert_eq!(batch(q.poll(t0)), vec![3, 1]);
    assert_eq!(batch(q.poll(t0)), vec![5]);
}

#[test]
fn preferred_sizes_are_used_before_the_delay() {
    let t0 = Instant::now();
    let mut cfg = config(2, 8);
    cfg.preferred_sizes = vec![4, 2];
    let mut q = BatchQueue::new(cfg).unwrap();
    for id in 0..7 {
        q.submit(Request::new(id), t0).unwrap();
    }
    assert_eq!(batch(q.poll(t0)), vec![0, 1, 2, 3]);
    assert_eq!(batch(q.poll(t0)), vec![4, 5]);
    assert_eq!(q.poll(t0), Poll::Wait(Some(t0 + ms(10))));
    assert_eq!(batch(q.poll(t0 + ms(10))), vec![6]);
}

#[test]
fn deadlines_cancel_queue_full_and_duplicates() {
    let t0 = Instant::now();
    let mut cfg = config(4, 4);
    cfg.max_queue_size = 3;
    let mut q = BatchQueue::new(cfg).unwrap();
    q.submit(
        Request {
            deadline: Some(t0 + ms(3)),
            ..Request::new(1)
        },
        t0,
    )
    .unwrap();
    q.submit(Request::new(2), t0).unwrap();
    assert_eq!(q.submit(Request::new(2), t0), Err(SchedulerError::DuplicateId(2)));
    q.submit(Request::new(3), t0).unwrap();
    assert_eq!(q.submit(Request::new(4), t0), Err(SchedulerError::QueueFull(3)));
    assert!(q.cancel(3));
    assert!(!q.cancel(3));
    // (No poll before t0 + 3 ms: the executor was busy. A poll in time would have dispatched
    // request 1 at once, its deadline coming before the batch's delay.)
    assert_eq!(q.poll(t0 + ms(3)), Poll::TimedOut(vec![1]));
    q.close();
    assert_eq!(q.submit(Request::new(5), t0), Err(SchedulerError::Closed));
    assert_eq!(batch(q.poll(t0 + ms(4))), vec![2]); // closed: no waiting for min_size
    assert_eq!(q.poll(t0 + ms(4)), Poll::Closed);
    assert_eq!(q.complete(&[2, 99], Outcome::Completed, t0 + ms(5)), 1);
    let m = q.metrics();
    assert_eq!(
        (m.accepted, m.rejected, m.timed_out, m.cancelled, m.completed),
        (3, 2, 1, 1, 1)
    );
    assert_eq!((m.batches, m.batch_sizes[1], m.queue_depth, m.in_flight), (1, 1, 0, 0));
    assert_eq!(m.latency.count(), 1);
}

#[test]
fn bad_configs_are_refused() {
    for (cfg, msg) in [
        (config(1, 0), "max_size"),
        (config(1, MAX_BATCH_SIZE + 1), "max_size"),
        (config(1, usize::MAX), "max_size"),
        (config(0, 4), "min_size"),
        (config(5, 4), "min_size"),
        (
            Config {
                max_queue_size: 0,
                ..config(1, 4)
            },
            "max_queue_size",
        ),
        (
            Config {
                max_batch_cost: Some(0),
                ..config(1, 4)
            },
            "max_batch_cost",
        ),
        (
            Config {
                preferred_sizes: vec![9],
                ..config(1, 4)
            },
            "preferred",
        ),
    ] {
        let err = BatchQueue::new(cfg).unwrap_err().to_string();
        assert!(err.contains(msg), "{err}");
    }
}

#[test]
fn histogram_quantiles_bound_the_samples() {
    let mut h = LatencyHistogram::default();
    assert_eq!(h.quantile(0.5), Duration::ZERO);
    for us in 1..=1000u64 {
        h.record(Duration::from_micros(us));
    }
    let p50 = h.quantile(0.5).as_secs_f64() * 1e6;
    assert!((500.0..=500.0 * 1.19).contains(&p50), "{p50}");
    assert_eq!(h.quantile(1.0), Duration::from_micros(1000));
    assert_eq!(h.count(), 1000);
    h.record(Duration::from_secs(1000)); // past the last bound
    assert_eq!(h.max(), Duration::from_secs(1000));
}

#[test]
fn next_batch_blocks_until_a_batch_is_due_and_close_drains() {
    let s = std::sync::Arc::new(Scheduler::new(config(2, 4)).unwrap());
    assert_eq!(s.next_batch(Some(ms(1))), Next::Idle);
    let s2 = s.clone();
    let worker = std::thread::spawn(move || {
        let mut got = Vec::new();
        loop {
            match s2.next_batch(None) {
                Next::Batch(b) => {
                    s2.complete(&b.ids, Outcome::Completed);
                    got.extend(b.ids)
                }
                Next::Closed => return got,
                other => panic!("{other:?}"),
            }
        }
    });
    for id in 0..5 {
        s.submit(Request::new(id)).unwrap();
    }
    std::thread::sleep(ms(30));
    s.close();
    let mut got = worker.join().unwrap();
    got.sort_unstable();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    assert_eq!(s.metrics().completed, 5);
}

#[test]
fn delays_and_timeouts_too_long_for_the_clock_do_not_panic() {
    let t0 = Instant::now();
    let mut q = BatchQueue::new(Config {
        max_queue_delay: Duration::MAX,
        ..config(4, 8)
    })
    .unwrap();
    q.submit(Request::new(1), t0).unwrap();
    assert_eq!(q.poll(t0 + ms(10)), Poll::Wait(None)); // never due: waits for min_size
    let s = Scheduler::new(Config {
        max_queue_delay: Duration::MAX,
        ..config(1, 8)
    })
    .unwrap();
    s.submit(Request::new(1)).unwrap();
    assert!(matches!(s.next_batch(Some(Duration::MAX)), Next::Batch(_)));
    assert_eq!(s.expire_wait(Some(ms(1))), Some(vec![]));
}

#[test]
fn a_deadline_before_the_delay_dispatches_at_once() {
    let t0 = Instant::now();
    let mut q = BatchQueue::new(Config {
        max_queue_delay: ms(50),
        ..config(4, 8)
    })
    .unwrap();
    q.submit(Request::new(1), t0).unwrap();
    q.submit(
        Request {
            deadline: Some(t0 + ms(10)),
            ..Request::new(2)
        },
        t0,
    )
    .unwrap();
    assert_eq!(batch(q.poll(t0 + ms(1))), vec![1, 2]);
    q.submit(
        Request {
            deadline: Some(t0 + ms(80)),
            ..Request::new(3)
        },
        t0 + ms(2),
    )
    .unwrap();
    assert_eq!(q.poll(t0 + ms(3)), Poll::Wait(Some(t0 + ms(52))));
}

#[test]
fn expire_wait_answers_timeouts_while_executors_are_busy() {
    let s = Scheduler::new(Config {
        max_queue_delay: Duration::from_secs(10),
        ..config(1, 8)
    })
    .unwrap();
    let start = Instant::now();
    s.submit(Request {
        deadline: Some(start + ms(20)),
        ..Request::new(7)
    })
    .unwrap();
    assert_eq!(s.expire_wait(None), Some(vec![7])); // no executor ever polled
    assert!(start.elapsed() >= ms(20));
    s.close();
    assert_eq!(s.expire_wait(None), None);
    assert_eq!(s.metrics().timed_out, 1);
}

#[test]
fn many_producers_and_consumers_lose_nothing_and_duplicate_nothing() {
    use std::sync::Arc;
    let cfg = Config {
        max_size: 8,
        min_size: 3,
        max_queue_delay: ms(1),
        max_queue_size: 100_000,
        ..Config::default()
    };
    let s = Arc::new(Scheduler::new(cfg).unwrap());
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    match s.next_batch(None) {
                        Next::Batch(b) => {
                            assert!(!b.ids.is_empty() && b.ids.len() <= 8);
                            assert!(b.ids.iter().all(|id| id % 3 == b.bucket), "mixed buckets");
                            s.complete(&b.ids, Outcome::Completed);
                            got.extend(b.ids);
                        }
                        Next::Closed => return got,
                        other => panic!("{other:?}"),
                    }
                }
            })
        })
        .collect();
    let producers: Vec<_> = (0..8u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..500 {
                    let id = t * 1000 + i;
                    s.submit(Request {
                        bucket: id % 3,
                        ..Request::new(id)
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    s.close();
    let mut got: Vec<u64> = consumers.into_iter().flat_map(|c| c.join().unwrap()).collect();
    got.sort_unstable();
    let want: Vec<u64> = (0..8u64).flat_map(|t| (0..500).map(move |i| t * 1000 + i)).collect();
    assert_eq!(got, want);
    let m = s.metrics();
    assert_eq!(
        (m.accepted, m.completed, m.in_flight, m.queue_depth),
        (4000, 4000, 0, 0)
    );
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        cost: u64,
        bucket: u64,
        priority: u32,
        deadline_ms: Option<u64>,
    },
    Cancel(usize),
    Advance(u64),
    Poll,
    Close,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..5, 0u64..3, 0u32..3, proptest::option::of(0u64..20)).prop_map(|(cost, bucket, priority, deadline_ms)| {
            Op::Submit { cost, bucket, priority, deadline_ms }
        }),
        1 => (0usize..64).prop_map(Op::Cancel),
        2 => (0u64..8).prop_map(Op::Advance),
        3 => Just(Op::Poll),
        1 => Just(Op::Close),
    ]
}

proptest! {
    /// Any interleaving of submit, cancel, time passing, polls and close: every accepted request
    /// ends exactly once (dispatched, timed out or cancelled), batches respect max_size, the cost
    /// budget and one bucket, nothing runs past its deadline, order is priority then FIFO, a batch
    /// below min_size only leaves when it is due or closed, and close drains everything.
    #[test]
    fn scheduler_state_machine(
        min_size in 1usize..4, extra in 0usize..4, budget in proptest::option::of(4u64..12),
        preferred in proptest::collection::vec(1usize..8, 0..3), ops in proptest::collection::vec(op(), 1..80),
    ) {
        let max_size = min_size + extra;
        let cfg = Config {
            min_size, max_size, max_queue_delay: ms(5), max_queue_size: 16, max_batch_cost: budget,
            preferred_sizes: preferred.into_iter().filter(|&p| p >= min_size && p <= max_size).collect(),
        };
        let t0 = Instant::now();
        let mut now = t0;
        let mut q = BatchQueue::new(cfg.clone()).unwrap();
        let mut accepted: HashMap<u64, (Request, Instant, u64)> = HashMap::new();
        let mut ended: HashSet<u64> = HashSet::new();
        let mut last_dispatched: HashMap<(u64, u32), u64> = HashMap::new();
        let mut ids = Vec::new();
        let mut seq = 0;
        let mut handle = |p: Poll, now: Instant, q: &BatchQueue, accepted: &HashMap<u64, (Request, Instant, u64)>,
                          ended: &mut HashSet<u64>| -> std::result::Result<bool, TestCaseError> {
            match p {
                Poll::Batch(b) => {
                    prop_assert!(!b.ids.is_empty() && b.ids.len() <= max_size);
                    let reqs: Vec<_> = b.ids.iter().map(|id| accepted[id]).collect();
                    prop_assert!(reqs.iter().all(|r| r.0.bucket == b.bucket));
                    prop_assert_eq!(b.cost, reqs.iter().map(|r| r.0.cost).sum::<u64>());
                    if let Some(budget) = budget { prop_assert!(b.cost <= budget); }
                    prop_assert!(reqs.iter().all(|r| r.0.deadline.is_none_or(|d| d > now)));
                    let keys: Vec<_> = reqs.iter().map(|r| (r.0.priority, r.2)).collect();
                    prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "not priority-then-FIFO: {:?}", keys);
                    let oldest = reqs.iter().map(|r| r.1).min().unwrap();
                    if b.ids.len() < min_size {
                        let due = oldest + cfg.max_queue_delay;
                        let deadline_first = reqs.iter().any(|r| r.0.deadline.is_some_and(|d| d <= due));
                        prop_assert!(q.is_closed() || now >= due || budget.is_some() || deadline_first);
                    }
                    for (id, r) in b.ids.iter().zip(&reqs) {
                        prop_assert!(ended.insert(*id), "request {} ended twice", id);
                        let last = last_dispatched.insert((r.0.bucket, r.0.priority), r.2);
                        prop_assert!(last.is_none_or(|l| l < r.2), "FIFO broken within a level");
                    }
                    Ok(true)
                }
                Poll::TimedOut(ids) => {
                    prop_assert!(!ids.is_empty());
                    for id in ids {
                        prop_assert!(accepted[&id].0.deadline.unwrap() <= now);
                        prop_assert!(ended.insert(id), "request {} ended twice", id);
                    }
                    Ok(true)
                }
                Poll::Wait(wake) => {
                    prop_assert!(!q.is_closed() || !q.is_empty());
                    prop_assert!(wake.is_none_or(|w| w > now));
                    // Liveness: the scheduler wakes before any waiting request's deadline.
                    for (id, r) in accepted.iter() {
                        if let (false, Some(d)) = (ended.contains(id), r.0.deadline) {
                            prop_assert!(wake.is_some_and(|w| w < d), "would sleep past the deadline of {}", id);
                        }
                    }
                    Ok(false)
                }
                Poll::Closed => { prop_assert!(q.is_closed() && q.is_empty()); Ok(false) }
            }
        };
        for op in ops {
            match op {
                Op::Submit { cost, bucket, priority, deadline_ms } => {
                    let id = 1000 + ids.len() as u64;
                    let req = Request { id, cost, bucket, priority, deadline: deadline_ms.map(|d| now + ms(d)) };
                    let full = q.len() >= cfg.max_queue_size;
                    match q.submit(req, now) {
                        Ok(()) => {
                            prop_assert!(!full && !q.is_closed());
                            accepted.insert(id, (req, now, seq));
                            seq += 1;
                            ids.push(id);
                        }
                        Err(SchedulerError::QueueFull(_)) => prop_assert!(full),
                        Err(SchedulerError::Closed) => prop_assert!(q.is_closed()),
                        Err(SchedulerError::CostOverBudget { .. }) => prop_assert!(budget.is_some_and(|b| cost > b)),
                        Err(e) => prop_assert!(false, "unexpected {:?}", e),
                    }
                }
                Op::Cancel(i) => {
                    if let Some(&id) = ids.get(i) {
                        let waiting = accepted.contains_key(&id) && !ended.contains(&id);
                        prop_assert_eq!(q.cancel(id), waiting);
                        if waiting { ended.insert(id); }
                    }
                }
                Op::Advance(d) => now += ms(d),
                Op::Poll => { handle(q.poll(now), now, &q, &accepted, &mut ended)?; }
                Op::Close => q.close(),
            }
            prop_assert!(q.len() <= cfg.max_queue_size);
        }
        q.close();
        let mut steps = 0;
        while handle(q.poll(now), now, &q, &accepted, &mut ended)? {
            steps += 1;
            prop_assert!(steps <= 1000);
        }
        prop_assert_eq!(q.poll(now), Poll::Closed);
        let all: HashSet<u64> = accepted.keys().copied().collect();
        prop_assert_eq!(&ended, &all, "lost requests");
        let m = q.metrics();
        prop_assert_eq!(m.accepted as usize, accepted.len());
        let dispatched: u64 = m.batch_sizes.iter().enumerate().map(|(n, &c)| n as u64 * c).sum();
        prop_assert_eq!((dispatched + m.timed_out + m.cancelled) as usize, accepted.len());
    }
}

#[test]
fn next_batch_at_reports_the_instant_deadlines_were_compared_with() {
    let s = Scheduler::new(config(1, 8)).unwrap();
    let start = Instant::now();
    let deadline = start + ms(5);
    s.submit(Request {
        deadline: Some(deadline),
        ..Request::new(1)
    })
    .unwrap();
    let (next, at) = s.next_batch_at(None);
    assert_eq!(
        next,
        Next::Batch(Batch {
            ids: vec![1],
            bucket: 0,
            cost: 1
        })
    );
    assert!(start <= at && at < deadline && at <= Instant::now());
    s.submit(Request {
        deadline: Some(Instant::now()),
        ..Request::new(2)
    })
    .unwrap();
    let (next, at) = s.next_batch_at(Some(ms(1)));
    assert_eq!(next, Next::TimedOut(vec![2]));
    let (next, idle_at) = s.next_batch_at(Some(ms(1)));
    assert_eq!(next, Next::Idle);
    assert!(at <= idle_at && idle_at >= at + ms(1));
}
