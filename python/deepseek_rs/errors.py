"""The exceptions of deepseek_rs.

Every error the package raises on bad input is a `DeepseekError`, and also the builtin that a
torch user would catch for it: shape and value problems are `ValueError`, dtype and type problems
(an argument that is not a tensor, an array, an optimizer) are `TypeError`. The Rust bindings
raise these same classes.
"""


class DeepseekError(Exception):
    """Base class of every error raised by deepseek_rs."""


class ShapeError(DeepseekError, ValueError):
    """A tensor has the wrong number of dimensions or sizes that disagree."""


class DTypeError(DeepseekError, TypeError):
    """A tensor or array has a dtype the operation does not accept, or an argument is not of the
    type it must be (a list where a tensor or numpy array goes, a non-optimizer for GVRT)."""


class DeviceError(DeepseekError, ValueError):
    """A tensor is on a device the operation does not run on, or tensors are on different devices."""


class InvalidValueError(DeepseekError, ValueError):
    """A value is out of range: a NaN or infinite logit, a top-k larger than the expert count, ..."""


class QueueFullError(DeepseekError, RuntimeError):
    """The batching queue holds its maximum number of requests: back off and retry (HTTP 429)."""


class ShutdownError(DeepseekError, RuntimeError):
    """The batcher is shutting down (or shut down) and accepts no new requests."""


class RequestTimeoutError(DeepseekError, TimeoutError):
    """A request waited past its deadline and was never run (HTTP 504)."""


class ShardError(DeepseekError, OSError):
    """A data shard cannot be read or written: a missing file, a corrupt compressed stream, a full disk."""


__all__ = [
    "DTypeError",
    "DeepseekError",
    "DeviceError",
    "InvalidValueError",
    "QueueFullError",
    "RequestTimeoutError",
    "ShapeError",
    "ShardError",
    "ShutdownError",
]
