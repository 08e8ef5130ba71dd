//! Bindings of `deepseek-experts`: SwiGLU experts over expert-sorted rows, forward and backward.

use numpy::{
    PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadwriteArray2, PyReadwriteArray3, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::args::{arg, extract};
use crate::errors::{EngineError, shape_error};
use crate::{slice, slice_mut};

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
#[pyo3(signature = (buf, gate_up, down, expert_offsets, max_rows, out, h=None))]
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
) -> PyResult<usize> {
    extract!(
        buf: PyReadonlyArray2<f32>,
        gate_up: PyReadonlyArray3<f32>,
        down: PyReadonlyArray3<f32>,
        expert_offsets: PyReadonlyArray1<i64>,
        mut out: PyReadwriteArray2<f32>,
        mut h: Option<PyReadwriteArray2<f32>>,
    );
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
    py.detach(|| deepseek_experts::swiglu_forward(b, w1, w2, dims, offs, max_rows, o, hs))
        .map_err(|e| EngineError::from(e).into())
}

/// Gradients of `swiglu_experts_forward` for the experts whose segment has 1 to `max_rows`
/// rows, from the saved pre-activations `h`: writes their rows of `grad_buf` [N, H] and their
/// slices of `grad_gate_up` [E, 2F, H] and `grad_down` [E, H, F]; returns how many ran.
#[pyfunction]
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
    py.detach(|| deepseek_experts::swiglu_backward(g, b, w1, w2, hs, dims, offs, max_rows, gb, gw1, gw2))
        .map_err(|e| EngineError::from(e).into())
}
