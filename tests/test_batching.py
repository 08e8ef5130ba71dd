"""DynamicBatcher and the Rust scheduler behind it (deepseek_rs._core.Scheduler)."""

import asyncio
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch
from deepseek_rs import (
    DTypeError,
    DynamicBatcher,
    InvalidValueError,
    PEAMoE,
    QueueFullError,
    RequestTimeoutError,
    ShapeError,
    ShutdownError,
)
from deepseek_rs._core import Scheduler
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule
from torch import nn

RESULT_TIMEOUT = 30  # seconds: a hang fails the test instead of stalling the suite


class Recorder(nn.Module):
    """Row-wise linear model that records the batch shapes (and kwargs) it was called with."""

    def __init__(self, d=4, out=3):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, out)
        self.calls = []
        self.lock = threading.Lock()

    def forward(self, x, **kwargs):
        with self.lock:
            self.calls.append((tuple(x.shape), {k: v.clone() for k, v in kwargs.items()}))
        return self.lin(x)


class Gate(nn.Module):
    """Blocks every call until released: lets a test fill the queue deterministically."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.seen = []

    def forward(self, x):
        self.entered.set()
        self.release.wait(RESULT_TIMEOUT)
        self.seen.extend(x[:, 0].tolist())
        return x * 2


def results(futures):
    return [f.result(timeout=RESULT_TIMEOUT) for f in futures]


# --- batching modes against the plain model ------------------------------------------------


@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=20), collate=st.sampled_from(["pad", "ragged"])
)
@settings(max_examples=15)
def test_sequences_get_exactly_their_own_rows(lengths, collate):
    model = Recorder()
    xs = [torch.randn(n, 4) for n in lengths]
    with DynamicBatcher(model, collate=collate, min_size=3, max_size=5, max_queue_delay=0.002) as b:
        outs = results([b.submit(x) for x in xs])
    with torch.no_grad():
        for x, y in zip(xs, outs):
            torch.testing.assert_close(y, model.lin(x))
    for shape, _ in model.calls:
        if collate == "pad":
            assert shape[0] <= 5
        else:
            assert len(shape) == 2  # concatenated rows, never padded


def test_pad_passes_the_mask_and_buckets_lengths_so_padding_stays_small():
    model = Recorder()
    xs = [torch.randn(n, 4) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 30)]
    with DynamicBatcher(model, collate="pad", mask_arg="mask", min_size=32, max_queue_delay=0.05) as b:
        outs = results([b.submit(x) for x in xs])
    with torch.no_grad():
        for x, y in zip(xs, outs):
            torch.testing.assert_close(y, model.lin(x))
    for shape, kwargs in model.calls:
        mask = kwargs["mask"]
        assert mask.shape == shape[:2] and mask.dtype == torch.bool
        lengths = mask.sum(1)
        assert int(lengths.max()) == shape[1]  # no all-padding columns
        assert int(lengths.min()) * 2 > shape[1]  # power-of-two buckets: under 2x padding
    assert len(model.calls) == 6  # buckets 1, 2, 4, 8, 16, 32


def test_ragged_passes_offsets_and_stack_groups_by_shape():
    model = Recorder()
    with DynamicBatcher(
        model, collate="ragged", offsets_arg="offsets", min_size=3, max_queue_delay=0.05
    ) as b:
        results([b.submit(torch.randn(n, 4)) for n in (2, 3, 1)])
    assert model.calls[0][1]["offsets"].tolist() == [0, 2, 5, 6]
    model = Recorder()
    with DynamicBatcher(model, min_size=4, max_queue_delay=0.02) as b:
        xs = [torch.randn(4) for _ in range(4)] + [torch.randn(2, 4) for _ in range(4)]
        outs = results([b.submit(x) for x in xs])
    assert sorted(shape for shape, _ in model.calls) == [(4, 2, 4), (4, 4)]
    with torch.no_grad():
        for x, y in zip(xs, outs):
            torch.testing.assert_close(y, model.lin(x))


def test_tuple_outputs_are_sliced_per_caller():
    class Two(nn.Module):
        def forward(self, x):
            return x + 1, x.sum(-1)

    with DynamicBatcher(Two(), collate="ragged", dtype=None, min_size=2, max_queue_delay=0.02) as b:
        xs = [torch.randn(2, 3), torch.randn(5, 3)]
        for x, (a, s) in zip(xs, results([b.submit(x) for x in xs])):
            torch.testing.assert_close(a, x + 1)
            torch.testing.assert_close(s, x.sum(-1))


def test_peamoe_through_the_batcher_matches_direct_calls():
    torch.manual_seed(0)
    model = PEAMoE(16, 32, 4, router="top_k", top_k=2).eval()
    xs = [torch.randn(n, 16) for n in (3, 1, 7, 2, 5)]
    with DynamicBatcher(model, collate="ragged", min_size=5, max_queue_delay=0.05, item_shape=(16,)) as b:
        outs = results([b.submit(x) for x in xs])
    with torch.no_grad():
        for x, y in zip(xs, outs):
            torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)


# --- bad input and failures ------------------------------------------------------------------


def test_bad_inputs_are_refused_at_submit():
    with DynamicBatcher(nn.Linear(4, 2), item_shape=(4,)) as b:
        with pytest.raises(DTypeError, match="torch.Tensor"):
            b.submit([1.0, 2.0, 3.0, 4.0])
        with pytest.raises(DTypeError, match="float64 does not match the model's torch.float32"):
            b.submit(torch.zeros(4, dtype=torch.float64))
        with pytest.raises(ShapeError, match=r"\(5,\) does not match item_shape \(4,\)"):
            b.submit(torch.zeros(5))
        with pytest.raises(InvalidValueError, match="timeout"):
            b.submit(torch.zeros(4), timeout=-1)
        with pytest.raises(InvalidValueError, match="priority"):
            b.submit(torch.zeros(4), priority=-1)
        assert b.metrics()["accepted"] == 0
    with DynamicBatcher(nn.Linear(4, 2), collate="pad") as b:
        with pytest.raises(ShapeError, match="L >= 1"):
            b.submit(torch.zeros(0, 4))
    for kwargs, match in [
        ({"min_size": 0}, "min_size"),
        ({"min_size": 5, "max_size": 4}, "min_size"),
        ({"max_queue_delay": -1.0}, "max_queue_delay"),
        ({"max_queue_size": 0}, "max_queue_size"),
        ({"preferred_sizes": [64]}, "preferred"),
        ({"collate": "zip"}, "collate"),
        ({"bucket_width": 0}, "bucket_width"),
        ({"max_size": -1}, "max_size must be a non-negative integer"),
        ({"max_size": 2.5}, "max_size must be a non-negative integer"),
        ({"preferred_sizes": [2, -3]}, r"preferred_sizes\[1\]"),
        ({"max_queue_delay": "5ms"}, "max_queue_delay must be a number"),
        ({"max_batch_cost": 0}, "max_batch_cost"),
    ]:
        with pytest.raises(InvalidValueError, match=match):
            DynamicBatcher(nn.Linear(4, 2), **kwargs)


def test_a_failing_request_is_isolated_and_everyone_else_is_answered():
    calls = []

    class Picky(nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            if torch.isnan(x).any():
                raise RuntimeError("NaN in the batch")
            return x * 3

    xs = [torch.randn(4) for _ in range(16)]
    poisoned = {3, 11}
    for i in poisoned:
        xs[i][0] = float("nan")
    with DynamicBatcher(Picky(), dtype=torch.float32, min_size=16, max_size=16, max_queue_delay=1.0) as b:
        futures = [b.submit(x) for x in xs]
        for i, f in enumerate(futures):
            if i in poisoned:
                with pytest.raises(RuntimeError, match="NaN in the batch"):
                    f.result(timeout=RESULT_TIMEOUT)
            else:
                torch.testing.assert_close(f.result(timeout=RESULT_TIMEOUT), xs[i] * 3)
        m = b.metrics()
    assert calls[0] == 16 and len(calls) <= 1 + 2 * 2 * 4  # bisection: O(failures * log n) calls
    assert (m["completed"], m["failed"]) == (14, 2)


def test_a_wrong_output_length_fails_that_batch_without_hanging():
    class Drops(nn.Module):
        def forward(self, x):
            return x[:-1]

    with DynamicBatcher(Drops(), dtype=None, min_size=3, max_queue_delay=0.05) as b:
        futures = [b.submit(torch.randn(2)) for _ in range(3)]
        for f in futures:
            with pytest.raises(ShapeError, match="returned \\(2, 2\\) for a batch of 3 items"):
                f.result(timeout=RESULT_TIMEOUT)
        assert b.metrics()["failed"] == 3
        with pytest.raises(ShapeError, match="returned"):
            b.submit(torch.randn(2)).result(timeout=RESULT_TIMEOUT)  # a lone request too


# --- queueing: backpressure, deadlines, cancellation, priorities, shutdown -----------------


def test_queue_full_is_immediate_and_deadlines_cancel_and_priorities_apply():
    gate = Gate()
    b = DynamicBatcher(gate, dtype=None, min_size=1, max_size=1, max_queue_size=4)
    first = b.submit(torch.tensor([0.0]))
    assert gate.entered.wait(RESULT_TIMEOUT)  # the worker is busy with request 0
    low = b.submit(torch.tensor([1.0]), priority=5)
    late = b.submit(torch.tensor([2.0]), timeout=1.0)
    cancelled = b.submit(torch.tensor([3.0]))
    high = b.submit(torch.tensor([4.0]), priority=0)
    start = time.monotonic()
    with pytest.raises(QueueFullError, match="queue is full"):
        b.submit(torch.tensor([5.0]))
    assert time.monotonic() - start < 1.0
    assert cancelled.cancel()
    assert b.submit(torch.tensor([6.0]), priority=9) is not None  # the cancelled slot is free again
    assert isinstance(late.exception(timeout=RESULT_TIMEOUT), RequestTimeoutError)  # while busy
    gate.release.set()
    assert [y.item() for y in results([first, high, low])] == [0.0, 8.0, 2.0]
    with pytest.raises(RequestTimeoutError):
        late.result(timeout=RESULT_TIMEOUT)
    with pytest.raises(CancelledError):
        cancelled.result(timeout=RESULT_TIMEOUT)
    b.shutdown()
    assert gate.seen == [0.0, 4.0, 1.0, 6.0]  # priority order; the late and cancelled never ran
    m = b.metrics()
    assert (m["accepted"], m["rejected"], m["timed_out"], m["cancelled"], m["completed"]) == (6, 1, 1, 1, 4)


def test_shutdown_answers_everything_accepted_and_refuses_new_work():
    model = Recorder()
    b = DynamicBatcher(model, min_size=32, max_queue_delay=10.0)  # would wait 10 s for a batch
    futures = [b.submit(torch.randn(4)) for _ in range(5)]
    start = time.monotonic()
    b.shutdown(wait=True)
    assert time.monotonic() - start < 5.0  # closing dispatches at once
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(ShutdownError):
        b.submit(torch.randn(4))
    assert b.closed and b.metrics()["rejected"] == 1


def test_async_infer():
    model = Recorder()

    async def main(b):
        xs = [torch.randn(4) for _ in range(40)]
        ys = await asyncio.gather(*(b.infer(x) for x in xs))
        return xs, ys

    with DynamicBatcher(model, max_queue_delay=0.01) as b:
        xs, ys = asyncio.run(main(b))
        assert b.metrics()["mean_batch_size"] > 1
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(ys), model.lin(torch.stack(xs)))


def test_async_answers_wake_the_loop_once_per_batch_and_cancel_and_errors_reach_the_awaiter():
    gate = Gate()
    wakeups = []

    async def main(b):
        loop = asyncio.get_running_loop()
        threadsafe = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            wakeups.append(threading.current_thread().name)
            return threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted
        first = b.submit_async(torch.tensor([0.0]))
        assert await asyncio.to_thread(gate.entered.wait, RESULT_TIMEOUT)  # the worker is busy
        wakeups.clear()
        waiting = [b.submit_async(torch.tensor([float(i)])) for i in range(1, 9)]
        late = b.submit_async(torch.tensor([-1.0]), timeout=0.0)
        dropped = asyncio.ensure_future(b.infer(torch.tensor([-2.0])))
        await asyncio.sleep(0)  # dropped is submitted
        dropped.cancel()
        with pytest.raises(RequestTimeoutError):
            await asyncio.wait_for(late, RESULT_TIMEOUT)
        with pytest.raises(asyncio.CancelledError):
            await dropped
        with pytest.raises(ShapeError):  # bad input raises at submit, not in the future
            b.submit_async(torch.tensor([1.0, 2.0]))
        gate.release.set()
        ys = await asyncio.wait_for(asyncio.gather(first, *waiting), RESULT_TIMEOUT)
        del loop.call_soon_threadsafe  # asyncio.run's own clean-up is not counted
        return [y.item() for y in ys]

    with DynamicBatcher(gate, dtype=None, item_shape=(1,), min_size=1, max_size=8, max_queue_delay=0.0) as b:
        assert asyncio.run(main(b)) == [2.0 * i for i in range(9)]
        m = b.metrics()
    assert gate.seen == [0.0, *map(float, range(1, 9))]  # the late and the cancelled never ran
    assert (m["timed_out"], m["cancelled"], m["completed"], m["batch_sizes"][8]) == (1, 1, 9, 1)
    # The timeout, the cancel (on the loop's own thread), the first batch and the batch of 8: at
    # most one wake-up each, whatever the batch size (fewer when one lands before the loop drained).
    assert wakeups.count("DynamicBatcher-0") <= 2 and len(wakeups) <= 4, wakeups
    assert set(wakeups) <= {"DynamicBatcher-reaper", "MainThread", "DynamicBatcher-0"}, wakeups


@pytest.mark.parametrize("num_workers", [1, 3])
def test_many_threads_no_request_lost_or_answered_twice(num_workers):
    model = Recorder()
    n_threads, per_thread = 16, 40
    got = [[] for _ in range(n_threads)]
    errors = []

    def client(t, b):
        try:
            for i in range(per_thread):
                x = torch.full((4,), float(t * 1000 + i))
                got[t].append((x, b.submit(x, timeout=60).result(timeout=RESULT_TIMEOUT)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with DynamicBatcher(model, min_size=4, max_size=8, max_queue_delay=0.002, num_workers=num_workers) as b:
        threads = [threading.Thread(target=client, args=(t, b)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = b.metrics()
    assert not errors
    with torch.no_grad():
        for rows in got:
            assert len(rows) == per_thread
            for x, y in rows:
                torch.testing.assert_close(y, model.lin(x))
    total = n_threads * per_thread
    assert m["completed"] == m["accepted"] == total
    assert sum(n * c for n, c in enumerate(m["batch_sizes"])) == total
    assert max(shape[0] for shape, _ in model.calls) <= 8
    assert m["latency"]["count"] == total and 0 < m["latency"]["p50"] <= m["latency"]["p99"]


# --- the scheduler itself: a state machine over the Python bindings ------------------------


class SchedulerMachine(RuleBasedStateMachine):
    """Any interleaving of submit, cancel, deadline expiry and shutdown: no request lost or
    handed out twice, no batch over max_size or mixing buckets, nothing run past its deadline."""

    MAX_SIZE, MIN_SIZE, QUEUE = 4, 2, 12
    waiting = Bundle("waiting")

    def __init__(self):
        super().__init__()
        self.s = Scheduler(
            max_size=self.MAX_SIZE, min_size=self.MIN_SIZE, max_queue_delay=0.003, max_queue_size=self.QUEUE
        )
        self.next_id = 0
        self.accepted = {}  # id -> (bucket, deadline in ns on the scheduler's clock, or None)
        self.ended = set()

    @rule(
        target=waiting,
        bucket=st.integers(0, 1),
        priority=st.integers(0, 2),
        timeout=st.sampled_from([None, 0.0, 0.002, 0.05]),
    )
    def submit(self, bucket, priority, timeout):
        rid = self.next_id
        self.next_id += 1
        full = len(self.s) >= self.QUEUE
        try:
            deadline = self.s.submit(rid, bucket=bucket, priority=priority, timeout=timeout)
        except QueueFullError:
            assert full
            return -1
        except ShutdownError:
            assert self.s.closed
            return -1
        assert not self.s.closed
        assert (deadline is None) == (timeout is None)
        self.accepted[rid] = (bucket, deadline)  # the engine's own deadline: checked exactly
        return rid

    @rule(bucket=st.integers(0, 1), n=st.integers(2, 8))
    def burst(self, bucket, n):
        for _ in range(n):
            self.submit(bucket, priority=0, timeout=None)

    @rule(rid=consumes(waiting))
    def cancel(self, rid):
        if rid < 0:
            return
        was_waiting = rid not in self.ended
        if self.s.cancel(rid):
            assert was_waiting
            self.ended.add(rid)

    def handle(self, kind, ids, bucket, at):
        """Check one decision, taken at ``at`` (ns, the clock deadlines are on): exactly, with
        the engine's own instants, so no violation hides in the time between calls."""
        if kind == "batch":
            assert 1 <= len(ids) <= self.MAX_SIZE
            for rid in ids:
                b, deadline = self.accepted[rid]
                assert b == bucket, "a batch mixed bucket keys"
                assert deadline is None or at < deadline, "dispatched at or after its deadline"
                assert rid not in self.ended, "handed out twice"
                self.ended.add(rid)
            self.s.complete(ids)
        elif kind == "timed_out":
            assert ids
            for rid in ids:
                deadline = self.accepted[rid][1]
                assert deadline is not None and deadline <= at, "timed out before its deadline"
                assert rid not in self.ended
                self.ended.add(rid)
        else:
            assert kind in ("idle", "closed") and not ids
            waiting = [d for r, (_, d) in self.accepted.items() if r not in self.ended]
            if kind == "closed":
                assert self.s.closed and not waiting, "closed with requests still waiting"
            else:  # nothing was due: in particular no waiting request was past its deadline
                assert all(d is None or at < d for d in waiting), "left waiting past its deadline"

    @rule()
    def poll(self):
        self.handle(*self.s.next_batch_at(0.0))

    @rule()
    def let_time_pass(self):
        time.sleep(0.002)

    @precondition(lambda self: not self.s.closed and len(self.s) >= 3)
    @rule()
    def shutdown(self):
        self.s.close()

    @invariant()
    def bounded(self):
        assert len(self.s) <= self.QUEUE

    def teardown(self):
        self.s.close()
        while True:
            kind, ids, bucket, at = self.s.next_batch_at(5.0)
            if kind == "closed":
                break
            assert kind != "idle", "a closed scheduler must drain without waiting"
            self.handle(kind, ids, bucket, at)
        assert self.ended == set(self.accepted), "requests lost"
        m = self.s.metrics()
        assert m["accepted"] == len(self.accepted) and m["in_flight"] == 0


SchedulerMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=50, deadline=None)
TestSchedulerMachine = SchedulerMachine.TestCase


def test_the_worker_runs_with_the_creators_torch_thread_count():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with DynamicBatcher(Probe(), dtype=None, min_size=1) as b:
            b.submit(torch.zeros(2)).result(timeout=RESULT_TIMEOUT)
    finally:
        torch.set_num_threads(before)
    assert seen == [1]


def test_from_config_reads_the_articles_yaml_block():
    yaml_text = "optimization:\n  batching: {strategy: dynamic, min_size: 4, max_size: 32}\n"
    with DynamicBatcher.from_config(nn.Linear(4, 2), yaml_text, max_queue_size=7) as b:
        c = b.config()
        assert (c["min_size"], c["max_size"], c["max_queue_delay"], c["max_queue_size"]) == (4, 32, 0.005, 7)
    with DynamicBatcher.from_config(nn.Linear(4, 2), {"batching": {"strategy": "none"}}) as b:
        assert (b.config()["min_size"], b.config()["max_size"]) == (1, 1)
    with pytest.raises(InvalidValueError, match=r"optimization\.batching: min_size must be in"):
        DynamicBatcher.from_config(nn.Linear(4, 2), {"batching": {"min_size": 40}})


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["good", "poison", "cancel", "late"]),
            st.integers(1, 5),  # length
            st.integers(0, 2),  # priority
        ),
        min_size=1,
        max_size=40,
    ),
    collate=st.sampled_from(["pad", "ragged"]),
)
@settings(max_examples=15)
def test_every_future_settles_once_with_its_own_answer(ops, collate):
    """Random mixes of good, failing, cancelled and expiring requests, then shutdown: every
    future ends, good ones with exactly their rows, failing ones with the model's error."""

    class Doubler(nn.Module):
        def forward(self, x):
            if (x < 0).any():
                raise RuntimeError("negative input")
            return x * 2

    b = DynamicBatcher(Doubler(), dtype=None, collate=collate, min_size=3, max_size=4, max_queue_delay=0.001)
    submitted = []
    for i, (kind, length, priority) in enumerate(ops):
        x = torch.full((length, 2), float(i + 1)) * (-1 if kind == "poison" else 1)
        f = b.submit(x, priority=priority, timeout=0.0 if kind == "late" else None)
        if kind == "cancel":
            f.cancel()  # may be too late if the batch already started: then it is answered
        submitted.append((kind, x, f))
    b.shutdown(wait=True)
    for kind, x, f in submitted:
        assert f.done()
        if f.cancelled():
            assert kind == "cancel"
        elif kind in ("good", "cancel"):
            torch.testing.assert_close(f.result(), x * 2)
        elif kind == "poison":
            with pytest.raises(RuntimeError, match="negative input"):
                f.result()
        else:  # "late": its deadline is its arrival, so it can never be dispatched
            assert isinstance(f.exception(), RequestTimeoutError)
    m = b.metrics()
    assert m["accepted"] == len(ops) and m["in_flight"] == 0 and m["queue_depth"] == 0
    assert m["completed"] + m["failed"] + m["cancelled"] + m["timed_out"] == len(ops)


