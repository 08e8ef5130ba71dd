"""Dynamic batching: one torch module served to many concurrent callers.

``DynamicBatcher(model)`` queues each caller's input, lets the Rust scheduler
(``deepseek_rs._core.Scheduler``) decide which inputs run together and when, runs the model once
per batch on a worker thread, and hands each caller exactly its own slice of the output::

    with DynamicBatcher(model, min_size=4, max_size=32, max_queue_delay=0.005) as batcher:
        y = batcher.submit(x).result()          # a concurrent.futures.Future
        y = await batcher.infer(x)              # or from asyncio

Three ways to put inputs together (``collate``):

* ``"stack"``: inputs of one shape ``[*S]`` become ``[B, *S]``; caller ``i`` gets ``out[i]``.
  Inputs of different shapes wait in different buckets.
* ``"pad"``: sequences ``[L_i, *F]`` are padded to ``[B, L_max, *F]``; the model gets the
  boolean ``mask`` ``[B, L_max]`` (True on real rows) as keyword ``mask_arg`` if one is named.
  Lengths are bucketed (``bucket_width``; default: the next power of two) so padding stays
  small. Caller ``i`` gets ``out[i, :L_i]`` (or ``out[i]`` with ``unpad_output=False``).
* ``"ragged"``: sequences are concatenated to ``[sum L_i, *F]`` without padding; the model gets
  the int64 ``offsets`` ``[B + 1]`` as keyword ``offsets_arg`` if one is named. Caller ``i``
  gets rows ``offsets[i]:offsets[i + 1]`` of the output. This suits token-wise models such as
  ``PEAMoE``.

Bad input (not a tensor, wrong dtype, wrong trailing shape) is refused by ``submit`` with a
``DTypeError`` or ``ShapeError``. If the model raises on a batch, the batch is split in halves
until the failing requests are found: only they get the exception. A model output whose first
dimension does not match the batch fails that batch with a ``ShapeError``. A full queue raises
``QueueFullError`` at once; a request that waits past its ``timeout`` gets
``RequestTimeoutError`` and is never run. A ``StopIteration`` or a ``BaseException`` that is not
an ``Exception`` (``SystemExit``...) raised by the model reaches its caller as a ``RuntimeError``
with the original as ``__cause__``. ``shutdown()`` (or leaving the ``with`` block) stops
intake and answers every request already accepted.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import itertools
import threading
import weakref
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _core
from ..config import BatchingConfig, OptimizationConfig, parse_config
from ..errors import DTypeError, InvalidValueError, RequestTimeoutError, ShapeError

COLLATE_MODES = ("stack", "pad", "ragged")


class _RequestFuture(Future):
    """A request's future: cancelling it while the request waits also takes the request out of
    the scheduler's queue (and frees its place); once running it cannot be cancelled."""

    def __init__(self, scheduler: _core.Scheduler, pending: Dict[int, Any], rid: int):
        super().__init__()
        self._scheduler, self._pending, self._rid = scheduler, pending, rid

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        if self._scheduler.cancel(self._rid):
            self._pending.pop(self._rid, None)
        return True


@dataclass
class _Request:
    x: Tensor
    future: Future


def _settle(future: Future, result: Any = None, error: Optional[BaseException] = None) -> bool:
    """Answer a future unless its caller cancelled it meanwhile; True if answered."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
        return True
    except InvalidStateError:
        return False


_held = threading.local()  # .wakers: the event loops to wake once the current batch is answered


def _settle_all(answers: Any) -> None:
    """Settle ``(future, result, error)`` triples; an event loop awaiting several of them is
    woken once, after the last (its thread could otherwise drain, and be woken again, between
    two answers: waking it writes a socket, which lets it take the GIL)."""
    _held.wakers = set()
    try:
        for future, result, error in answers:
            _settle(future, result, error)
    finally:
        wakers, _held.wakers = _held.wakers, None
        for waker in wakers:
            waker.wake()


def _first_param(model: Callable[..., Any]) -> Optional[Tensor]:
    """The model's first floating-point parameter or buffer (int8 weights say nothing about
    the input dtype)."""
    if isinstance(model, nn.Module):
        for p in itertools.chain(model.parameters(), model.buffers()):
            if p.is_floating_point():
                return p
    return None


class _BatchShapeError(ShapeError):
    """The model's output does not line up with the batch: fail the batch, do not bisect."""


