"""Type stubs of the Rust extension module `deepseek_rs._core` (kept in step by mypy.stubtest)."""

from typing import Any, Dict, List, Optional, Tuple, final

import numpy as np
import numpy.typing as npt

_Floats = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_Rows = npt.NDArray[np.float32] | npt.NDArray[np.float64] | npt.NDArray[np.int16]
_I64 = npt.NDArray[np.int64]
_Routing = Tuple[_I64, _I64, _Floats, _I64]

__all__ = [
    "Scheduler",
    "combine",
    "combine_weight_grad",
    "gather",
    "gather_scaled",
    "route_backward",
    "route_group_limited",
    "route_top_k",
    "route_top_p",
    "sort_by_expert",
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
    ) -> None: ...
    def cancel(self, id: int) -> bool: ...
    def next_batch(self, timeout: Optional[float] = None) -> Tuple[str, List[int], int]: ...
    def expire_wait(self, timeout: Optional[float] = None) -> Optional[List[int]]: ...
    def complete(self, ids: List[int], outcome: str = "completed") -> int: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __len__(self) -> int: ...
    def config(self) -> Dict[str, Any]: ...
    def metrics(self) -> Dict[str, Any]: ...