def test_huge_delays_and_timeouts_are_no_limit_not_a_crash():
    s = Scheduler(max_queue_delay=1e19)
    s.submit(1, timeout=1e19)
    assert s.expire_wait(0.001) == []
    with DynamicBatcher(Recorder(), min_size=2, max_queue_delay=1e19, timeout=1e19) as b:
        futures = [b.submit(torch.randn(4)) for _ in range(2)]  # min_size reached: no delay needed
        assert all(f.result(timeout=RESULT_TIMEOUT).shape == (3,) for f in futures)
        late = b.submit(torch.randn(4))  # waits for a companion, forever
    assert late.result(timeout=RESULT_TIMEOUT).shape == (3,)  # ... until shutdown drains it


def test_timeouts_are_answered_while_the_worker_is_busy_and_short_deadlines_do_not_wait():
    gate = Gate()
    with DynamicBatcher(gate, dtype=None, min_size=1, max_size=1) as b:
        running = b.submit(torch.tensor([1.0]))
        assert gate.entered.wait(RESULT_TIMEOUT)
        start = time.monotonic()
        doomed = b.submit(torch.tensor([2.0]), timeout=0.05)
        with pytest.raises(RequestTimeoutError):
            doomed.result(timeout=RESULT_TIMEOUT)
        assert time.monotonic() - start < RESULT_TIMEOUT / 2 and not gate.release.is_set()
        gate.release.set()
        assert running.result(timeout=RESULT_TIMEOUT).item() == 2.0
    # A deadline shorter than max_queue_delay: an idle worker runs the request at once.
    with DynamicBatcher(Recorder(), min_size=4, max_queue_delay=5.0) as b:
        assert b.submit(torch.randn(4), timeout=0.5).result(timeout=RESULT_TIMEOUT).shape == (3,)


