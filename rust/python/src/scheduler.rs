//! `deepseek_rs._core.Scheduler`: the dynamic batching engine for `deepseek_rs.DynamicBatcher`.
//!
//! Python keeps the payloads (tensors and futures) keyed by request id; this class only decides
//! which ids run together and when. `next_batch` waits in Rust with the GIL released.

use std::time::{Duration, Instant};

use deepseek_scheduler as engine;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::args::arg;
use crate::errors::{EngineError, value_error};

fn histogram<'py>(py: Python<'py>, h: &engine::LatencyHistogram) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("count", h.count())?;
    d.set_item("sum", h.sum().as_secs_f64())?;
    d.set_item("max", h.max().as_secs_f64())?;
    for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        d.set_item(name, h.quantile(q).as_secs_f64())?;
    }
    let mut seen = 0;
    let buckets: Vec<(f64, u64)> = h
        .counts()
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            seen += c;
            (engine::LatencyHistogram::bound(i).as_secs_f64(), seen)
        })
        .collect();
    d.set_item("buckets", buckets)?;
    Ok(d)
}

/// Dynamic batching scheduler (see the `deepseek-scheduler` crate).
#[pyclass(frozen, module = "deepseek_rs._core")]
pub struct Scheduler {
    inner: engine::Scheduler,
    /// Zero of the nanosecond clock that `submit` and `next_batch_at` report instants on.
    epoch: Instant,
}

fn kind(next: engine::Next) -> (&'static str, Vec<u64>, u64) {
    match next {
        engine::Next::Batch(b) => ("batch", b.ids, b.bucket),
        engine::Next::TimedOut(ids) => ("timed_out", ids, 0),
        engine::Next::Idle => ("idle", Vec::new(), 0),
        engine::Next::Closed => ("closed", Vec::new(), 0),
    }
}

