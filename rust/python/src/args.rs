//! The one place where arguments are extracted.
//!
//! Every binding takes its numpy arguments as `&Bound<PyAny>` and converts them with
//! [`extract!`], so that a bad argument raises the package's exception with a message naming
//! it: a non-array or a dtype the binding does not take is a `DTypeError` (naming the dtypes
//! taken and the one given), a wrong number of dimensions a `ShapeError`, a read-only or
//! overlapping output an `InvalidValueError`. (PyO3's own extraction would raise a bare
//! `TypeError` that names neither.)
//!
//! Every other argument (a count, a probability, a flag, a name, a path, a list of them) keeps
//! its Rust type in the signature and is converted by the extractor of its name in [`arg`]
//! (`#[pyo3(from_py_with = arg::k)] k: usize`), which keeps the signature's defaults: a value
//! of the wrong Python type is a `DTypeError`, an out-of-range one (a negative count, a
//! non-finite float) an `InvalidValueError`, each naming the argument and the value. (PyO3's
//! own would raise an `OverflowError` or a bare `TypeError`.)

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use numpy::ndarray::Dimension;
use numpy::{
    BorrowError, Element, PyArray, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray, PyReadwriteArray,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::prelude::*;
use pyo3::pyclass::PyClass;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PySequence, PyString};

use crate::errors::{dtype_error, shape_error, value_error};

/// Extracts each named argument (a `&Bound<PyAny>`, or an `Option` of one) into the array type
/// given, shadowing it (`mut name: Type` for an output); the Python name of the argument is the
/// Rust one.
macro_rules! extract {
    () => {};
    (mut $name:ident: $ty:ty $(, $($rest:tt)*)?) => {
        let mut $name: $ty = $crate::args::FromArg::from_arg($name, stringify!($name))?;
        $crate::args::extract!($($($rest)*)?);
    };
    ($name:ident: $ty:ty $(, $($rest:tt)*)?) => {
        let $name: $ty = $crate::args::FromArg::from_arg($name, stringify!($name))?;
        $crate::args::extract!($($($rest)*)?);
    };
}
pub(crate) use extract;

/// A numpy element type, as messages name it.
pub(crate) trait Dtype: Element {
    const NAME: &'static str;
}

impl Dtype for f32 {
    const NAME: &'static str = "float32";
}
impl Dtype for f64 {
    const NAME: &'static str = "float64";
}
impl Dtype for i16 {
    const NAME: &'static str = "int16";
}
impl Dtype for i64 {
    const NAME: &'static str = "int64";
}
impl Dtype for bool {
    const NAME: &'static str = "bool";
}

/// A numpy array type a binding takes: one or several dtypes, one number of dimensions.
pub(crate) trait Arg<'py>: Sized {
    /// The dtypes taken, as messages name them ("float32 or float64").
    const DTYPES: &'static str;
    /// The typed array; None when `a` has none of the dtypes taken, a `ShapeError` when it has
    /// one of them but the wrong number of dimensions.
    fn from_array(a: &Bound<'py, PyUntypedArray>, name: &str) -> PyResult<Option<Self>>;
}

fn ndim_error(a: &Bound<'_, PyUntypedArray>, want: Option<usize>, name: &str) -> PyErr {
    let want = want.map_or("an array".to_string(), |n| format!("{n}-D"));
    shape_error(format!(
        "{name} must be {want}, got a {}-D array of shape {}",
        a.ndim(),
        shape_str(a.shape())
    ))
}

fn borrow_error(e: BorrowError, name: &str) -> PyErr {
    match e {
        BorrowError::NotWriteable => value_error(format!("{name} is written to but is a read-only array")),
        _ => value_error(format!(
            "{name} overlaps another array argument of this call (an output must not share memory with an input)"
        )),
    }
}

/// `a` as an array of `T` with `D` dimensions; None when its dtype is not `T`, a `ShapeError`
/// when its number of dimensions is not `D`'s.
fn typed<'a, 'py, T: Element, D: Dimension>(
    a: &'a Bound<'py, PyUntypedArray>,
    name: &str,
) -> PyResult<Option<&'a Bound<'py, PyArray<T, D>>>> {
    if !a.dtype().is_equiv_to(&numpy::dtype::<T>(a.py())) {
        return Ok(None);
    }
    a.cast::<PyArray<T, D>>()
        .map(Some)
        .map_err(|_| ndim_error(a, D::NDIM, name))
}

