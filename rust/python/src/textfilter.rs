//! Bindings of the data-filter engine (`deepseek_textfilter`): signals, hashed features, and
//! the streaming JSONL reader and writer. All work runs with the GIL released.

use std::path::PathBuf;
use std::sync::Mutex;

use deepseek_textfilter as tf;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use serde_json::{Map, Value};

use crate::args::{arg, extract};
use crate::errors::{EngineError, shape_error, value_error};

/// The names of the signals, in the column order of `compute_signals`.
#[pyfunction]
pub fn signal_names() -> Vec<&'static str> {
    tf::SIGNAL_NAMES.to_vec()
}

fn signals_array<'py>(py: Python<'py>, texts: &[impl AsRef<str> + Sync]) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let n = texts.len();
    let flat = py.detach(|| tf::compute_batch(texts));
    flat.into_pyarray(py)
        .reshape([n, tf::NUM_SIGNALS])
        .map_err(|e| shape_error(e.to_string()))
}

/// Every signal of every text: float64 `[len(texts), len(signal_names())]`.
#[pyfunction]
pub fn compute_signals<'py>(
    py: Python<'py>,
    #[pyo3(from_py_with = arg::texts)] texts: Vec<String>,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    signals_array(py, &texts)
}

/// DSIR hashed unigram + bigram features as CSR `(indptr int64, buckets uint32, counts uint32)`.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn hashed_features<'py>(
    py: Python<'py>,
    #[pyo3(from_py_with = arg::texts)] texts: Vec<String>,
    #[pyo3(from_py_with = arg::buckets)] buckets: u32,
) -> PyResult<(
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<u32>>,
)> {
    let (indptr, idx, cnt) = py
        .detach(|| tf::features_batch(&texts, buckets))
        .map_err(EngineError::from)?;
    Ok((indptr.into_pyarray(py), idx.into_pyarray(py), cnt.into_pyarray(py)))
}

/// DSIR log importance weight of every text, given `log p_target - log p_raw` per bucket;
/// with `per_feature`, divided by the text's number of hashed features.
#[pyfunction]
#[pyo3(signature = (texts, log_ratio, per_feature = false))]
pub fn dsir_log_importance<'py>(
    py: Python<'py>,
    #[pyo3(from_py_with = arg::texts)] texts: Vec<String>,
    log_ratio: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = arg::per_feature)] per_feature: bool,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    extract!(log_ratio: PyReadonlyArray1<f64>);
    let lr = log_ratio
        .as_slice()
        .map_err(|_| shape_error("log_ratio must be C-contiguous".into()))?;
    let w = py
        .detach(|| tf::log_importance_batch(&texts, lr, per_feature))
        .map_err(EngineError::from)?;
    Ok(w.into_pyarray(py))
}

/// Documents and bad lines read together from a shard.
#[pyclass(module = "deepseek_rs._core", frozen)]
pub struct DocBatch {
    batch: tf::jsonl::Batch,
}

#[pymethods]
impl DocBatch {
    fn __len__(&self) -> usize {
        self.batch.records.len()
    }

    /// The `text` of every document.
    #[getter]
    fn texts(&self) -> Vec<&str> {
        self.batch.records.iter().map(|r| r.text.as_str()).collect()
    }

    /// The `id` of every document (non-string ids as JSON text), None where absent.
    #[getter]
    fn ids(&self) -> Vec<Option<&str>> {
        self.batch.records.iter().map(|r| r.id.as_deref()).collect()
    }

    /// The 1-based line number of every document in its shard.
    #[getter]
    fn line_numbers<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        let v: Vec<i64> = self.batch.records.iter().map(|r| r.line as i64).collect();
        v.into_pyarray(py)
    }

    /// The bad lines of this batch as (line number, reason).
    #[getter]
    fn errors(&self) -> Vec<(u64, String)> {
        self.batch.errors.iter().map(|e| (e.line, e.message.clone())).collect()
    }

    /// Every signal of every document (see `compute_signals`).
    fn signals<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let texts: Vec<&str> = self.batch.records.iter().map(|r| r.text.as_str()).collect();
        signals_array(py, &texts)
    }
}

