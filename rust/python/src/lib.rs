//! `deepseek_rs._core`: the Python face of the engine crates.
//!
//! Every function extracts its arguments in one way ([`args`]: a wrong dtype or number of
//! dimensions is a `DTypeError` or `ShapeError` naming the argument, a scalar of the wrong type
//! a `DTypeError`, one out of range an `InvalidValueError`), releases the GIL for the
//! real work, and returns numpy arrays without copying. Large outputs are written into arrays the caller allocated
//! (so they live in torch's allocator); small ones are returned. Engine errors become the
//! exceptions of `deepseek_rs.errors` in [`errors`].

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

mod args;
mod errors;
mod experts;
mod scheduler;
mod textfilter;
use args::{Floats1, Floats2, FloatsMut2, Rows2, RowsMut2, arg, dtype_mismatch, extract};
use errors::{EngineError, shape_error};

pub(crate) fn slice<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| shape_error(format!("{what} must be C-contiguous")))
}

pub(crate) fn slice_mut<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a mut numpy::PyReadwriteArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|_| shape_error(format!("{what} must be C-contiguous")))
}

/// Routing outputs as numpy arrays: (token_offsets, expert_ids, weights, expert_counts).
type RoutingArrays<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyAny>,
    Bound<'py, PyArray1<i64>>,
);

fn routing_to_py<'py, F: numpy::Element>(py: Python<'py>, r: deepseek_router::Routing<F>) -> RoutingArrays<'py> {
    (
        r.token_offsets.into_pyarray(py),
        r.expert_ids.into_pyarray(py),
        r.weights.into_pyarray(py).into_any(),
        r.expert_counts.into_pyarray(py),
    )
}

/// The router rule and its parameters, as the Python side names them.
enum Rule {
    TopK {
        k: usize,
    },
    TopP {
        p: f64,
        min_k: usize,
        max_k: usize,
    },
    GroupLimited {
        top_k: usize,
        n_group: usize,
        topk_group: usize,
    },
}

fn run_rule<F: deepseek_router::Real>(
    logits: &[F],
    bias: Option<&[F]>,
    num_experts: usize,
    rule: &Rule,
    renormalize: bool,
) -> deepseek_router::Result<deepseek_router::Routing<F>> {
    use deepseek_router as r;
    match *rule {
        Rule::TopK { k } => r::softmax_top_k(logits, num_experts, k, renormalize),
        Rule::TopP { p, min_k, max_k } => r::softmax_top_p(logits, num_experts, p, min_k, max_k, renormalize),
        Rule::GroupLimited {
            top_k,
            n_group,
            topk_group,
        } => {
            let zeros = vec![F::zero(); num_experts];
            let rule = r::GroupLimited {
                top_k,
                n_group,
                topk_group,
                renormalize,
            };
            r::sigmoid_group_limited(logits, bias.unwrap_or(&zeros), num_experts, rule)
        }
    }
}

fn route_typed<'py, F: deepseek_router::Real + numpy::Element>(
    py: Python<'py>,
    logits: PyReadonlyArray2<'py, F>,
    bias: Option<PyReadonlyArray1<'py, F>>,
    rule: Rule,
    renormalize: bool,
) -> PyResult<RoutingArrays<'py>> {
    let e = logits.shape()[1];
    let zs = slice(&logits, "logits")?;
    let bs = bias.as_ref().map(|b| slice(b, "bias")).transpose()?;
    let r = py
        .detach(|| run_rule(zs, bs, e, &rule, renormalize))
        .map_err(EngineError::from)?;
    Ok(routing_to_py(py, r))
}

fn route<'py>(
    py: Python<'py>,
    logits: Floats2<'py>,
    bias: Option<Floats1<'py>>,
    rule: Rule,
    renormalize: bool,
) -> PyResult<RoutingArrays<'py>> {
    let mut dtypes = vec![("logits", logits.dtype())];
    dtypes.extend(bias.as_ref().map(|b| ("bias", b.dtype())));
    match (logits, bias) {
        (Floats2::F32(z), None) => route_typed(py, z, None, rule, renormalize),
        (Floats2::F64(z), None) => route_typed(py, z, None, rule, renormalize),
        (Floats2::F32(z), Some(Floats1::F32(b))) => route_typed(py, z, Some(b), rule, renormalize),
        (Floats2::F64(z), Some(Floats1::F64(b))) => route_typed(py, z, Some(b), rule, renormalize),
        _ => Err(dtype_mismatch(&dtypes)),
    }
}

