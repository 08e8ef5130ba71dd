//! Bindings of `deepseek-experts`: SwiGLU experts over expert-sorted rows, forward and
//! backward, and the batch-invariant `linear_rows`, each in the instruction-set tier `isa`
//! names (None: the best this CPU runs).

use deepseek_experts::Isa;
use numpy::{
    PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadwriteArray2, PyReadwriteArray3, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::args::{arg, extract};
use crate::errors::{EngineError, shape_error, value_error};
use crate::{slice, slice_mut};

/// The tier `isa` names, or the best this CPU runs when None; an unknown name or a tier this
/// CPU does not run is an `InvalidValueError` naming it and the tiers available.
fn tier(isa: Option<String>) -> PyResult<Isa> {
    match isa {
        None => Ok(Isa::best()),
        Some(name) => {
            let why = match name.parse::<Isa>() {
                Ok(isa) if isa.supported() => return Ok(isa),
                Ok(_) => "a tier this CPU cannot run",
                Err(_) => "an unknown tier",
            };
            let available: Vec<String> = cpu_isas().iter().map(|n| format!("'{n}'")).collect();
            Err(value_error(format!(
                "isa must be one of the tiers this CPU runs, {} (best first), or None, got {name:?} ({why})",
                available.join(", ")
            )))
        }
    }
}

/// The instruction-set tiers this CPU runs the expert kernels in, best first (the last is
/// always "generic").
#[pyfunction]
pub fn cpu_isas() -> Vec<&'static str> {
    Isa::available().into_iter().map(Isa::name).collect()
}

/// `out[r, j] = x[r] . w[j]` for `x` [R, K], `w` [N, K] and `out` [R, N], float32: a linear
/// layer without bias whose rows are bitwise independent of the other rows of the call.
#[pyfunction]
#[pyo3(signature = (x, w, out, *, isa=None))]
pub fn linear_rows<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = arg::isa)] isa: Option<String>,
) -> PyResult<()> {
    extract!(x: PyReadonlyArray2<f32>, w: PyReadonlyArray2<f32>, mut out: PyReadwriteArray2<f32>);
    let isa = tier(isa)?;
    let (xs, ws, os) = (x.shape(), w.shape(), out.shape());
    let (rows, inputs, outputs) = (xs[0], xs[1], ws[0]);
    if ws[1] != inputs || os[0] != rows || os[1] != outputs {
        return Err(shape_error(format!(
            "linear_rows: x {xs:?} (want [R, K]), w {ws:?} (want [N, K]), out {os:?} (want [R, N]) disagree"
        )));
    }
    let (xv, wv) = (slice(&x, "x")?, slice(&w, "w")?);
    let ov = slice_mut(&mut out, "out")?;
    py.detach(|| deepseek_experts::linear_rows(xv, wv, rows, inputs, outputs, ov, isa))
        .map_err(|e| EngineError::from(e).into())
}

/// The expert shapes, checked against each other: `buf` [N, H], `gate_up` [E, 2F, H], `down` [E, H, F].
fn dims_of(
    buf: &PyReadonlyArray2<'_, f32>,
    gate_up: &PyReadonlyArray3<'_, f32>,
    down: &PyReadonlyArray3<'_, f32>,
) -> PyResult<deepseek_experts::Dims> {
    let (gu, dn) = (gate_up.shape(), down.shape());
    let dims = deepseek_experts::Dims {
        hidden: gu[2],
        intermediate: dn[2],
        experts: gu[0],
    };
    if gu[1] != 2 * dims.intermediate || dn[0] != dims.experts || dn[1] != dims.hidden || buf.shape()[1] != dims.hidden
    {
        return Err(shape_error(format!(
            "expert weights disagree: buf {:?}, gate_up {gu:?} (want [E, 2F, H]), down {dn:?} (want [E, H, F])",
            buf.shape()
        )));
    }
    Ok(dims)
}