impl<'py, T: Dtype, D: Dimension> Arg<'py> for PyReadonlyArray<'py, T, D> {
    const DTYPES: &'static str = T::NAME;
    fn from_array(a: &Bound<'py, PyUntypedArray>, name: &str) -> PyResult<Option<Self>> {
        typed::<T, D>(a, name)?
            .map(|t| t.try_readonly().map_err(|e| borrow_error(e, name)))
            .transpose()
    }
}

impl<'py, T: Dtype, D: Dimension> Arg<'py> for PyReadwriteArray<'py, T, D> {
    const DTYPES: &'static str = T::NAME;
    fn from_array(a: &Bound<'py, PyUntypedArray>, name: &str) -> PyResult<Option<Self>> {
        typed::<T, D>(a, name)?
            .map(|t| t.try_readwrite().map_err(|e| borrow_error(e, name)))
            .transpose()
    }
}

/// An argument as a binding receives it, converted to the array type it takes.
pub(crate) trait FromArg<'a, 'py>: Sized {
    type Source;
    fn from_arg(obj: Self::Source, name: &str) -> PyResult<Self>;
}

impl<'a, 'py: 'a, A: Arg<'py>> FromArg<'a, 'py> for A {
    type Source = &'a Bound<'py, PyAny>;
    fn from_arg(obj: &'a Bound<'py, PyAny>, name: &str) -> PyResult<A> {
        let Ok(a) = obj.cast::<PyUntypedArray>() else {
            return Err(dtype_error(format!(
                "{name} must be a numpy array of {}, got {}",
                A::DTYPES,
                type_name(obj)
            )));
        };
        A::from_array(a, name)?.ok_or_else(|| dtype_error(format!("{name} must be {}, got {}", A::DTYPES, a.dtype())))
    }
}

impl<'a, 'py: 'a, A: Arg<'py>> FromArg<'a, 'py> for Option<A> {
    type Source = Option<&'a Bound<'py, PyAny>>;
    fn from_arg(obj: Option<&'a Bound<'py, PyAny>>, name: &str) -> PyResult<Option<A>> {
        obj.map(|o| A::from_arg(o, name)).transpose()
    }
}

/// Declares an enum of array types, one per dtype taken, and its [`Arg`] impl.
macro_rules! dtype_enum {
    ($(#[$doc:meta])* $name:ident, $dtypes:literal { $($variant:ident($array:ident<$elem:ty>)),+ $(,)? }) => {
        $(#[$doc])*
        pub(crate) enum $name<'py> {
            $($variant(numpy::$array<'py, $elem>)),+
        }

        impl $name<'_> {
            /// The dtype of the array, as messages name it.
            pub(crate) fn dtype(&self) -> &'static str {
                match self {
                    $($name::$variant(_) => <$elem as Dtype>::NAME),+
                }
            }
        }

        impl<'py> Arg<'py> for $name<'py> {
            const DTYPES: &'static str = $dtypes;
            fn from_array(a: &Bound<'py, PyUntypedArray>, name: &str) -> PyResult<Option<Self>> {
                $(if let Some(x) = <numpy::$array<'py, $elem> as Arg<'py>>::from_array(a, name)? {
                    return Ok(Some($name::$variant(x)));
                })+
                Ok(None)
            }
        }
    };
}

dtype_enum! {
    /// A 1-D float array of either supported precision.
    Floats1, "float32 or float64" {
        F32(PyReadonlyArray1<f32>),
        F64(PyReadonlyArray1<f64>),
    }
}

dtype_enum! {
    /// A 2-D float array of either supported precision.
    Floats2, "float32 or float64" {
        F32(PyReadonlyArray2<f32>),
        F64(PyReadonlyArray2<f64>),
    }
}

dtype_enum! {
    /// A writable 2-D float array of either supported precision.
    FloatsMut2, "float32 or float64" {
        F32(PyReadwriteArray2<f32>),
        F64(PyReadwriteArray2<f64>),
    }
}