def test_the_worker_survives_a_future_its_caller_already_ran_and_a_model_calling_exit():
    gate = Gate()
    with DynamicBatcher(gate, dtype=None, min_size=1, max_size=1) as b:
        first = b.submit(torch.tensor([1.0]))
        assert gate.entered.wait(RESULT_TIMEOUT)
        hijacked = b.submit(torch.tensor([2.0]))
        assert hijacked.set_running_or_notify_cancel()  # the caller misuses its future
        after = b.submit(torch.tensor([3.0]))
        gate.release.set()
        assert first.result(timeout=RESULT_TIMEOUT).item() == 2.0
        assert after.result(timeout=RESULT_TIMEOUT).item() == 6.0  # the worker is alive

    class Exits(nn.Module):
        def forward(self, x):
            if (x < 0).any():
                raise SystemExit("bye")
            return x + 1

    with DynamicBatcher(Exits(), dtype=None, min_size=4, max_queue_delay=1.0) as b:
        futures = [b.submit(torch.tensor([v])) for v in (1.0, -1.0, 2.0, 3.0)]
        with pytest.raises(RuntimeError, match="the model raised SystemExit: bye") as info:
            futures[1].result(timeout=RESULT_TIMEOUT)
        assert isinstance(info.value.__cause__, SystemExit)
        assert [futures[i].result(timeout=RESULT_TIMEOUT).item() for i in (0, 2, 3)] == [2.0, 3.0, 4.0]