class DynamicBatcher:
    """Serve ``model`` to concurrent callers in dynamically formed batches.

    ``min_size``: requests a batch waits for, but never longer than ``max_queue_delay``
    seconds after its oldest request arrived. ``max_size``: requests per batch at most.
    ``max_queue_size``: requests waiting at most (one more gets ``QueueFullError``).
    ``max_batch_cost``: optional cap on a batch's summed cost (rows for ``pad``/``ragged``,
    1 per request for ``stack``). ``preferred_sizes``: batch sizes to form before the delay.
    ``timeout``: default per-request deadline in seconds (None: none). ``item_shape``: the
    shape every input must have (``stack``) or its trailing feature shape (``pad``,
    ``ragged``); None checks nothing. ``dtype``: the dtype inputs must have (default: the
    model's first parameter's; None if it has none). ``device``: where batches are moved before
    the model runs (default: the model's first parameter's device). ``num_workers``: threads
    running the model (one is right for one model on one device). ``max_buckets``: distinct
    bucket keys (input shapes, length buckets) allowed over the batcher's life.

    Futures are answered on a worker thread, so their done callbacks run there: a callback
    must not wait for another request of the same batcher.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        min_size: int = 4,
        max_size: int = 32,
        max_queue_delay: float = 0.005,
        max_queue_size: int = 1024,
        max_batch_cost: Optional[int] = None,
        preferred_sizes: Optional[Sequence[int]] = None,
        collate: str = "stack",
        pad_value: float = 0.0,
        mask_arg: Optional[str] = None,
        offsets_arg: Optional[str] = None,
        unpad_output: bool = True,
        bucket_width: Optional[int] = None,
        timeout: Optional[float] = None,
        item_shape: Optional[Sequence[int]] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[str, torch.device]] = None,
        num_workers: int = 1,
        inference_mode: bool = True,
        max_buckets: int = 1024,
    ):
        if not callable(model):
            raise InvalidValueError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        if collate not in COLLATE_MODES:
            raise InvalidValueError(f"collate must be one of {list(COLLATE_MODES)}, got {collate!r}")
        if bucket_width is not None and (not isinstance(bucket_width, int) or bucket_width < 1):
            raise InvalidValueError(f"bucket_width must be an integer >= 1, got {bucket_width!r}")
        if not isinstance(num_workers, int) or num_workers < 1:
            raise InvalidValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        if timeout is not None:
            self._check_timeout(timeout)
        sizes = {"max_size": max_size, "min_size": min_size, "max_queue_size": max_queue_size}
        sizes["max_buckets"] = max_buckets
        if max_batch_cost is not None:
            sizes["max_batch_cost"] = max_batch_cost
        for i, p in enumerate(preferred_sizes or ()):
            sizes[f"preferred_sizes[{i}]"] = p
        for name, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidValueError(f"{name} must be a non-negative integer, got {v!r}")
        if isinstance(max_queue_delay, bool) or not isinstance(max_queue_delay, (int, float)):
            raise InvalidValueError(f"max_queue_delay must be a number of seconds, got {max_queue_delay!r}")
        # The engine validates the ranges of the sizes, the delay and the budget (one place).
        self._scheduler = _core.Scheduler(
            max_size=max_size,
            min_size=min_size,
            max_queue_delay=float(max_queue_delay),
            max_queue_size=max_queue_size,
            max_batch_cost=max_batch_cost,
            preferred_sizes=None if preferred_sizes is None else list(preferred_sizes),
        )
        param = _first_param(model)
        self.model = model
        self.collate = collate
        self.pad_value = pad_value
        self.mask_arg, self.offsets_arg, self.unpad_output = mask_arg, offsets_arg, unpad_output
        self.bucket_width = bucket_width
        self.timeout = timeout
        self.item_shape = None if item_shape is None else tuple(int(s) for s in item_shape)
        self.dtype = dtype if dtype is not None else (param.dtype if param is not None else None)
        self.device = (
            torch.device(device) if device is not None else (param.device if param is not None else None)
        )
        self.inference_mode = inference_mode
        self._ids = itertools.count()
        self._pending: Dict[int, _Request] = {}
        self._bucket_ids: Dict[Any, int] = {}
        self._bucket_lock = threading.Lock()
        self.max_buckets = max_buckets
        self._workers = [
            threading.Thread(
                target=_serve,
                args=(self._scheduler, self._pending, self._run, torch.get_num_threads()),
                name=f"DynamicBatcher-{i}",
                daemon=True,
            )
            for i in range(num_workers)
        ]
        # The reaper answers timeouts while every worker is busy with a batch.
        self._workers.append(
            threading.Thread(
                target=_reap, args=(self._scheduler, self._pending), name="DynamicBatcher-reaper"
            )
        )
        for w in self._workers:  # daemon threads: a batcher never shut down does not block exit
            w.daemon = True
            w.start()

    @classmethod
    def from_config(cls, model: Callable[..., Any], config: Any = None, **kwargs: Any) -> DynamicBatcher:
        """A batcher configured by the article's YAML ``batching`` section.

        ``config`` is anything ``deepseek_rs.config.parse_config`` reads (a YAML path or string,
        a mapping, an ``OptimizationConfig``) or a ``BatchingConfig``; None means the defaults
        (min 4, max 32, 5 ms). ``strategy: none`` serves one request per model call. Keyword
        arguments set the options the YAML does not have (``collate``, ``item_shape``, ...).
        """
        if config is None:
            batching = BatchingConfig()
        elif isinstance(config, BatchingConfig):
            batching = config
        else:
            cfg = config if isinstance(config, OptimizationConfig) else parse_config(config)
            batching = cfg.batching or BatchingConfig()
        if batching.strategy == "none":
            sizes = {"min_size": 1, "max_size": 1, "max_queue_delay": 0.0}
        else:
            sizes = {
                "min_size": batching.min_size,
                "max_size": batching.max_size,
                "max_queue_delay": batching.max_queue_delay_ms / 1000.0,
            }
        return cls(model, **{**sizes, **kwargs})

    # --- intake -------------------------------------------------------------------------

    @staticmethod
    def _check_timeout(timeout: Any) -> float:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 <= timeout < float("inf")
        ):
            raise InvalidValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        return float(timeout)

    def _check(self, x: Any) -> Tuple[Any, int]:
        """Refuse bad input; return its bucket key and its cost."""
        if not isinstance(x, Tensor):
            raise DTypeError(f"DynamicBatcher inputs must be torch.Tensor, got {type(x).__name__}")
        if self.dtype is not None and x.dtype != self.dtype:
            raise DTypeError(f"input dtype {x.dtype} does not match the model's {self.dtype}")
        if self.collate == "stack":
            if self.item_shape is not None and tuple(x.shape) != self.item_shape:
                raise ShapeError(f"input shape {tuple(x.shape)} does not match item_shape {self.item_shape}")
            return ("stack", tuple(x.shape), x.dtype), 1
        if x.dim() < 1 or x.shape[0] < 1:
            raise ShapeError(
                f"{self.collate} inputs are sequences [L, ...] with L >= 1, got {tuple(x.shape)}"
            )
        features = tuple(x.shape[1:])
        if self.item_shape is not None and features != self.item_shape:
            raise ShapeError(
                f"input shape {tuple(x.shape)} does not match [L, *item_shape], item_shape {self.item_shape}"
            )
        length = int(x.shape[0])
        if self.collate == "ragged":
            return ("ragged", features, x.dtype), length
        if self.bucket_width is not None:
            bound = -(-length // self.bucket_width) * self.bucket_width
        else:
            bound = 1 << (length - 1).bit_length()
        return ("pad", features, x.dtype, bound), length

    def _bucket_id(self, key: Any) -> int:
        bid = self._bucket_ids.get(key)
        if bid is None:
            with self._bucket_lock:
                if key not in self._bucket_ids and len(self._bucket_ids) >= self.max_buckets:
                    # Keys are kept for the batcher's life: bound them (any client could send
                    # a new shape per request).
                    raise ShapeError(
                        f"this input would make bucket key {len(self._bucket_ids) + 1} (max_buckets "
                        f"{self.max_buckets}): too many distinct input shapes; set item_shape or bucket_width"
                    )
                bid = self._bucket_ids.setdefault(key, len(self._bucket_ids))
        return bid

    def submit(self, x: Tensor, *, timeout: Optional[float] = None, priority: int = 0) -> Future:
        """Queue ``x``; the future resolves to this input's slice of the model output.

        ``timeout`` (seconds, default the batcher's) is the request's deadline: past it the
        future fails with ``RequestTimeoutError`` and the request never runs. ``priority``:
        lower is served first (0 is the most urgent), FIFO within a level. Raises
        ``QueueFullError`` when the queue is full and ``ShutdownError`` after ``shutdown``.
        """
        key, cost = self._check(x)
        timeout = self.timeout if timeout is None else self._check_timeout(timeout)
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority < 2**32:
            raise InvalidValueError(f"priority must be an integer in [0, 2**32), got {priority!r}")
        rid = next(self._ids)
        future = _RequestFuture(self._scheduler, self._pending, rid)
        # The payload must be in place before the scheduler can hand the id to a worker.
        self._pending[rid] = _Request(x, future)
        queued = False
        try:
            self._scheduler.submit(
                rid, cost=cost, bucket=self._bucket_id(key), priority=priority, timeout=timeout
            )
            queued = True
        finally:
            if not queued:  # refused (or interrupted before the engine took it)
                self._pending.pop(rid, None)
        return future

    def submit_async(
        self, x: Tensor, *, timeout: Optional[float] = None, priority: int = 0
    ) -> asyncio.Future:
        """``submit`` from a coroutine: an ``asyncio.Future`` of the running loop (bad input, a
        full queue or a shut-down batcher raise here, at once). Cancelling it cancels the
        request. The answers of one batch wake the loop once, not once per request."""
        return _LoopWaker.of(asyncio.get_running_loop()).wrap(
            self.submit(x, timeout=timeout, priority=priority)
        )

    async def infer(self, x: Tensor, *, timeout: Optional[float] = None, priority: int = 0) -> Any:
        """``await`` this input's output; cancelling the awaiting task cancels the request."""
        return await self.submit_async(x, timeout=timeout, priority=priority)

    def __call__(self, x: Tensor, *, timeout: Optional[float] = None, priority: int = 0) -> Any:
        """Blocking call: ``submit(x).result()``."""
        return self.submit(x, timeout=timeout, priority=priority).result()

    # --- execution (worker threads) -----------------------------------------------------

    def _collate(self, xs: List[Tensor]) -> Tuple[Tensor, Dict[str, Tensor], Callable[[Tensor, int], Tensor]]:
        """The model's input, its extra keyword arguments, and how to cut caller i's output."""
        n = len(xs)
        if self.collate == "stack":
            return torch.stack(xs), {}, lambda out, i: out[i]
        lengths = [x.shape[0] for x in xs]
        if self.collate == "ragged":
            offsets = [0, *itertools.accumulate(lengths)]
            kwargs = {}
            if self.offsets_arg is not None:
                kwargs[self.offsets_arg] = torch.tensor(offsets, dtype=torch.int64, device=self.device)
            return torch.cat(xs), kwargs, lambda out, i: out[offsets[i] : offsets[i + 1]]
        longest = max(lengths)
        batch = xs[0].new_full((n, longest, *xs[0].shape[1:]), self.pad_value)
        mask = torch.zeros((n, longest), dtype=torch.bool)
        for i, x in enumerate(xs):
            batch[i, : lengths[i]] = x
            mask[i, : lengths[i]] = True
        kwargs = {}
        if self.mask_arg is not None:
            kwargs[self.mask_arg] = mask.to(self.device) if self.device is not None else mask
        if self.unpad_output:
            return batch, kwargs, lambda out, i: out[i, : lengths[i]]
        return batch, kwargs, lambda out, i: out[i]

    def _expected_rows(self, xs: List[Tensor]) -> int:
        return sum(x.shape[0] for x in xs) if self.collate == "ragged" else len(xs)

    def _forward(self, xs: List[Tensor]) -> List[Any]:
        batch, kwargs, cut = self._collate(xs)
        if self.device is not None:
            batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode(self.inference_mode):
            out = self.model(batch, **kwargs)
        rows = self._expected_rows(xs)
        parts = list(out) if isinstance(out, (tuple, list)) else [out]
        for p in parts:
            if not isinstance(p, Tensor) or p.dim() == 0 or p.shape[0] != rows:
                got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                unit = "rows" if self.collate == "ragged" else "items"
                raise _BatchShapeError(
                    f"the model returned {got} for a batch of {rows} {unit}; outputs must be tensors "
                    f"(or a tuple of tensors) with {rows} in the first dimension"
                )
            if self.collate == "pad" and self.unpad_output and (p.dim() < 2 or p.shape[1] != batch.shape[1]):
                raise _BatchShapeError(
                    f"the model returned {tuple(p.shape)} for a padded batch {tuple(batch.shape[:2])}; "
                    "with unpad_output=True outputs must be [B, L_max, ...]"
                )
        if isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple
            return [type(out)(*(cut(p, i) for p in parts)) for i in range(len(xs))]
        if isinstance(out, (tuple, list)):
            return [type(out)(cut(p, i) for p in parts) for i in range(len(xs))]
        return [cut(out, i) for i in range(len(xs))]

    def _run(
        self, batch: List[Tuple[int, _Request]]
    ) -> List[Tuple[int, _Request, Any, Optional[BaseException]]]:
        """Run one batch, isolating failures by bisection: (id, request, output, error) each."""
        try:
            outs = self._forward([r.x for _, r in batch])
        except _BatchShapeError as e:
            return [(rid, r, None, ShapeError(str(e))) for rid, r in batch]
        except BaseException as e:  # even SystemExit from the model: isolate, then wrap it
            if len(batch) == 1:
                return [(batch[0][0], batch[0][1], None, _as_exception(e))]
            half = len(batch) // 2
            return self._run(batch[:half]) + self._run(batch[half:])
        return [(rid, r, y, None) for (rid, r), y in zip(batch, outs)]

    # --- life cycle -------------------------------------------------------------------

    def shutdown(self, wait: bool = True) -> None:
        """Stop intake; every request already accepted is still answered. With ``wait``,
        return once they all are."""
        self._scheduler.close()
        if wait:
            for w in self._workers:
                if w is not threading.current_thread():
                    w.join()

    @property
    def closed(self) -> bool:
        """Whether intake has stopped."""
        return bool(self._scheduler.closed)

    def __len__(self) -> int:
        """Requests waiting for a batch."""
        return len(self._scheduler)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True)

    def config(self) -> Dict[str, Any]:
        """The scheduling policy in force (sizes, delay, queue size, budget, preferred sizes)."""
        return dict(self._scheduler.config())

    def metrics(self) -> Dict[str, Any]:
        """Counters (accepted, rejected, timed_out, cancelled, completed, failed, batches), the
        batch-size histogram (``batch_sizes[n]``: batches of n), ``mean_batch_size``, and the
        ``queue_time`` and ``latency`` (arrival to answer) histograms with p50/p90/p99 in seconds."""
        return dict(self._scheduler.metrics())


