//! Counters and latency histograms of a scheduler.

use std::time::Duration;

/// Histogram buckets per doubling of the latency: bounds grow by 2^(1/4), so a percentile read
/// from the histogram is at most 19% above the true value.
const STEPS_PER_OCTAVE: f64 = 4.0;
/// Bucket upper bounds run from 1 us to 2^27 us (about 134 s); slower samples go to the last bucket.
const BUCKETS: usize = 27 * 4 + 1;

/// A log-scale latency histogram with constant-time recording.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    count: u64,
    sum: Duration,
    max: Duration,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: Duration::ZERO,
            max: Duration::ZERO,
        }
    }
}

impl LatencyHistogram {
    /// The upper bound of bucket `i`.
    pub fn bound(i: usize) -> Duration {
        Duration::from_secs_f64(2f64.powf(i as f64 / STEPS_PER_OCTAVE) * 1e-6)
    }

    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        let i = if us <= 1.0 {
            0
        } else {
            ((us.log2() * STEPS_PER_OCTAVE).ceil() as usize).min(BUCKETS - 1)
        };
        // Floating rounding can put a sample exactly on a bound one bucket low.
        let i = if i + 1 < BUCKETS && Self::bound(i) < d {
            i + 1
        } else {
            i
        };
        self.counts[i] += 1;
        self.count += 1;
        self.sum += d;
        self.max = self.max.max(d);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the samples.
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// Largest sample.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Samples per bucket, bucket `i` holding samples in `(bound(i - 1), bound(i)]`.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The `q`-quantile (0 <= q <= 1): the upper bound of the bucket holding the sample of that
    /// rank, capped at the largest sample. Zero when there are no samples.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::bound(i).min(self.max);
            }
        }
        self.max
    }
}

/// How a dispatched request ended, as the executor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The model ran and the caller got its answer.
    Completed,
    /// The model raised (or returned a bad output) for this request.
    Failed,
    /// The caller cancelled it after it was taken into a batch but before it ran.
    Cancelled,
}

/// A snapshot of a scheduler's counters and histograms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Requests taken into the queue.
    pub accepted: u64,
    /// Requests refused at intake: queue full or scheduler closed.
    pub rejected: u64,
    /// Requests whose deadline passed while they waited (never run).
    pub timed_out: u64,
    /// Requests cancelled by their caller.
    pub cancelled: u64,
    /// Requests answered by the model.
    pub completed: u64,
    /// Requests for which the model failed.
    pub failed: u64,
    /// Batches dispatched.
    pub batches: u64,
    /// `batch_sizes[n]`: batches of `n` requests (index 0 unused).
    pub batch_sizes: Vec<u64>,
    /// Requests waiting now.
    pub queue_depth: usize,
    /// Requests dispatched and not yet reported complete.
    pub in_flight: usize,
    /// Time from arrival to dispatch.
    pub queue_time: LatencyHistogram,
    /// Time from arrival to completion (completed or failed requests).
    pub latency: LatencyHistogram,
}

impl Metrics {
    pub(crate) fn new(max_size: usize) -> Self {
        Metrics {
            batch_sizes: vec![0; max_size + 1],
            ..Default::default()
        }
    }

    /// Mean number of requests per batch (0 before the first batch).
    pub fn mean_batch_size(&self) -> f64 {
        if self.batches == 0 {
            return 0.0;
        }
        let total: u64 = self.batch_sizes.iter().enumerate().map(|(n, &c)| n as u64 * c).sum();
        total as f64 / self.batches as f64
    }
}