dtype_enum! {
    /// A 2-D array of rows to copy: float32, float64, or 16-bit floats viewed as int16.
    Rows2, "float32, float64 or int16 (16-bit floats viewed as int16)" {
        F32(PyReadonlyArray2<f32>),
        F64(PyReadonlyArray2<f64>),
        Bits16(PyReadonlyArray2<i16>),
    }
}

dtype_enum! {
    /// A writable counterpart of [`Rows2`].
    RowsMut2, "float32, float64 or int16 (16-bit floats viewed as int16)" {
        F32(PyReadwriteArray2<f32>),
        F64(PyReadwriteArray2<f64>),
        Bits16(PyReadwriteArray2<i16>),
    }
}

/// The error for array arguments that must share one dtype but do not; `args` are
/// (name, dtype) pairs.
pub(crate) fn dtype_mismatch(args: &[(&str, &str)]) -> PyErr {
    let names: Vec<&str> = args.iter().map(|&(n, _)| n).collect();
    let got: Vec<String> = args.iter().map(|(n, d)| format!("{n} {d}")).collect();
    dtype_error(format!(
        "{} must have the same dtype, got {}",
        names.join(", "),
        got.join(", ")
    ))
}

/// A shape as Python writes it: `(2, 3)`, `(4,)`.
fn shape_str(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The Python type of `obj`, as messages name it.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_string(), |n| n.to_string())
}

/// `obj` as `str()` shows it, for messages (the first 40 characters of a longer one).
fn shown(obj: &Bound<'_, PyAny>) -> String {
    let s = obj.str().map_or_else(|_| "?".to_string(), |s| s.to_string());
    match s.char_indices().nth(40) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s,
    }
}

/// The name of a non-array argument in messages: `texts`, or an item of it: `texts[3]`.
#[derive(Clone, Copy)]
pub(crate) struct Name<'s> {
    arg: &'s str,
    item: Option<usize>,
}

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            None => f.write_str(self.arg),
            Some(i) => write!(f, "{}[{i}]", self.arg),
        }
    }
}

fn wrong_type(obj: &Bound<'_, PyAny>, name: Name<'_>, want: &str) -> PyErr {
    dtype_error(format!("{name} must be {want}, got {}", type_name(obj)))
}

/// A non-array argument type: its conversion from the Python object, with the package's errors.
pub(crate) trait FromPy<'py>: Sized {
    fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<Self>;
}

/// Declares one extractor per argument name, for `#[pyo3(from_py_with = arg::<name>)]`.
macro_rules! extractors {
    ($($name:ident),+ $(,)?) => {$(
        #[doc = concat!("The argument `", stringify!($name), "`, converted by its type's [`FromPy`](super::FromPy).")]
        pub(crate) fn $name<'py, T: super::FromPy<'py>>(obj: &Bound<'py, PyAny>) -> PyResult<T> {
            T::from_py(obj, super::Name { arg: stringify!($name), item: None })
        }
    )+};
}

/// The extractors of the non-array arguments, one per name (a name is the same argument in
/// every binding that takes it).
pub(crate) mod arg {
    use pyo3::prelude::*;

    extractors! {
        // router and dispatch
        k, top_p, min_k, max_k, top_k, n_group, topk_group, renormalize, scoring, scale, num_experts,
        // experts
        max_rows, isa,
        // scheduler
        max_size, min_size, max_queue_delay, max_queue_size, max_batch_cost, preferred_sizes,
        id, ids, cost, bucket, priority, timeout, outcome,
        // data filter
        texts, buckets, per_feature, path, batch_docs, batch_bytes, max_line_bytes, batch, names, reasons,
    }
}

