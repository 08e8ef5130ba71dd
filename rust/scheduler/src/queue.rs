//! The scheduling decisions, on an explicit clock: what [`crate::Scheduler`] runs under its lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use crate::metrics::{Metrics, Outcome};
use crate::{Batch, Config, Request, Result, SchedulerError};

/// A waiting request.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    arrival: Instant,
    cost: u64,
    bucket: u64,
    priority: u32,
    deadline: Option<Instant>,
}

/// The waiting requests of one bucket key.
#[derive(Debug, Default)]
struct Bucket {
    /// (priority, arrival sequence, id): the dispatch order, best first.
    order: BTreeSet<(u32, u64, u64)>,
    /// arrival sequence -> arrival time: the oldest request starts the bucket's delay clock.
    ages: BTreeMap<u64, Instant>,
    /// (deadline, id): a request must not wait for companions past its own deadline.
    deadlines: BTreeSet<(Instant, u64)>,
}

/// What the executor should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll {
    /// Run this batch.
    Batch(Batch),
    /// These requests passed their deadline while waiting: answer each with a timeout error.
    TimedOut(Vec<u64>),
    /// Nothing is ready: wait for a new request, or until this instant (None: no timer pending).
    Wait(Option<Instant>),
    /// Closed and every accepted request has been handed out: the executor can stop.
    Closed,
}

/// The queue and the batching policy, without locking or sleeping: every call takes `now`.
#[derive(Debug)]
pub struct BatchQueue {
    config: Config,
    pending: HashMap<u64, Entry>,
    buckets: HashMap<u64, Bucket>,
    deadlines: BTreeSet<(Instant, u64)>,
    in_flight: HashMap<u64, Instant>,
    next_seq: u64,
    last_arrival: Option<Instant>,
    closed: bool,
    metrics: Metrics,
}

