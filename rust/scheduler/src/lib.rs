//! Dynamic batching scheduler: the engine decides, the caller executes.
//!
//! Requests (id, cost, bucket key, priority, deadline) wait in a bounded queue; payloads stay
//! with the caller. [`Scheduler::next_batch`] blocks (on a condition variable, no polling)
//! until a batch is due and returns its ids: up to `max_size` requests of one bucket key, within
//! an optional cost budget, in priority order (FIFO within a level). A batch waits for
//! `min_size` requests (or a preferred size) but never longer than `max_queue_delay` after its
//! oldest request arrived. A request whose deadline passes while it waits is handed back as
//! timed out and never dispatched. [`Scheduler::close`] stops intake and drains the queue.
//!
//! The policy itself lives in [`BatchQueue`], which takes the current time as an argument so
//! that tests can drive it on a fake clock.
#![deny(missing_docs)]

mod metrics;
mod queue;
#[cfg(test)]
mod tests;

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use metrics::{LatencyHistogram, Metrics, Outcome};
pub use queue::{BatchQueue, Poll};

/// Why the scheduler refused something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// A configuration value is out of range.
    #[error("{0}")]
    Config(String),
    /// The queue holds `max_queue_size` requests already.
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The scheduler is shutting down and takes no new requests.
    #[error("the scheduler is shut down and accepts no new requests")]
    Closed,
    /// A request with this id is already waiting or running.
    #[error("request id {0} is already queued or running")]
    DuplicateId(u64),
    /// One request costs more than a whole batch may.
    #[error("request cost {cost} exceeds max_batch_cost {budget}")]
    CostOverBudget {
        /// The request's cost.
        cost: u64,
        /// The configured budget.
        budget: u64,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, SchedulerError>;

/// The batching policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Most requests in one batch (>= 1).
    pub max_size: usize,
    /// Requests a batch waits for, at most `max_queue_delay` (1..=max_size).
    pub min_size: usize,
    /// Longest time the oldest request of a bucket waits for the batch to fill.
    pub max_queue_delay: Duration,
    /// Most requests waiting; one more is refused with [`SchedulerError::QueueFull`].
    pub max_queue_size: usize,
    /// Optional cap on the summed cost of a batch (e.g. tokens).
    pub max_batch_cost: Option<u64>,
    /// Optional batch sizes to prefer before `max_queue_delay` (each in min_size..=max_size).
    pub preferred_sizes: Vec<usize>,
}

impl Default for Config {
    /// The article's batching block: min 4, max 32, with a 5 ms delay and 1024 queued requests.
    fn default() -> Self {
        Config {
            max_size: 32,
            min_size: 4,
            max_queue_delay: Duration::from_millis(5),
            max_queue_size: 1024,
            max_batch_cost: None,
            preferred_sizes: Vec::new(),
        }
    }
}

/// The largest `max_size` accepted: the metrics keep a counter per batch size, and a larger batch
/// of requests is a misconfiguration, not a workload.
pub const MAX_BATCH_SIZE: usize = 1 << 20;

impl Config {
    /// Checks every field; sorts and deduplicates `preferred_sizes`.
    pub fn validate(&mut self) -> Result<()> {
        let bad = |msg: String| Err(SchedulerError::Config(msg));
        if self.max_size == 0 || self.max_size > MAX_BATCH_SIZE {
            return bad(format!(
                "max_size must be in 1..={MAX_BATCH_SIZE}, got {}",
                self.max_size
            ));
        }
        if self.min_size == 0 || self.min_size > self.max_size {
            return bad(format!(
                "min_size must be in 1..=max_size ({}), got {}",
                self.max_size, self.min_size
            ));
        }
        if self.max_queue_size == 0 {
            return bad("max_queue_size must be >= 1, got 0".into());
        }
        if self.max_batch_cost == Some(0) {
            return bad("max_batch_cost must be >= 1 (or None), got 0".into());
        }
        self.preferred_sizes.sort_unstable();
        self.preferred_sizes.dedup();
        if let Some(&p) = self
            .preferred_sizes
            .iter()
            .find(|&&p| p < self.min_size || p > self.max_size)
        {
            return bad(format!(
                "preferred sizes must be in min_size..=max_size ({}..={}), got {p}",
                self.min_size, self.max_size
            ));
        }
        Ok(())
    }
}

/// One request as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Caller-chosen id, unique among the requests queued or running.
    pub id: u64,
    /// Cost against `max_batch_cost`, e.g. the token count.
    pub cost: u64,
    /// Only requests of one bucket key are batched together (e.g. a length bucket).
    pub bucket: u64,
    /// Lower is served first; FIFO within a level.
    pub priority: u32,
    /// After this instant the request is timed out instead of run.
    pub deadline: Option<Instant>,
}

impl Request {
    /// A request of cost 1 in bucket 0 at priority 0 without a deadline.
    pub fn new(id: u64) -> Self {
        Request {
            id,
            cost: 1,
            bucket: 0,
            priority: 0,
            deadline: None,
        }
    }
}

/// A batch to run: the request ids in dispatch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Request ids, best first.
    pub ids: Vec<u64>,
    /// Their common bucket key.
    pub bucket: u64,
    /// Their summed cost.
    pub cost: u64,
}