class _LoopWaker:
    """Hands answers from worker threads to the asyncio futures of one event loop.

    ``asyncio.wrap_future`` calls ``loop.call_soon_threadsafe`` once per answered future, and
    each call writes the loop's self-pipe and wakes it. Here answers queue up and only the first
    one since the loop last drained them wakes it: one wake-up per batch, not per request.
    """

    _by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # the loop may go away with futures still pending
        self._ready: collections.deque = collections.deque()
        self._scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _LoopWaker:
        """The loop's waker (called on the loop's own thread only, so no lock)."""
        waker = cls._by_loop.get(loop)
        if waker is None:
            waker = cls._by_loop[loop] = cls(loop)
        return waker

    def wrap(self, future: Future) -> asyncio.Future:
        loop = self._loop()
        assert loop is not None  # called on the running loop
        waiter = loop.create_future()

        def cancel_request(w: asyncio.Future) -> None:
            if w.cancelled():
                future.cancel()  # a request still waiting leaves the queue (_RequestFuture)

        waiter.add_done_callback(cancel_request)
        future.add_done_callback(lambda f: self._post(f, waiter))
        return waiter

    def _post(self, future: Future, waiter: asyncio.Future) -> None:
        """Any thread: queue an answer; wake the loop now, or after the batch (``_settle_all``)."""
        self._ready.append((future, waiter))
        held = getattr(_held, "wakers", None)
        if held is not None:
            held.add(self)
        else:
            self.wake()

    def wake(self) -> None:
        """Have the loop drain the answers, unless a drain is already pending."""
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop()
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._drain)
                    return
                except RuntimeError:  # the loop is closed
                    pass
            # Nobody awaits these answers any more, and holding their futures would keep the loop
            # alive. The flag is reset first: an answer queued after the clear below then makes
            # its own wake-up fail here and be dropped too.
            self._scheduled = False
            self._ready.clear()

    def _drain(self) -> None:
        """On the loop: answer every queued waiter. The flag is cleared first, so an answer
        queued meanwhile either is taken below or schedules the next drain."""
        self._scheduled = False
        ready = self._ready
        try:
            while ready:
                future, waiter = ready.popleft()
                if waiter.done():  # its task was cancelled meanwhile
                    continue
                if future.cancelled():
                    waiter.cancel()
                    continue
                try:
                    error = future.exception()
                    if error is not None:
                        waiter.set_exception(error)
                    else:
                        waiter.set_result(future.result())
                except Exception as e:  # one answer asyncio refuses must not strand the others
                    if not waiter.done():
                        err = RuntimeError(f"asyncio refused the answer: {type(e).__name__}: {e}")
                        err.__cause__ = e
                        waiter.set_exception(err)
        finally:  # a KeyboardInterrupt raised mid-drain leaves the rest to the next drain
            if ready:
                self.wake()