impl Scheduler {
    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[pymethods]
impl Scheduler {
    // `text_signature` shows the defaults that PyO3 cannot render from Rust expressions.
    #[new]
    #[pyo3(
        signature = (max_size=32, min_size=4, max_queue_delay=Duration::from_millis(5), max_queue_size=1024, max_batch_cost=None, preferred_sizes=None),
        text_signature = "(max_size=32, min_size=4, max_queue_delay=0.005, max_queue_size=1024, max_batch_cost=None, preferred_sizes=None)"
    )]
    fn new(
        #[pyo3(from_py_with = arg::max_size)] max_size: usize,
        #[pyo3(from_py_with = arg::min_size)] min_size: usize,
        #[pyo3(from_py_with = arg::max_queue_delay)] max_queue_delay: Duration,
        #[pyo3(from_py_with = arg::max_queue_size)] max_queue_size: usize,
        #[pyo3(from_py_with = arg::max_batch_cost)] max_batch_cost: Option<u64>,
        #[pyo3(from_py_with = arg::preferred_sizes)] preferred_sizes: Option<Vec<usize>>,
    ) -> PyResult<Self> {
        let config = engine::Config {
            max_size,
            min_size,
            max_queue_delay,
            max_queue_size,
            max_batch_cost,
            preferred_sizes: preferred_sizes.unwrap_or_default(),
        };
        let inner = engine::Scheduler::new(config).map_err(EngineError::from)?;
        Ok(Scheduler {
            inner,
            epoch: Instant::now(),
        })
    }

    /// Queue request `id`; raises QueueFullError, ShutdownError or InvalidValueError at once.
    /// Returns its deadline in nanoseconds on the scheduler's clock (see `next_batch_at`), or
    /// None without one.
    #[pyo3(signature = (id, cost=1, bucket=0, priority=0, timeout=None))]
    fn submit(
        &self,
        #[pyo3(from_py_with = arg::id)] id: u64,
        #[pyo3(from_py_with = arg::cost)] cost: u64,
        #[pyo3(from_py_with = arg::bucket)] bucket: u64,
        #[pyo3(from_py_with = arg::priority)] priority: u32,
        #[pyo3(from_py_with = arg::timeout)] timeout: Option<Duration>,
    ) -> PyResult<Option<u64>> {
        // A timeout too long for the clock is no deadline.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let req = engine::Request {
            id,
            cost,
            bucket,
            priority,
            deadline,
        };
        self.inner.submit(req).map_err(EngineError::from)?;
        Ok(deadline.map(|d| self.nanos(d)))
    }

    /// Remove a waiting request; False if it is no longer waiting.
    fn cancel(&self, #[pyo3(from_py_with = arg::id)] id: u64) -> bool {
        self.inner.cancel(id)
    }

    /// Wait (GIL released) for the next thing to do: ("batch", ids, bucket), ("timed_out", ids, 0),
    /// ("idle", [], 0) when `timeout` passes, or ("closed", [], 0) once closed and drained.
    #[pyo3(signature = (timeout=None))]
    fn next_batch(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = arg::timeout)] timeout: Option<Duration>,
    ) -> PyResult<(&'static str, Vec<u64>, u64)> {
        Ok(kind(py.detach(|| self.inner.next_batch(timeout))))
    }

    /// `next_batch`, plus the instant the decision was taken at (the one deadlines were
    /// compared with), in nanoseconds on the clock `submit` reports deadlines on: a batch was
    /// taken strictly before each of its deadlines, a timeout at or after it.
    #[pyo3(signature = (timeout=None))]
    fn next_batch_at(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = arg::timeout)] timeout: Option<Duration>,
    ) -> PyResult<(&'static str, Vec<u64>, u64, u64)> {
        let (next, at) = py.detach(|| self.inner.next_batch_at(timeout));
        let (kind, ids, bucket) = kind(next);
        Ok((kind, ids, bucket, self.nanos(at)))
    }

    /// Wait (GIL released) for waiting requests to pass their deadline and return their ids
    /// (taken out of the queue); [] when `timeout` passes first, None once closed and empty.
    #[pyo3(signature = (timeout=None))]
    fn expire_wait(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = arg::timeout)] timeout: Option<Duration>,
    ) -> PyResult<Option<Vec<u64>>> {
        Ok(py.detach(|| self.inner.expire_wait(timeout)))
    }

    /// Report dispatched requests as "completed", "failed" or "cancelled"; returns how many were
    /// in flight.
    #[pyo3(signature = (ids, outcome=String::from("completed")), text_signature = "($self, ids, outcome='completed')")]
    fn complete(
        &self,
        #[pyo3(from_py_with = arg::ids)] ids: Vec<u64>,
        #[pyo3(from_py_with = arg::outcome)] outcome: String,
    ) -> PyResult<usize> {
        let outcome = match outcome.as_str() {
            "completed" => engine::Outcome::Completed,
            "failed" => engine::Outcome::Failed,
            "cancelled" => engine::Outcome::Cancelled,
            other => {
                return Err(value_error(format!(
                    "outcome must be 'completed', 'failed' or 'cancelled', got {other:?}"
                )));
            }
        };
        Ok(self.inner.complete(&ids, outcome))
    }

    /// Stop intake; requests already accepted are still handed out.
    fn close(&self) {
        self.inner.close()
    }

    /// Whether intake has stopped.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Requests waiting.
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// The policy: max_size, min_size, max_queue_delay, max_queue_size, max_batch_cost, preferred_sizes.
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.config();
        let d = PyDict::new(py);
        d.set_item("max_size", c.max_size)?;
        d.set_item("min_size", c.min_size)?;
        d.set_item("max_queue_delay", c.max_queue_delay.as_secs_f64())?;
        d.set_item("max_queue_size", c.max_queue_size)?;
        d.set_item("max_batch_cost", c.max_batch_cost)?;
        d.set_item("preferred_sizes", c.preferred_sizes)?;
        Ok(d)
    }

    /// Counters, the batch-size histogram and the queue-time and latency histograms (seconds).
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.inner.metrics();
        let d = PyDict::new(py);
        d.set_item("accepted", m.accepted)?;
        d.set_item("rejected", m.rejected)?;
        d.set_item("timed_out", m.timed_out)?;
        d.set_item("cancelled", m.cancelled)?;
        d.set_item("completed", m.completed)?;
        d.set_item("failed", m.failed)?;
        d.set_item("batches", m.batches)?;
        d.set_item("mean_batch_size", m.mean_batch_size())?;
        d.set_item("batch_sizes", m.batch_sizes.clone())?;
        d.set_item("queue_depth", m.queue_depth)?;
        d.set_item("in_flight", m.in_flight)?;
        d.set_item("queue_time", histogram(py, &m.queue_time)?)?;
        d.set_item("latency", histogram(py, &m.latency)?)?;
        Ok(d)
    }
}