/// What [`Scheduler::next_batch`] hands out.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Run this batch, then report it with [`Scheduler::complete`].
    Batch(Batch),
    /// These requests passed their deadline while waiting.
    TimedOut(Vec<u64>),
    /// The wait timed out with nothing to do.
    Idle,
    /// Closed and drained: the executor can stop.
    Closed,
}

/// A thread-safe [`BatchQueue`] on the real clock, with blocking waits.
#[derive(Debug)]
pub struct Scheduler {
    queue: Mutex<BatchQueue>,
    changed: Condvar,
    /// Wakes [`Scheduler::expire_wait`]: a new deadline, close, or the queue drained.
    deadlines_changed: Condvar,
}

impl Scheduler {
    /// A scheduler with this policy.
    pub fn new(config: Config) -> Result<Self> {
        Ok(Scheduler {
            queue: Mutex::new(BatchQueue::new(config)?),
            changed: Condvar::new(),
            deadlines_changed: Condvar::new(),
        })
    }

    // A panic while holding the lock cannot leave the queue half-updated in a way that matters
    // more than stopping service, so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, BatchQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The policy in force.
    pub fn config(&self) -> Config {
        self.lock().config().clone()
    }

    /// Queues a request, or refuses it at once (queue full, closed, duplicate id, cost too high).
    pub fn submit(&self, req: Request) -> Result<()> {
        self.lock().submit(req, Instant::now())?;
        self.changed.notify_one();
        if req.deadline.is_some() {
            self.deadlines_changed.notify_all();
        }
        Ok(())
    }

    /// Removes a waiting request; false if it is not waiting any more.
    pub fn cancel(&self, id: u64) -> bool {
        self.lock().cancel(id)
    }

    /// Stops intake; waiting requests are still dispatched. Wakes every waiting executor.
    pub fn close(&self) {
        self.lock().close();
        self.changed.notify_all();
        self.deadlines_changed.notify_all();
    }

    /// Whether intake has stopped.
    pub fn is_closed(&self) -> bool {
        self.lock().is_closed()
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no request is waiting.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Blocks until a batch is due, requests time out, the scheduler is closed and drained, or
    /// `timeout` passes (None: no limit).
    pub fn next_batch(&self, timeout: Option<Duration>) -> Next {
        self.next_batch_at(timeout).0
    }

    /// [`Scheduler::next_batch`], with the instant the decision was taken at (what deadlines
    /// were compared with), so that a test can check each decision exactly.
    pub fn next_batch_at(&self, timeout: Option<Duration>) -> (Next, Instant) {
        // A timeout too long for the clock is no limit.
        let give_up = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut q = self.lock();
        loop {
            let now = Instant::now();
            let wake = match q.poll(now) {
                Poll::Batch(b) => {
                    let more = !q.is_empty();
                    drop(q);
                    if more {
                        // Another executor may be able to take the rest.
                        self.changed.notify_one();
                    }
                    return (Next::Batch(b), now);
                }
                Poll::TimedOut(ids) => return (Next::TimedOut(ids), now),
                Poll::Closed => {
                    drop(q);
                    self.changed.notify_all();
                    self.deadlines_changed.notify_all();
                    return (Next::Closed, now);
                }
                Poll::Wait(wake) => wake,
            };
            let until = match (wake, give_up) {
                (Some(w), Some(g)) => Some(w.min(g)),
                (w, g) => w.or(g),
            };
            if give_up.is_some_and(|g| g <= now) {
                return (Next::Idle, now);
            }
            q = match until {
                None => self.changed.wait(q).unwrap_or_else(|e| e.into_inner()),
                Some(u) => {
                    self.changed
                        .wait_timeout(q, u.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Blocks until waiting requests pass their deadline and returns them (removed from the
    /// queue), so that timeouts are answered on time even while every executor is busy running
    /// a batch. Returns an empty list when `timeout` passes first, and None once the scheduler
    /// is closed and empty.
    pub fn expire_wait(&self, timeout: Option<Duration>) -> Option<Vec<u64>> {
        let give_up = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut q = self.lock();
        loop {
            let now = Instant::now();
            let expired = q.expire(now);
            if !expired.is_empty() {
                return Some(expired);
            }
            if q.is_closed() && q.is_empty() {
                return None;
            }
            if give_up.is_some_and(|g| g <= now) {
                return Some(Vec::new());
            }
            let until = match (q.next_deadline(), give_up) {
                (Some(d), Some(g)) => Some(d.min(g)),
                (d, g) => d.or(g),
            };
            q = match until {
                None => self.deadlines_changed.wait(q).unwrap_or_else(|e| e.into_inner()),
                Some(u) => {
                    self.deadlines_changed
                        .wait_timeout(q, u.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Reports how dispatched requests ended; returns how many of `ids` were in flight.
    pub fn complete(&self, ids: &[u64], outcome: Outcome) -> usize {
        self.lock().complete(ids, outcome, Instant::now())
    }

    /// A copy of the counters and histograms.
    pub fn metrics(&self) -> Metrics {
        self.lock().metrics()
    }
}