/// Runs the experts whose segment of the expert-sorted `buf` [N, H] has 1 to `max_rows` rows
/// into `out` [N, H] (and `h` [N, 2F] when given), float32 only; returns how many ran.
#[pyfunction]
#[pyo3(signature = (buf, gate_up, down, expert_offsets, max_rows, out, h=None, *, isa=None))]
#[allow(clippy::too_many_arguments)]
pub fn swiglu_experts_forward<'py>(
    py: Python<'py>,
    buf: &Bound<'py, PyAny>,
    gate_up: &Bound<'py, PyAny>,
    down: &Bound<'py, PyAny>,
    expert_offsets: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = arg::max_rows)] max_rows: usize,
    out: &Bound<'py, PyAny>,
    h: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = arg::isa)] isa: Option<String>,
) -> PyResult<usize> {
    extract!(
        buf: PyReadonlyArray2<f32>,
        gate_up: PyReadonlyArray3<f32>,
        down: PyReadonlyArray3<f32>,
        expert_offsets: PyReadonlyArray1<i64>,
        mut out: PyReadwriteArray2<f32>,
        mut h: Option<PyReadwriteArray2<f32>>,
    );
    let isa = tier(isa)?;
    let dims = dims_of(&buf, &gate_up, &down)?;
    let (b, w1, w2, offs) = (
        slice(&buf, "buf")?,
        slice(&gate_up, "gate_up")?,
        slice(&down, "down")?,
        slice(&expert_offsets, "expert_offsets")?,
    );
    let o = slice_mut(&mut out, "out")?;
    let hs = match h.as_mut() {
        Some(h) => Some(slice_mut(h, "h")?),
        None => None,
    };
    py.detach(|| deepseek_experts::swiglu_forward(b, w1, w2, dims, offs, max_rows, o, hs, isa))
        .map_err(|e| EngineError::from(e).into())
}

/// Gradients of `swiglu_experts_forward` for the experts whose segment has 1 to `max_rows`
/// rows, from the saved pre-activations `h`: writes their rows of `grad_buf` [N, H] and their
/// slices of `grad_gate_up` [E, 2F, H] and `grad_down` [E, H, F]; returns how many ran.
#[pyfunction]
#[pyo3(signature = (
    grad_out, buf, gate_up, down, h, expert_offsets, max_rows, grad_buf, grad_gate_up, grad_down, *, isa=None
))]
#[allow(clippy::too_many_arguments)]
pub fn swiglu_experts_backward<'py>(
    py: Python<'py>,
    grad_out: &Bound<'py, PyAny>,
    buf: &Bound<'py, PyAny>,
    gate_up: &Bound<'py, PyAny>,
    down: &Bound<'py, PyAny>,
    h: &Bound<'py, PyAny>,
    expert_offsets: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = arg::max_rows)] max_rows: usize,
    grad_buf: &Bound<'py, PyAny>,
    grad_gate_up: &Bound<'py, PyAny>,
    grad_down: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = arg::isa)] isa: Option<String>,
) -> PyResult<usize> {
    extract!(
        grad_out: PyReadonlyArray2<f32>,
        buf: PyReadonlyArray2<f32>,
        gate_up: PyReadonlyArray3<f32>,
        down: PyReadonlyArray3<f32>,
        h: PyReadonlyArray2<f32>,
        expert_offsets: PyReadonlyArray1<i64>,
        mut grad_buf: PyReadwriteArray2<f32>,
        mut grad_gate_up: PyReadwriteArray3<f32>,
        mut grad_down: PyReadwriteArray3<f32>,
    );
    let isa = tier(isa)?;
    let dims = dims_of(&buf, &gate_up, &down)?;
    let (g, b, w1, w2, hs, offs) = (
        slice(&grad_out, "grad_out")?,
        slice(&buf, "buf")?,
        slice(&gate_up, "gate_up")?,
        slice(&down, "down")?,
        slice(&h, "h")?,
        slice(&expert_offsets, "expert_offsets")?,
    );
    let (gb, gw1, gw2) = (
        slice_mut(&mut grad_buf, "grad_buf")?,
        slice_mut(&mut grad_gate_up, "grad_gate_up")?,
        slice_mut(&mut grad_down, "grad_down")?,
    );
    py.detach(|| deepseek_experts::swiglu_backward(g, b, w1, w2, hs, dims, offs, max_rows, gb, gw1, gw2, isa))
        .map_err(|e| EngineError::from(e).into())
}