def _timeout_error() -> RequestTimeoutError:
    return RequestTimeoutError("the request waited past its timeout; it was not run")


def _own_copy(e: Exception) -> Exception:
    """One exception object per caller: raising it in each caller's thread grows its traceback."""
    try:
        c = copy.copy(e)
    except Exception:  # an exception type that cannot be copied: share it
        return e
    c.__cause__, c.__context__ = e.__cause__, e.__context__
    return c


def _as_exception(e: BaseException) -> Exception:
    """What a caller's future may carry: a SystemExit or KeyboardInterrupt raised by the model
    would escape ``asyncio.run`` or kill the caller's thread, and an asyncio future refuses a
    StopIteration (a generator re-raising it would just stop), so these are wrapped in a
    RuntimeError, as PEP 479 does for generators."""
    if isinstance(e, Exception) and not isinstance(e, (StopIteration, StopAsyncIteration)):
        return e
    err = RuntimeError(f"the model raised {type(e).__name__}: {e}")
    err.__cause__ = e
    return err


def _serve(
    scheduler: _core.Scheduler,
    pending: Dict[int, _Request],
    run: Callable[[List[Tuple[int, _Request]]], List[Tuple[int, _Request, Any, Optional[BaseException]]]],
    threads: int,
) -> None:
    """A worker: wait (in Rust, GIL released) for the scheduler's next decision and carry it out.

    The loop survives anything raised while carrying out a decision (every request it had taken
    is then failed and reported), because a dead worker would leave every later caller hanging.
    """
    # torch's intra-op thread count (OpenMP's) is per thread: a new thread would get one per
    # core whatever the creator set, and oversubscribed OpenMP spinning costs 100x on a busy host.
    torch.set_num_threads(threads)
    while True:
        kind, ids, _ = scheduler.next_batch(None)
        if kind == "closed":
            return
        taken: List[Tuple[int, _Request]] = []
        try:
            if kind == "timed_out":
                requests = [pending.pop(rid, None) for rid in ids]
                _settle_all((r.future, None, _timeout_error()) for r in requests if r is not None)
            elif kind == "batch":
                _execute(scheduler, pending, run, ids, taken)
        except BaseException as e:
            error = _as_exception(e)
            _settle_all((r.future, None, _own_copy(error)) for _, r in taken)
            scheduler.complete([rid for rid, _ in taken], "failed")  # ids already reported are ignored