def test_namedtuple_outputs_keep_their_type():
    from collections import namedtuple

    Out = namedtuple("Out", "double total")

    class Model(nn.Module):
        def forward(self, x):
            return Out(x * 2, x.sum(-1))

    with DynamicBatcher(Model(), dtype=None, collate="ragged", min_size=2, max_queue_delay=0.05) as b:
        a, c = results([b.submit(torch.ones(2, 3)), b.submit(torch.ones(1, 3))])
    assert isinstance(a, Out) and a.double.shape == (2, 3) and c.total.tolist() == [3.0]


def test_distinct_bucket_keys_are_bounded():
    with DynamicBatcher(nn.Identity(), max_buckets=2, min_size=1) as b:
        b.submit(torch.zeros(1)).result(timeout=RESULT_TIMEOUT)
        b.submit(torch.zeros(2)).result(timeout=RESULT_TIMEOUT)
        b.submit(torch.ones(2)).result(timeout=RESULT_TIMEOUT)  # a known key is fine
        with pytest.raises(ShapeError, match="max_buckets 2"):
            b.submit(torch.zeros(3))
        assert b.metrics()["accepted"] == 3


def test_an_answer_arriving_after_its_event_loop_closed_is_dropped_and_frees_the_loop():
    import gc
    import weakref

    from deepseek_rs.serving.batcher import _LoopWaker

    gate = Gate()
    loops = []

    async def main(b):
        loops.append(weakref.ref(asyncio.get_running_loop()))
        # Not awaited: the loop closes first. Two requests, answered in two batches.
        return [b.submit_async(torch.tensor([1.0])), b.submit_async(torch.tensor([2.0]))]

    with DynamicBatcher(gate, dtype=None, min_size=1, max_size=1, max_queue_delay=0.0) as b:
        waiters = asyncio.run(main(b))
        assert gate.entered.wait(RESULT_TIMEOUT)
        gate.release.set()  # both answered after the loop closed, the second after the first
        del waiters
    # The second answer must not be kept (with the loop) after the first found the loop closed.
    gc.collect()
    assert loops[0]() is None, "the closed loop is still referenced"
    assert not any(w._ready for w in _LoopWaker._by_loop.values())