#[pymodule]
mod _core {
    use super::*;

    #[pymodule_export]
    use crate::experts::{cpu_isas, linear_rows, swiglu_experts_backward, swiglu_experts_forward};
    #[pymodule_export]
    use crate::scheduler::Scheduler;
    #[pymodule_export]
    use crate::textfilter::{
        DocBatch, JsonlReader, JsonlWriter, compute_signals, dsir_log_importance, hashed_features, signal_names,
    };

    /// Softmax top-k routing of `logits` [tokens, experts].
    #[pyfunction]
    fn route_top_k<'py>(
        py: Python<'py>,
        logits: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = arg::k)] k: usize,
        #[pyo3(from_py_with = arg::renormalize)] renormalize: bool,
    ) -> PyResult<RoutingArrays<'py>> {
        extract!(logits: Floats2);
        route(py, logits, None, Rule::TopK { k }, renormalize)
    }

    /// Progressive top-p routing of `logits` [tokens, experts].
    #[pyfunction]
    fn route_top_p<'py>(
        py: Python<'py>,
        logits: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = arg::top_p)] top_p: f64,
        #[pyo3(from_py_with = arg::min_k)] min_k: usize,
        #[pyo3(from_py_with = arg::max_k)] max_k: usize,
        #[pyo3(from_py_with = arg::renormalize)] renormalize: bool,
    ) -> PyResult<RoutingArrays<'py>> {
        extract!(logits: Floats2);
        route(py, logits, None, Rule::TopP { p: top_p, min_k, max_k }, renormalize)
    }

    /// DeepSeek-V3 group-limited sigmoid routing of `logits` [tokens, experts].
    #[pyfunction]
    #[pyo3(signature = (logits, bias, top_k, n_group, topk_group, renormalize))]
    fn route_group_limited<'py>(
        py: Python<'py>,
        logits: &Bound<'py, PyAny>,
        bias: Option<&Bound<'py, PyAny>>,
        #[pyo3(from_py_with = arg::top_k)] top_k: usize,
        #[pyo3(from_py_with = arg::n_group)] n_group: usize,
        #[pyo3(from_py_with = arg::topk_group)] topk_group: usize,
        #[pyo3(from_py_with = arg::renormalize)] renormalize: bool,
    ) -> PyResult<RoutingArrays<'py>> {
        extract!(logits: Floats2, bias: Option<Floats1>);
        route(
            py,
            logits,
            bias,
            Rule::GroupLimited {
                top_k,
                n_group,
                topk_group,
            },
            renormalize,
        )
    }

    /// Gradient of the logits from the gradient of the routing weights.
    #[pyfunction]
    #[allow(clippy::too_many_arguments)]
    fn route_backward<'py>(
        py: Python<'py>,
        logits: &Bound<'py, PyAny>,
        token_offsets: &Bound<'py, PyAny>,
        expert_ids: &Bound<'py, PyAny>,
        grad_weights: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = arg::scoring)] scoring: String,
        #[pyo3(from_py_with = arg::renormalize)] renormalize: bool,
        #[pyo3(from_py_with = arg::scale)] scale: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        extract!(
            logits: Floats2,
            token_offsets: PyReadonlyArray1<i64>,
            expert_ids: PyReadonlyArray1<i64>,
            grad_weights: Floats1,
        );
        use deepseek_router::Scoring;
        let scoring = match scoring.as_str() {
            "softmax" => Scoring::Softmax,
            "sigmoid" => Scoring::Sigmoid,
            other => {
                return Err(errors::value_error(format!(
                    "scoring must be 'softmax' or 'sigmoid', got {other:?}"
                )));
            }
        };
        let offs = slice(&token_offsets, "token_offsets")?;
        let ids = slice(&expert_ids, "expert_ids")?;
        macro_rules! run {
            ($z:expr, $g:expr, $t:ty) => {{
                let e = $z.shape()[1];
                let (zs, gs) = (slice(&$z, "logits")?, slice(&$g, "grad_weights")?);
                let grad = py
                    .detach(|| deepseek_router::route_backward(zs, e, offs, ids, gs, scoring, renormalize, scale as $t))
                    .map_err(EngineError::from)?;
                Ok(grad.into_pyarray(py).into_any())
            }};
        }
        let dtypes = [("logits", logits.dtype()), ("grad_weights", grad_weights.dtype())];
        match (logits, grad_weights) {
            (Floats2::F32(z), Floats1::F32(g)) => run!(z, g, f32),
            (Floats2::F64(z), Floats1::F64(g)) => run!(z, g, f64),
            _ => Err(dtype_mismatch(&dtypes)),
        }
    }

    /// Stable counting sort of the routed pairs by expert:
    /// returns (sorted_pair, sorted_token, pair_position, expert_offsets).
    #[pyfunction]
    #[allow(clippy::type_complexity)]
    fn sort_by_expert<'py>(
        py: Python<'py>,
        token_offsets: &Bound<'py, PyAny>,
        expert_ids: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = arg::num_experts)] num_experts: usize,
    ) -> PyResult<(
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i64>>,
    )> {
        extract!(token_offsets: PyReadonlyArray1<i64>, expert_ids: PyReadonlyArray1<i64>);
        let (offs, ids) = (
            slice(&token_offsets, "token_offsets")?,
            slice(&expert_ids, "expert_ids")?,
        );
        let p = py
            .detach(|| deepseek_dispatch::sort_by_expert(offs, ids, num_experts))
            .map_err(EngineError::from)?;
        Ok((
            p.sorted_pair.into_pyarray(py),
            p.sorted_token.into_pyarray(py),
            p.pair_position.into_pyarray(py),
            p.expert_offsets.into_pyarray(py),
        ))
    }

    /// `out[r] = src[index[r]]` for every row r (any 16-, 32- or 64-bit float rows).
    #[pyfunction]
    fn gather<'py>(
        py: Python<'py>,
        src: &Bound<'py, PyAny>,
        index: &Bound<'py, PyAny>,
        out: &Bound<'py, PyAny>,
    ) -> PyResult<()> {
        extract!(src: Rows2, index: PyReadonlyArray1<i64>, out: RowsMut2);
        let idx = slice(&index, "index")?;
        macro_rules! run {
            ($s:expr, $o:expr) => {{
                let (mut o, cols) = ($o, $s.shape()[1]);
                if o.shape()[1] != cols {
                    return Err(shape_error(format!(
                        "out has {} columns, src has {cols}",
                        o.shape()[1]
                    )));
                }
                let (s, os) = (slice(&$s, "src")?, slice_mut(&mut o, "out")?);
                py.detach(|| deepseek_dispatch::gather(s, cols, idx, os))
                    .map_err(EngineError::from)?;
                Ok(())
            }};
        }
        let dtypes = [("src", src.dtype()), ("out", out.dtype())];
        match (src, out) {
            (Rows2::F32(s), RowsMut2::F32(o)) => run!(s, o),
            (Rows2::F64(s), RowsMut2::F64(o)) => run!(s, o),
            (Rows2::Bits16(s), RowsMut2::Bits16(o)) => run!(s, o),
            _ => Err(dtype_mismatch(&dtypes)),
        }
    }

    /// `out[r] = scale[r] * src[index[r]]` for every row r.
    #[pyfunction]
    fn gather_scaled<'py>(
        py: Python<'py>,
        src: &Bound<'py, PyAny>,
        index: &Bound<'py, PyAny>,
        scale: &Bound<'py, PyAny>,
        out: &Bound<'py, PyAny>,
    ) -> PyResult<()> {
        extract!(
            src: Floats2,
            index: PyReadonlyArray1<i64>,
            scale: Floats1,
            out: FloatsMut2,
        );
        let idx = slice(&index, "index")?;
        macro_rules! run {
            ($s:expr, $w:expr, $o:expr) => {{
                let (mut o, cols) = ($o, $s.shape()[1]);
                if o.shape()[1] != cols {
                    return Err(shape_error(format!(
                        "out has {} columns, src has {cols}",
                        o.shape()[1]
                    )));
                }
                let (s, w) = (slice(&$s, "src")?, slice(&$w, "scale")?);
                let os = slice_mut(&mut o, "out")?;
                py.detach(|| deepseek_dispatch::gather_scaled(s, cols, idx, w, os))
                    .map_err(EngineError::from)?;
                Ok(())
            }};
        }
        let dtypes = [("src", src.dtype()), ("scale", scale.dtype()), ("out", out.dtype())];
        match (src, scale, out) {
            (Floats2::F32(s), Floats1::F32(w), FloatsMut2::F32(o)) => run!(s, w, o),
            (Floats2::F64(s), Floats1::F64(w), FloatsMut2::F64(o)) => run!(s, w, o),
            _ => Err(dtype_mismatch(&dtypes)),
        }
    }

    /// Weighted sum of expert-buffer rows back into token order (weights may be None).
    #[pyfunction]
    #[pyo3(signature = (buf, pair_position, token_offsets, weights, out))]
    fn combine<'py>(
        py: Python<'py>,
        buf: &Bound<'py, PyAny>,
        pair_position: &Bound<'py, PyAny>,
        token_offsets: &Bound<'py, PyAny>,
        weights: Option<&Bound<'py, PyAny>>,
        out: &Bound<'py, PyAny>,
    ) -> PyResult<()> {
        extract!(
            buf: Floats2,
            pair_position: PyReadonlyArray1<i64>,
            token_offsets: PyReadonlyArray1<i64>,
            weights: Option<Floats1>,
            out: FloatsMut2,
        );
        let (pos, offs) = (
            slice(&pair_position, "pair_position")?,
            slice(&token_offsets, "token_offsets")?,
        );
        macro_rules! run {
            ($b:expr, $w:expr, $o:expr) => {{
                let (mut o, cols) = ($o, $b.shape()[1]);
                if o.shape()[1] != cols {
                    return Err(shape_error(format!(
                        "out has {} columns, buf has {cols}",
                        o.shape()[1]
                    )));
                }
                let b = slice(&$b, "buf")?;
                let w_arr = $w;
                let w = match &w_arr {
                    Some(w) => Some(slice(w, "weights")?),
                    None => None,
                };
                let os = slice_mut(&mut o, "out")?;
                py.detach(|| deepseek_dispatch::combine(b, cols, pos, offs, w, os))
                    .map_err(EngineError::from)?;
                Ok(())
            }};
        }
        let mut dtypes = vec![("buf", buf.dtype())];
        dtypes.extend(weights.as_ref().map(|w| ("weights", w.dtype())));
        dtypes.push(("out", out.dtype()));
        match (buf, weights, out) {
            (Floats2::F32(b), None, FloatsMut2::F32(o)) => run!(b, None::<PyReadonlyArray1<f32>>, o),
            (Floats2::F64(b), None, FloatsMut2::F64(o)) => run!(b, None::<PyReadonlyArray1<f64>>, o),
            (Floats2::F32(b), Some(Floats1::F32(w)), FloatsMut2::F32(o)) => run!(b, Some(w), o),
            (Floats2::F64(b), Some(Floats1::F64(w)), FloatsMut2::F64(o)) => run!(b, Some(w), o),
            _ => Err(dtype_mismatch(&dtypes)),
        }
    }

    /// Gradient of the combine weights: one row dot product per routed pair.
    #[pyfunction]
    fn combine_weight_grad<'py>(
        py: Python<'py>,
        grad_out: &Bound<'py, PyAny>,
        buf: &Bound<'py, PyAny>,
        pair_position: &Bound<'py, PyAny>,
        token_offsets: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        extract!(
            grad_out: Floats2,
            buf: Floats2,
            pair_position: PyReadonlyArray1<i64>,
            token_offsets: PyReadonlyArray1<i64>,
        );
        let (pos, offs) = (
            slice(&pair_position, "pair_position")?,
            slice(&token_offsets, "token_offsets")?,
        );
        macro_rules! run {
            ($g:expr, $b:expr) => {{
                let cols = $b.shape()[1];
                if $g.shape()[1] != cols {
                    return Err(shape_error(format!(
                        "grad_out has {} columns, buf has {cols}",
                        $g.shape()[1]
                    )));
                }
                let (g, b) = (slice(&$g, "grad_out")?, slice(&$b, "buf")?);
                let grad = py
                    .detach(|| deepseek_dispatch::combine_weight_grad(g, b, cols, pos, offs))
                    .map_err(EngineError::from)?;
                Ok(grad.into_pyarray(py).into_any())
            }};
        }
        let dtypes = [("grad_out", grad_out.dtype()), ("buf", buf.dtype())];
        match (grad_out, buf) {
            (Floats2::F32(g), Floats2::F32(b)) => run!(g, b),
            (Floats2::F64(g), Floats2::F64(b)) => run!(g, b),
            _ => Err(dtype_mismatch(&dtypes)),
        }
    }
}