/// A streaming reader of one JSONL shard (plain, .gz or .zst): iterate to get `DocBatch`es.
#[pyclass(module = "deepseek_rs._core", frozen)]
pub struct JsonlReader {
    inner: Mutex<tf::jsonl::JsonlReader>,
}

#[pymethods]
impl JsonlReader {
    #[new]
    #[pyo3(signature = (path, batch_docs = 4096, batch_bytes = 64 << 20, max_line_bytes = 32 << 20))]
    fn new(
        py: Python<'_>,
        #[pyo3(from_py_with = arg::path)] path: PathBuf,
        #[pyo3(from_py_with = arg::batch_docs)] batch_docs: usize,
        #[pyo3(from_py_with = arg::batch_bytes)] batch_bytes: usize,
        #[pyo3(from_py_with = arg::max_line_bytes)] max_line_bytes: usize,
    ) -> PyResult<Self> {
        let limits = tf::jsonl::ReadLimits {
            batch_docs,
            batch_bytes,
            max_line_bytes,
        };
        let r = py
            .detach(|| tf::jsonl::JsonlReader::open(&path, limits))
            .map_err(EngineError::from)?;
        Ok(JsonlReader { inner: Mutex::new(r) })
    }

    /// Lines read so far (documents, bad lines and blank lines).
    #[getter]
    fn lines_read(&self, py: Python<'_>) -> u64 {
        // Locks are taken with the GIL released: a thread inside `__next__` holds this lock
        // while detached and needs the GIL back to return.
        py.detach(|| self.inner.lock().map(|r| r.lines_read()).unwrap_or(0))
    }

    /// Blank lines read so far (skipped: neither documents nor errors).
    #[getter]
    fn blank_lines(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.inner.lock().map(|r| r.blank_lines()).unwrap_or(0))
    }

    /// The damage found when a compressed shard was opened (its members/frames are verified
    /// before any line is read), or None: a dict with `offset` (compressed byte offset of the
    /// first member/frame that failed), `message`, `read_bytes` (decompressed bytes read, up to
    /// the last line end before the damage), `withheld_bytes` and `withheld_lines` (never read).
    /// Iteration ends with a `ShardError` saying the same once the verified lines are read.
    #[getter]
    fn damage<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, pyo3::types::PyDict>>> {
        let d = py.detach(|| self.inner.lock().ok().and_then(|r| r.damage().cloned()));
        let Some(d) = d else { return Ok(None) };
        let out = pyo3::types::PyDict::new(py);
        out.set_item("offset", d.offset)?;
        out.set_item("message", d.message)?;
        out.set_item("read_bytes", d.read_bytes)?;
        out.set_item("withheld_bytes", d.withheld_bytes)?;
        out.set_item("withheld_lines", d.withheld_lines)?;
        Ok(Some(out))
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<DocBatch>> {
        let batch = py.detach(|| {
            let mut r = self.inner.lock().map_err(|_| {
                tf::FilterError::InvalidArgument("the reader was poisoned by an earlier failure".into())
            })?;
            r.next_batch()
        });
        Ok(batch.map_err(EngineError::from)?.map(|batch| DocBatch { batch }))
    }
}

/// A JSONL shard written atomically (to `<path>.tmp`, renamed by `finish`).
#[pyclass(module = "deepseek_rs._core", frozen)]
pub struct JsonlWriter {
    inner: Mutex<Option<tf::jsonl::JsonlWriter>>,
}

fn finished() -> PyErr {
    value_error("the writer is already finished".into())
}

fn number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

#[pymethods]
impl JsonlWriter {
    #[new]
    fn new(py: Python<'_>, #[pyo3(from_py_with = arg::path)] path: PathBuf) -> PyResult<Self> {
        let w = py
            .detach(|| tf::jsonl::JsonlWriter::create(&path))
            .map_err(EngineError::from)?;
        Ok(JsonlWriter {
            inner: Mutex::new(Some(w)),
        })
    }

    /// Lines written so far.
    #[getter]
    fn lines(&self) -> u64 {
        self.inner
            .lock()
            .ok()
            .and_then(|w| w.as_ref().map(|w| w.lines()))
            .unwrap_or(0)
    }