def test_stop_iteration_from_the_model_is_a_runtime_error_and_strands_no_awaiter():
    class Stops(nn.Module):
        def forward(self, x):
            if (x == 7).any():
                next(iter(()))  # StopIteration, an Exception that asyncio futures refuse
            return x * 2

    async def main(b):
        waiters = [b.submit_async(torch.tensor([v])) for v in (7.0, *map(float, range(7)))]
        done = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), RESULT_TIMEOUT)
        return done

    with DynamicBatcher(Stops(), dtype=None, item_shape=(1,), min_size=8, max_queue_delay=5.0) as b:
        bad, *good = asyncio.run(main(b))
        assert b.metrics()["batch_sizes"][8] == 1
        sync = b.submit(torch.tensor([7.0]))
        with pytest.raises(RuntimeError, match="the model raised StopIteration") as info:
            sync.result(timeout=RESULT_TIMEOUT)
        assert isinstance(info.value.__cause__, StopIteration)
    assert isinstance(bad, RuntimeError) and isinstance(bad.__cause__, StopIteration)
    assert [y.item() for y in good] == [2.0 * v for v in range(7)]


def test_an_answer_asyncio_refuses_fails_its_own_awaiter_only():
    from concurrent.futures import Future

    from deepseek_rs.serving.batcher import _LoopWaker, _settle_all

    async def main():
        futures = [Future() for _ in range(3)]
        waiters = [_LoopWaker.of(asyncio.get_running_loop()).wrap(f) for f in futures]
        answers = [(futures[0], None, StopIteration("raw")), (futures[1], 1, None), (futures[2], 2, None)]
        await asyncio.to_thread(_settle_all, answers)  # one wake-up drains all three
        return await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), RESULT_TIMEOUT)

    refused, *rest = asyncio.run(main())
    assert rest == [1, 2]
    assert isinstance(refused, RuntimeError) and isinstance(refused.__cause__, TypeError)
