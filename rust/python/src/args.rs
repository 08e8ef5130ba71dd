//! The one place where array arguments are extracted.
//!
//! Every binding takes its numpy arguments as `&Bound<PyAny>` and converts them with
//! [`extract!`], so that a bad argument raises the package's exception with a message naming
//! it: a non-array or a dtype the binding does not take is a `DTypeError` (naming the dtypes
//! taken and the one given), a wrong number of dimensions a `ShapeError`, a read-only or
//! overlapping output an `InvalidValueError`. (PyO3's own extraction would raise a bare
//! `TypeError` that names neither.)

use numpy::ndarray::Dimension;
use numpy::{
    BorrowError, Element, PyArray, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray, PyReadwriteArray,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

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
            let given = obj
                .get_type()
                .name()
                .map_or_else(|_| "?".to_string(), |n| n.to_string());
            return Err(dtype_error(format!(
                "{name} must be a numpy array of {}, got {given}",
                A::DTYPES
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