def _execute(
    scheduler: _core.Scheduler,
    pending: Dict[int, _Request],
    run: Callable[[List[Tuple[int, _Request]]], List[Tuple[int, _Request, Any, Optional[BaseException]]]],
    ids: List[int],
    taken: List[Tuple[int, _Request]],
) -> None:
    cancelled = []
    for rid in ids:
        req = pending.pop(rid, None)
        try:
            # False: cancelled by its caller; RuntimeError: the caller already ran or settled it.
            runnable = req is not None and req.future.set_running_or_notify_cancel()
        except RuntimeError:
            runnable = False
        if runnable:
            taken.append((rid, req))
        else:
            cancelled.append(rid)
    if cancelled:
        scheduler.complete(cancelled, "cancelled")
    if not taken:
        return
    answers = run(taken)
    # Count before answering, so a caller that has its answer sees it in the metrics.
    failed = [rid for rid, _, _, error in answers if error is not None]
    scheduler.complete([rid for rid, _, _, error in answers if error is None], "completed")
    if failed:
        scheduler.complete(failed, "failed")
    _settle_all((r.future, y, error) for _, r, y, error in answers)


def _reap(scheduler: _core.Scheduler, pending: Dict[int, _Request]) -> None:
    """Answers timeouts on time even while the workers are busy running batches."""
    while True:
        try:
            ids = scheduler.expire_wait(None)
            if ids is None:  # closed and drained
                return
            requests = [pending.pop(rid, None) for rid in ids]
            _settle_all((r.future, None, _timeout_error()) for r in requests if r is not None)
        except Exception:  # never let a timeout go unanswered because of one bad future
            continue


__all__ = ["COLLATE_MODES", "DynamicBatcher"]