    /// Writes the documents `rows` of `batch`, unchanged, or with a `"filter"` field
    /// `{"keep", "reason", "signals": {name: value}}` when `signals` (one row per written
    /// document), `names`, `keep` and `reasons` are given.
    #[pyo3(signature = (batch, rows, signals = None, names = None, keep = None, reasons = None))]
    #[allow(clippy::too_many_arguments)]
    fn write<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = arg::batch)] batch: Bound<'py, DocBatch>,
        rows: &Bound<'py, PyAny>,
        signals: Option<&Bound<'py, PyAny>>,
        #[pyo3(from_py_with = arg::names)] names: Option<Vec<String>>,
        keep: Option<&Bound<'py, PyAny>>,
        #[pyo3(from_py_with = arg::reasons)] reasons: Option<Vec<Option<String>>>,
    ) -> PyResult<()> {
        let batch = batch.get();
        extract!(
            rows: PyReadonlyArray1<i64>,
            signals: Option<PyReadonlyArray2<f64>>,
            keep: Option<PyReadonlyArray1<bool>>,
        );
        let rows = rows
            .as_slice()
            .map_err(|_| shape_error("rows must be C-contiguous".into()))?;
        let n = batch.batch.records.len();
        if let Some(&bad) = rows.iter().find(|&&r| r < 0 || r as usize >= n) {
            return Err(value_error(format!(
                "row {bad} is out of range for a batch of {n} documents"
            )));
        }
        let annotation = match (signals, names, keep, reasons) {
            (None, None, None, None) => None,
            (Some(s), Some(names), Some(keep), Some(reasons)) => {
                let shape = s.shape();
                if shape != [rows.len(), names.len()] || keep.len() != rows.len() || reasons.len() != rows.len() {
                    return Err(shape_error(format!(
                        "signals {shape:?}, keep [{}] and reasons [{}] must be [rows, names] = [{}, {}], [rows], [rows]",
                        keep.len(),
                        reasons.len(),
                        rows.len(),
                        names.len()
                    )));
                }
                let s = s
                    .as_slice()
                    .map_err(|_| shape_error("signals must be C-contiguous".into()))?
                    .to_vec();
                let keep = keep
                    .as_slice()
                    .map_err(|_| shape_error("keep must be C-contiguous".into()))?
                    .to_vec();
                Some((s, names, keep, reasons))
            }
            _ => return Err(value_error("signals, names, keep and reasons go together".into())),
        };
        py.detach(|| -> Result<(), tf::FilterError> {
            use rayon::prelude::*;
            let finished = || tf::FilterError::InvalidArgument("the writer is already finished".into());
            let mut guard = self.inner.lock().map_err(|_| finished())?;
            let writer = guard.as_mut().ok_or_else(finished)?;
            let records = &batch.batch.records;
            match &annotation {
                None => {
                    for &r in rows {
                        writer.write_line(&records[r as usize].raw)?;
                    }
                }
                Some((s, names, keep, reasons)) => {
                    let k = names.len();
                    let lines: Vec<Vec<u8>> = rows
                        .par_iter()
                        .enumerate()
                        .map(|(i, &r)| {
                            let sig: Map<String, Value> = names
                                .iter()
                                .zip(&s[i * k..(i + 1) * k])
                                .map(|(name, &v)| (name.clone(), number(v)))
                                .collect();
                            let mut f = Map::new();
                            f.insert("keep".into(), Value::Bool(keep[i]));
                            f.insert("reason".into(), reasons[i].clone().map_or(Value::Null, Value::String));
                            f.insert("signals".into(), Value::Object(sig));
                            tf::jsonl::annotate(&records[r as usize].raw, "filter", Value::Object(f))
                        })
                        .collect::<Result<_, _>>()?;
                    for l in lines {
                        writer.write_line(&l)?;
                    }
                }
            }
            Ok(())
        })
        .map_err(EngineError::from)?;
        Ok(())
    }

    /// Flushes, syncs and renames the shard into place.
    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        let w = py.detach(|| self.inner.lock().ok().and_then(|mut w| w.take()));
        let w = w.ok_or_else(finished)?;
        py.detach(|| w.finish()).map_err(EngineError::from)?;
        Ok(())
    }

    /// Abandons the shard: the temporary file is removed and nothing is renamed.
    fn abort(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            if let Ok(mut w) = self.inner.lock() {
                drop(w.take());
            }
        });
        Ok(())
    }
}
