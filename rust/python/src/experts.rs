//! Bindings of `deepseek-experts`: the SwiGLU experts of small segments.

use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadwriteArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::{EngineError, shape_error};
use crate::{slice, slice_mut};

/// Runs the experts whose segment of the expert-sorted `buf` [N, H] has 1 to `max_rows` rows
/// into `out` [N, H] (and `h` [N, 2F] when given), float32 only; returns how many ran.
#[pyfunction]
#[pyo3(signature = (buf, gate_up, down, expert_offsets, max_rows, out, h=None))]
#[allow(clippy::too_many_arguments)]
pub fn swiglu_experts_forward<'py>(
    py: Python<'py>,
    buf: PyReadonlyArray2<'py, f32>,
    gate_up: PyReadonlyArray3<'py, f32>,
    down: PyReadonlyArray3<'py, f32>,
    expert_offsets: PyReadonlyArray1<'py, i64>,
    max_rows: usize,
    mut out: PyReadwriteArray2<'py, f32>,
    mut h: Option<PyReadwriteArray2<'py, f32>>,
) -> PyResult<usize> {
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
