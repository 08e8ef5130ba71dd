"""Type stubs of the Rust extension module `deepseek_rs._core` (kept in step by mypy.stubtest)."""

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union, final, overload

import numpy as np
import numpy.typing as npt

# The dtypes each binding takes, exactly: any other dtype (or number of dimensions) raises
# deepseek_rs.DTypeError (or ShapeError) naming the argument. Where a binding takes either float
# precision (the constrained type variable _Float), every float argument of one call has the same
# one, and so has its float result. 16-bit floats (float16, bfloat16; numpy has no bfloat16)
# cross as int16 views of their bits, in `gather` only (_Row).
# Every other argument is exactly its annotated type: an `int` is a Python or numpy integer (not
# a bool, not a float) and is >= 0, a `float` a real number (not a bool) that is finite (a number
# of seconds also >= 0), a `bool` a Python or numpy bool (not an int). A value of another type
# raises deepseek_rs.DTypeError, one out of range InvalidValueError, each naming the argument.
_Float = TypeVar("_Float", np.float32, np.float64)
_Row = TypeVar("_Row", np.float32, np.float64, np.int16)
_F32 = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]
_I64 = npt.NDArray[np.int64]
_U32 = npt.NDArray[np.uint32]
_Bool = npt.NDArray[np.bool_]
# (token_offsets, expert_ids, weights, expert_counts)
_Routing = Tuple[_I64, _I64, npt.NDArray[_Float], _I64]

__all__ = [
    "DocBatch",
    "JsonlReader",
    "JsonlWriter",
    "Scheduler",
    "combine",
    "combine_weight_grad",
    "compute_signals",
    "cpu_isas",
    "dsir_log_importance",
    "gather",
    "gather_scaled",
    "hashed_features",
    "linear_rows",
    "route_backward",
    "route_group_limited",
    "route_top_k",
    "route_top_p",
    "signal_names",
    "sort_by_expert",
    "swiglu_experts_backward",
    "swiglu_experts_forward",
]

# router (rust/python/src/lib.rs): the weights have the dtype of the logits
def route_top_k(logits: npt.NDArray[_Float], k: int, renormalize: bool) -> _Routing[_Float]: ...
def route_top_p(
    logits: npt.NDArray[_Float], top_p: float, min_k: int, max_k: int, renormalize: bool
) -> _Routing[_Float]: ...
def route_group_limited(
    logits: npt.NDArray[_Float],
    bias: Optional[npt.NDArray[_Float]],
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
) -> _Routing[_Float]: ...
def route_backward(
    logits: npt.NDArray[_Float],
    token_offsets: _I64,
    expert_ids: _I64,
    grad_weights: npt.NDArray[_Float],
    scoring: str,
    renormalize: bool,
    scale: float,
) -> npt.NDArray[_Float]: ...

# dispatch (rust/python/src/lib.rs)
def sort_by_expert(
    token_offsets: _I64, expert_ids: _I64, num_experts: int
) -> Tuple[_I64, _I64, _I64, _I64]: ...
def gather(src: npt.NDArray[_Row], index: _I64, out: npt.NDArray[_Row]) -> None: ...
def gather_scaled(
    src: npt.NDArray[_Float], index: _I64, scale: npt.NDArray[_Float], out: npt.NDArray[_Float]
) -> None: ...
def combine(
    buf: npt.NDArray[_Float],
    pair_position: _I64,
    token_offsets: _I64,
    weights: Optional[npt.NDArray[_Float]],
    out: npt.NDArray[_Float],
) -> None: ...
def combine_weight_grad(
    grad_out: npt.NDArray[_Float], buf: npt.NDArray[_Float], pair_position: _I64, token_offsets: _I64
) -> npt.NDArray[_Float]: ...