impl BatchQueue {
    /// An empty queue under `config` (validated).
    pub fn new(mut config: Config) -> Result<Self> {
        config.validate()?;
        let metrics = Metrics::new(config.max_size);
        Ok(BatchQueue {
            config,
            pending: HashMap::new(),
            buckets: HashMap::new(),
            deadlines: BTreeSet::new(),
            in_flight: HashMap::new(),
            next_seq: 0,
            last_arrival: None,
            closed: false,
            metrics,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether no request is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether intake has stopped.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether `id` is waiting or dispatched and not yet completed.
    pub fn contains(&self, id: u64) -> bool {
        self.pending.contains_key(&id) || self.in_flight.contains_key(&id)
    }

    /// Takes a request into the queue, or refuses it at once.
    pub fn submit(&mut self, req: Request, now: Instant) -> Result<()> {
        if self.closed {
            self.metrics.rejected += 1;
            return Err(SchedulerError::Closed);
        }
        if self.contains(req.id) {
            return Err(SchedulerError::DuplicateId(req.id));
        }
        if let Some(budget) = self.config.max_batch_cost
            && req.cost > budget
        {
            return Err(SchedulerError::CostOverBudget { cost: req.cost, budget });
        }
        if self.pending.len() >= self.config.max_queue_size {
            self.metrics.rejected += 1;
            return Err(SchedulerError::QueueFull(self.config.max_queue_size));
        }
        // Arrival times never go backwards, so arrival order and sequence order agree.
        let arrival = self.last_arrival.map_or(now, |last| last.max(now));
        self.last_arrival = Some(arrival);
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = Entry {
            seq,
            arrival,
            cost: req.cost,
            bucket: req.bucket,
            priority: req.priority,
            deadline: req.deadline,
        };
        let bucket = self.buckets.entry(req.bucket).or_default();
        bucket.order.insert((req.priority, seq, req.id));
        bucket.ages.insert(seq, arrival);
        if let Some(d) = req.deadline {
            bucket.deadlines.insert((d, req.id));
            self.deadlines.insert((d, req.id));
        }
        self.pending.insert(req.id, entry);
        self.metrics.accepted += 1;
        Ok(())
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.pending.remove(&id)?;
        if let Some(b) = self.buckets.get_mut(&e.bucket) {
            b.order.remove(&(e.priority, e.seq, id));
            b.ages.remove(&e.seq);
            if let Some(d) = e.deadline {
                b.deadlines.remove(&(d, id));
            }
            if b.order.is_empty() {
                self.buckets.remove(&e.bucket);
            }
        }
        if let Some(d) = e.deadline {
            self.deadlines.remove(&(d, id));
        }
        Some(e)
    }

    /// Removes a waiting request; false if it is not waiting (unknown, dispatched or finished).
    pub fn cancel(&mut self, id: u64) -> bool {
        let found = self.remove(id).is_some();
        if found {
            self.metrics.cancelled += 1;
        }
        found
    }

    /// Stops intake; the requests already accepted are still dispatched, without waiting for
    /// `min_size`.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// How many requests of `bucket` to dispatch now, or the instant it becomes due (None: only
    /// a new request can make it ready).
    fn ready(&self, bucket: &Bucket, now: Instant) -> std::result::Result<usize, Option<Instant>> {
        let cfg = &self.config;
        let (mut take, mut cost, mut budget_full) = (0usize, 0u64, false);
        for &(_, _, id) in &bucket.order {
            if take == cfg.max_size {
                break;
            }
            let c = self.pending[&id].cost;
            if cfg.max_batch_cost.is_some_and(|b| cost + c > b) {
                budget_full = true;
                break;
            }
            take += 1;
            cost += c;
        }
        let oldest = *bucket.ages.values().next().expect("a bucket is never empty");
        // A delay too long for the clock means "never due" (the batch waits for min_size).
        let due = oldest.checked_add(cfg.max_queue_delay);
        // Waiting for companions until `due` would time out a request whose deadline comes
        // first: such a bucket goes now.
        let deadline_first = bucket
            .deadlines
            .first()
            .is_some_and(|&(d, _)| due.is_none_or(|due| d <= due));
        if self.closed || take == cfg.max_size || budget_full || deadline_first || due.is_some_and(|d| d <= now) {
            return Ok(take);
        }
        if take >= cfg.min_size {
            if cfg.preferred_sizes.is_empty() {
                return Ok(take);
            }
            let preferred = cfg
                .preferred_sizes
                .iter()
                .rev()
                .find(|&&p| p <= take && p >= cfg.min_size);
            if let Some(&p) = preferred {
                return Ok(p);
            }
        }
        Err(due)
    }

    /// Removes the requests whose deadline is `now` or earlier and returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let mut expired = Vec::new();
        while let Some(&(d, id)) = self.deadlines.first() {
            if d > now {
                break;
            }
            self.remove(id);
            expired.push(id);
        }
        self.metrics.timed_out += expired.len() as u64;
        expired
    }

    /// The earliest deadline of a waiting request.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(d, _)| d)
    }

    /// The next thing to do at `now`: time out expired requests first, then dispatch the ready
    /// bucket whose best request comes first (priority, then arrival).
    pub fn poll(&mut self, now: Instant) -> Poll {
        let expired = self.expire(now);
        if !expired.is_empty() {
            return Poll::TimedOut(expired);
        }
        if self.pending.is_empty() {
            return if self.closed { Poll::Closed } else { Poll::Wait(None) };
        }
        let mut best: Option<((u32, u64), u64, usize)> = None;
        let mut wake = self.deadlines.first().map(|&(d, _)| d);
        for (&key, bucket) in &self.buckets {
            let &(priority, seq, _) = bucket.order.first().expect("a bucket is never empty");
            match self.ready(bucket, now) {
                Ok(n) => {
                    if best.is_none_or(|(head, _, _)| (priority, seq) < head) {
                        best = Some(((priority, seq), key, n));
                    }
                }
                Err(Some(due)) => wake = Some(wake.map_or(due, |w| w.min(due))),
                Err(None) => {}
            }
        }
        let Some((_, key, n)) = best else {
            return Poll::Wait(wake);
        };
        let ids: Vec<u64> = self.buckets[&key].order.iter().take(n).map(|&(_, _, id)| id).collect();
        let mut cost = 0;
        for &id in &ids {
            let e = self.remove(id).expect("dispatched ids are waiting");
            cost += e.cost;
            self.metrics.queue_time.record(now.saturating_duration_since(e.arrival));
            self.in_flight.insert(id, e.arrival);
        }
        self.metrics.batches += 1;
        self.metrics.batch_sizes[ids.len()] += 1;
        Poll::Batch(Batch { ids, bucket: key, cost })
    }

    /// Reports how dispatched requests ended; returns how many were in flight (others are ignored).
    pub fn complete(&mut self, ids: &[u64], outcome: Outcome, now: Instant) -> usize {
        let mut found = 0;
        for id in ids {
            let Some(arrival) = self.in_flight.remove(id) else {
                continue;
            };
            found += 1;
            match outcome {
                Outcome::Completed => self.metrics.completed += 1,
                Outcome::Failed => self.metrics.failed += 1,
                Outcome::Cancelled => self.metrics.cancelled += 1,
            }
            if outcome != Outcome::Cancelled {
                self.metrics.latency.record(now.saturating_duration_since(arrival));
            }
        }
        found
    }

    /// A copy of the counters and histograms.
    pub fn metrics(&self) -> Metrics {
        let mut m = self.metrics.clone();
        m.queue_depth = self.pending.len();
        m.in_flight = self.in_flight.len();
        m
    }
}