/// Non-negative integers: a Python int or anything with `__index__` (numpy integers), not a
/// bool and not a float.
macro_rules! from_py_int {
    ($($t:ty),+) => {$(
        impl<'py> FromPy<'py> for $t {
            fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<$t> {
                if obj.is_instance_of::<PyBool>() {
                    return Err(wrong_type(obj, name, "an int"));
                }
                match obj.extract::<u64>() {
                    Ok(v) => <$t>::try_from(v)
                        .map_err(|_| value_error(format!("{name} must be at most {}, got {v}", <$t>::MAX))),
                    Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
                        let want = if obj.lt(0).unwrap_or(false) {
                            ">= 0".to_string()
                        } else {
                            format!("at most {}", <$t>::MAX)
                        };
                        Err(value_error(format!("{name} must be {want}, got {}", shown(obj))))
                    }
                    Err(_) => Err(wrong_type(obj, name, "an int")),
                }
            }
        }
    )+};
}

from_py_int!(u32, u64, usize);

/// A real number: a Python float or int or anything with `__float__`, not a bool; not yet
/// checked for finiteness.
fn real(obj: &Bound<'_, PyAny>, name: Name<'_>, want: &str) -> PyResult<f64> {
    if obj.is_instance_of::<PyBool>() {
        return Err(wrong_type(obj, name, want));
    }
    match obj.extract::<f64>() {
        Ok(v) => Ok(v),
        // An int too large for a float.
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => Ok(f64::INFINITY),
        Err(_) => Err(wrong_type(obj, name, want)),
    }
}

/// A finite float.
impl<'py> FromPy<'py> for f64 {
    fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<f64> {
        let v = real(obj, name, "a float")?;
        if !v.is_finite() {
            return Err(value_error(format!("{name} must be finite, got {}", shown(obj))));
        }
        Ok(v)
    }
}

/// A finite number of seconds >= 0 that a `Duration` holds.
impl<'py> FromPy<'py> for Duration {
    fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<Duration> {
        let v = real(obj, name, "a number of seconds")?;
        Duration::try_from_secs_f64(v).map_err(|_| {
            value_error(format!(
                "{name} must be a finite number of seconds >= 0, got {}",
                shown(obj)
            ))
        })
    }
}

/// A Python bool (or numpy bool), not an int.
impl<'py> FromPy<'py> for bool {
    fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<bool> {
        obj.extract::<bool>().map_err(|_| wrong_type(obj, name, "a bool"))
    }
}

/// A Python str.
impl<'py> FromPy<'py> for String {
    fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<String> {
        let s = obj.cast::<PyString>().map_err(|_| wrong_type(obj, name, "a str"))?;
        s.to_cow()
            .map(Cow::into_owned)
            .map_err(|e| value_error(format!("{name} is not valid Unicode: {e}")))
    }
}

/// A str or `os.PathLike`.
impl<'py> FromPy<'py> for PathBuf {
    fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<PathBuf> {
        obj.extract::<PathBuf>().map_err(|e| {
            if e.is_instance_of::<PyTypeError>(obj.py()) {
                wrong_type(obj, name, "a str or os.PathLike")
            } else {
                e
            }
        })
    }
}

/// An instance of a class of this module.
impl<'py, T: PyClass> FromPy<'py> for Bound<'py, T> {
    fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<Bound<'py, T>> {
        obj.cast::<T>()
            .cloned()
            .map_err(|_| wrong_type(obj, name, &format!("a {}", T::NAME)))
    }
}

/// None, or the value.
impl<'py, T: FromPy<'py>> FromPy<'py> for Option<T> {
    fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<Option<T>> {
        if obj.is_none() {
            return Ok(None);
        }
        T::from_py(obj, name).map(Some)
    }
}

/// A list (any sequence but a str or bytes) whose items convert; an item's errors name it
/// (`texts[3]`).
impl<'py, T: FromPy<'py>> FromPy<'py> for Vec<T> {
    fn from_py(obj: &Bound<'py, PyAny>, name: Name<'_>) -> PyResult<Vec<T>> {
        let text =
            obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyByteArray>();
        let seq = match obj.cast::<PySequence>() {
            Ok(seq) if !text => seq,
            _ => return Err(wrong_type(obj, name, "a list")),
        };
        let mut items = Vec::with_capacity(seq.len().unwrap_or(0));
        for (i, item) in seq.try_iter()?.enumerate() {
            items.push(T::from_py(&item?, Name { item: Some(i), ..name })?);
        }
        Ok(items)
    }
}
