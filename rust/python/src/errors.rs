//! The one place where engine errors become Python exceptions.
//!
//! The exception classes live in `deepseek_rs.errors` (Python), because each inherits both
//! `DeepseekError` and the builtin a torch user expects (`ValueError`, `TypeError`).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// An error from any engine crate.
pub enum EngineError {
    Router(deepseek_router::RouterError),
    Dispatch(deepseek_dispatch::DispatchError),
    Experts(deepseek_experts::ExpertsError),
    Scheduler(deepseek_scheduler::SchedulerError),
    Filter(deepseek_textfilter::FilterError),
}

impl From<deepseek_router::RouterError> for EngineError {
    fn from(e: deepseek_router::RouterError) -> Self {
        EngineError::Router(e)
    }
}

impl From<deepseek_dispatch::DispatchError> for EngineError {
    fn from(e: deepseek_dispatch::DispatchError) -> Self {
        EngineError::Dispatch(e)
    }
}

impl From<deepseek_experts::ExpertsError> for EngineError {
    fn from(e: deepseek_experts::ExpertsError) -> Self {
        EngineError::Experts(e)
    }
}

impl From<deepseek_scheduler::SchedulerError> for EngineError {
    fn from(e: deepseek_scheduler::SchedulerError) -> Self {
        EngineError::Scheduler(e)
    }
}

impl From<deepseek_textfilter::FilterError> for EngineError {
    fn from(e: deepseek_textfilter::FilterError) -> Self {
        EngineError::Filter(e)
    }
}

impl From<EngineError> for PyErr {
    fn from(e: EngineError) -> PyErr {
        use deepseek_dispatch::DispatchError as D;
        use deepseek_router::RouterError as R;
        use deepseek_scheduler::SchedulerError as S;
        match e {
            EngineError::Router(e @ R::Shape(_)) => shape_error(e.to_string()),
            EngineError::Dispatch(e @ D::Shape(_)) => shape_error(e.to_string()),
            EngineError::Experts(e @ deepseek_experts::ExpertsError::Shape(_)) => shape_error(e.to_string()),
            EngineError::Router(e) => value_error(e.to_string()),
            EngineError::Experts(e) => value_error(e.to_string()),
            EngineError::Dispatch(e) => value_error(e.to_string()),
            EngineError::Scheduler(e @ S::QueueFull(_)) => queue_full_error(e.to_string()),
            EngineError::Scheduler(e @ S::Closed) => shutdown_error(e.to_string()),
            EngineError::Scheduler(e) => value_error(e.to_string()),
            EngineError::Filter(e @ deepseek_textfilter::FilterError::Io { .. }) => shard_error(e.to_string()),
            EngineError::Filter(e) => value_error(e.to_string()),
        }
    }
}

fn raise(cell: &'static PyOnceLock<Py<PyType>>, name: &str, msg: String) -> PyErr {
    Python::attach(|py| {
        let class = cell.get_or_try_init(py, || {
            let class = py.import("deepseek_rs.errors")?.getattr(name)?;
            Ok::<_, PyErr>(class.cast_into::<PyType>()?.unbind())
        });
        match class {
            Ok(class) => PyErr::from_type(class.bind(py).clone(), msg),
            Err(import_failed) => import_failed,
        }
    })
}

/// `deepseek_rs.ShapeError` (a `ValueError`).
pub fn shape_error(msg: String) -> PyErr {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    raise(&CLASS, "ShapeError", msg)
}

/// `deepseek_rs.DTypeError` (a `TypeError`).
pub fn dtype_error(msg: String) -> PyErr {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    raise(&CLASS, "DTypeError", msg)
}

/// `deepseek_rs.InvalidValueError` (a `ValueError`).
pub fn value_error(msg: String) -> PyErr {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    raise(&CLASS, "InvalidValueError", msg)
}

/// `deepseek_rs.QueueFullError` (a `RuntimeError`): backpressure, retry later.
pub fn queue_full_error(msg: String) -> PyErr {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    raise(&CLASS, "QueueFullError", msg)
}

/// `deepseek_rs.ShutdownError` (a `RuntimeError`): the scheduler takes no new requests.
pub fn shutdown_error(msg: String) -> PyErr {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    raise(&CLASS, "ShutdownError", msg)
}

/// `deepseek_rs.ShardError` (an `OSError`).
pub fn shard_error(msg: String) -> PyErr {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    raise(&CLASS, "ShardError", msg)
}