# experts (rust/python/src/experts.rs): float32 only. `isa` names the instruction-set tier
# ("avx512", "avx2", "neon", "generic"; None: the best of this CPU); an unknown name or one this
# CPU cannot run raises InvalidValueError naming the available tiers (cpu_isas(), best first).
def cpu_isas() -> List[str]: ...
def linear_rows(x: _F32, w: _F32, out: _F32, *, isa: Optional[str] = None) -> None: ...
def swiglu_experts_forward(
    buf: _F32,
    gate_up: _F32,
    down: _F32,
    expert_offsets: _I64,
    max_rows: int,
    out: _F32,
    h: Optional[_F32] = None,
    *,
    isa: Optional[str] = None,
) -> int: ...
def swiglu_experts_backward(
    grad_out: _F32,
    buf: _F32,
    gate_up: _F32,
    down: _F32,
    h: _F32,
    expert_offsets: _I64,
    max_rows: int,
    grad_buf: _F32,
    grad_gate_up: _F32,
    grad_down: _F32,
    *,
    isa: Optional[str] = None,
) -> int: ...

@final
class Scheduler:
    """Dynamic batching scheduler: decides which request ids run together and when."""

    def __new__(
        cls,
        max_size: int = 32,
        min_size: int = 4,
        max_queue_delay: float = 0.005,
        max_queue_size: int = 1024,
        max_batch_cost: Optional[int] = None,
        preferred_sizes: Optional[List[int]] = None,
    ) -> Scheduler: ...
    def submit(
        self, id: int, cost: int = 1, bucket: int = 0, priority: int = 0, timeout: Optional[float] = None
    ) -> Optional[int]: ...
    def cancel(self, id: int) -> bool: ...
    def next_batch(self, timeout: Optional[float] = None) -> Tuple[str, List[int], int]: ...
    def next_batch_at(self, timeout: Optional[float] = None) -> Tuple[str, List[int], int, int]: ...
    def expire_wait(self, timeout: Optional[float] = None) -> Optional[List[int]]: ...
    def complete(self, ids: List[int], outcome: str = "completed") -> int: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __len__(self) -> int: ...
    def config(self) -> Dict[str, Any]: ...
    def metrics(self) -> Dict[str, Any]: ...

# data filter (rust/python/src/textfilter.rs)
_Path = Union[str, os.PathLike[str]]

def signal_names() -> List[str]: ...
def compute_signals(texts: Sequence[str]) -> _F64: ...
def hashed_features(texts: Sequence[str], buckets: int) -> Tuple[_I64, _U32, _U32]: ...
def dsir_log_importance(texts: Sequence[str], log_ratio: _F64, per_feature: bool = False) -> _F64: ...

@final
class DocBatch:
    def __len__(self) -> int: ...
    @property
    def texts(self) -> List[str]: ...
    @property
    def ids(self) -> List[Optional[str]]: ...
    @property
    def line_numbers(self) -> _I64: ...
    @property
    def errors(self) -> List[Tuple[int, str]]: ...
    def signals(self) -> _F64: ...

@final
class JsonlReader:
    def __new__(
        cls, path: _Path, batch_docs: int = 4096, batch_bytes: int = ..., max_line_bytes: int = ...
    ) -> JsonlReader: ...
    @property
    def lines_read(self) -> int: ...
    @property
    def blank_lines(self) -> int: ...
    # offset, message, read_bytes, withheld_bytes, withheld_lines; None when nothing is damaged.
    @property
    def damage(self) -> Optional[Dict[str, Any]]: ...
    def __iter__(self) -> Iterator[DocBatch]: ...
    def __next__(self) -> DocBatch: ...

@final
class JsonlWriter:
    def __new__(cls, path: _Path) -> JsonlWriter: ...
    @property
    def lines(self) -> int: ...
    # The documents unchanged, or annotated: signals, names, keep and reasons go together.
    @overload
    def write(
        self,
        batch: DocBatch,
        rows: _I64,
        signals: None = None,
        names: None = None,
        keep: None = None,
        reasons: None = None,
    ) -> None: ...
    @overload
    def write(
        self,
        batch: DocBatch,
        rows: _I64,
        signals: _F64,
        names: Sequence[str],
        keep: _Bool,
        reasons: Sequence[Optional[str]],
    ) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...
