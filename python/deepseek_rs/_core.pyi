"""Type stubs of the Rust extension module `deepseek_rs._core` (kept in step by mypy.stubtest)."""

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union, final

import numpy as np
import numpy.typing as npt

_Floats = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_Rows = npt.NDArray[np.float32] | npt.NDArray[np.float64] | npt.NDArray[np.int16]
_I64 = npt.NDArray[np.int64]
_Routing = Tuple[_I64, _I64, _Floats, _I64]

__all__ = [
    "DocBatch",
    "JsonlReader",
    "JsonlWriter",
    "Scheduler",
    "combine",
    "combine_weight_grad",
    "compute_signals",
    "dsir_log_importance",
    "gather",
    "gather_scaled",
    "hashed_features",
    "route_backward",
    "route_group_limited",
    "route_top_k",
    "route_top_p",
    "signal_names",
    "sort_by_expert",
    "swiglu_experts_backward",
    "swiglu_experts_forward",
]

def route_top_k(logits: _Floats, k: int, renormalize: bool) -> _Routing: ...
def route_top_p(logits: _Floats, top_p: float, min_k: int, max_k: int, renormalize: bool) -> _Routing: ...
def route_group_limited(
    logits: _Floats, bias: Optional[_Floats], top_k: int, n_group: int, topk_group: int, renormalize: bool
) -> _Routing: ...
def route_backward(
    logits: _Floats,
    token_offsets: _I64,
    expert_ids: _I64,
    grad_weights: _Floats,
    scoring: str,
    renormalize: bool,
    scale: float,
) -> _Floats: ...
def sort_by_expert(
    token_offsets: _I64, expert_ids: _I64, num_experts: int
) -> Tuple[_I64, _I64, _I64, _I64]: ...
def gather(src: _Rows, index: _I64, out: _Rows) -> None: ...
def gather_scaled(src: _Floats, index: _I64, scale: _Floats, out: _Floats) -> None: ...
def combine(
    buf: _Floats, pair_position: _I64, token_offsets: _I64, weights: Optional[_Floats], out: _Floats
) -> None: ...
def swiglu_experts_backward(
    grad_out: _Floats,
    buf: _Floats,
    gate_up: _Floats,
    down: _Floats,
    h: _Floats,
    expert_offsets: _I64,
    max_rows: int,
    grad_buf: _Floats,
    grad_gate_up: _Floats,
    grad_down: _Floats,
) -> int: ...
def swiglu_experts_forward(
    buf: _Floats,
    gate_up: _Floats,
    down: _Floats,
    expert_offsets: _I64,
    max_rows: int,
    out: _Floats,
    h: Optional[_Floats] = None,
) -> int: ...
def combine_weight_grad(
    grad_out: _Floats, buf: _Floats, pair_position: _I64, token_offsets: _I64
) -> _Floats: ...

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
_F64 = npt.NDArray[np.float64]
_U32 = npt.NDArray[np.uint32]
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
    def __iter__(self) -> Iterator[DocBatch]: ...
    def __next__(self) -> DocBatch: ...

@final
class JsonlWriter:
    def __new__(cls, path: _Path) -> JsonlWriter: ...
    @property
    def lines(self) -> int: ...
    def write(
        self,
        batch: DocBatch,
        rows: _I64,
        signals: Optional[_F64] = None,
        names: Optional[Sequence[str]] = None,
        keep: Optional[npt.NDArray[np.bool_]] = None,
        reasons: Optional[Sequence[Optional[str]]] = None,
    ) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...
