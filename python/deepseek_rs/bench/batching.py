"""Dynamic batching measured over HTTP: the same server with batching off and on, in one run.

``deepseek-rs bench batching [--quick] [--duration S] [--tokens N] [--threads N]
[--concurrency C ...] [--json PATH]`` (needs the ``serve`` extra: starlette, uvicorn)

* Server: ``deepseek-rs serve`` (the built-in PEAMoE: H=256, 16 experts of width 512, top-p
  routing; one torch thread) started twice on loopback, as a separate process: batching off
  (``--no-batching``: one request per model call) and on (the article's min 4 / max 32, 5 ms).
* Load: a keep-alive HTTP/1.1 load generator in this process (asyncio, raw sockets, bodies
  encoded in advance). Closed loop at concurrency 1, 8, 32 and 64 (each client sends its next
  request when the previous is answered), and open-loop Poisson arrivals at a fixed rate (twice
  the batching-off throughput at concurrency 32). Each request is ``[tokens, 256]`` floats.
* Every 100th request is deliberately bad (255 features instead of 256) and must get a 400;
  every good one a 200, or a 429 when the server's queue (1024 requests) is full. Each request
  carries a unique id that its answer must echo: the run fails if a request is lost, answered
  twice, or answered with another request's id. QPS counts the 200 answers.
* Failure isolation under load: one more point at concurrency 32 against servers of the
  built-in model wrapped so that it raises on a marked row (:func:`peamoe_failing_on_mark`):
  another 1 in 100 requests is marked and must get a 500, and the batcher must find it by
  bisection and answer every other request of its batch; the 200 answers of the requests sent
  around a marked one (ids within 8 of it: in flight with it, so mostly in its batch) are
  checked against the model run in this process, one request at a time (unbatched).
* ``--quick``: a fixed number of requests per point (200) instead of a duration, so the counts
  are the same on every run: 2 bad requests (400) per point, 2 failing ones (500) on the failing
  points, and every 200 answer checked against the unbatched model.
* The same model and batcher in process, without HTTP: 32 asyncio clients in one event loop
  awaiting ``batcher.infer(x)`` (the batching gain of the model alone, before JSON and HTTP
  costs).
* Mean batch size comes from the server's Prometheus ``/metrics`` (deltas over each point).
* Scheduler overhead: in-process ``DynamicBatcher`` around a no-op model (``nn.Identity``)
  with 64 requests outstanding, wall time per request of the whole path (submit, schedule,
  stack, slice, answer the future); the same for one request at a time (submit, then wait for
  the result: thread hand-offs included), next to the bare hand-off it cannot avoid (a worker
  thread blocked in ``queue.SimpleQueue.get`` answering a ``concurrent.futures.Future`` the
  caller waits on: the OS and CPython wake-up cost, no scheduler); and the Rust scheduler's calls
  alone (submit + next_batch + complete through the bindings) per request; each the best of 5.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, wait
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._core import Scheduler
from ..serving.batcher import DynamicBatcher
from ..serving.server import DEFAULT_HIDDEN_SIZE, default_model, make_batcher
from . import common

BAD_EVERY = 100
FAIL_EVERY, FAIL_AT, NEIGHBOURS = 100, 49, 8  # id % 100 == 49 is marked; ids within 8 are checked
CHECK_EVERY = 25  # full runs also check every 25th 200 answer against the unbatched model
QUICK_REQUESTS = 200  # requests per point of a quick run (ids 0..199: 2 bad, 2 marked)
MODEL = "deepseek_rs.bench.batching:peamoe_failing_on_mark"
ANSWER_TIMEOUT = 120  # seconds: a request unanswered by then is reported lost
# A request whose first feature (of any token) is this makes the failing model raise.
FAIL_MARK = 12345.0


class FailsOnMark(nn.Module):
    """``model`` that raises ``ValueError`` on a batch holding a row marked with ``FAIL_MARK``:
    the batcher must find the marked request by bisection and answer every other one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        if bool((x[:, 0] == FAIL_MARK).any()):
            raise ValueError(f"a row is marked with {FAIL_MARK} (the benchmark's failing request)")
        return self.model(x, **kwargs)


def peamoe_failing_on_mark() -> nn.Module:
    """The server's built-in PEAMoE (the same seeded weights), failing on marked rows: the
    failing points run ``deepseek-rs serve --model deepseek_rs.bench.batching:peamoe_failing_on_mark``."""
    model = FailsOnMark(default_model())
    with torch.inference_mode():  # the first call pays one-time set-up: not a client's
        model(torch.zeros(4, DEFAULT_HIDDEN_SIZE))
    return model


class Server:
    """``deepseek-rs serve`` in a child process."""

    def __init__(self, batching: bool, threads: int, failing: bool):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "deepseek_rs",
            "serve",
            "--port",
            str(self.port),
            "--threads",
            str(threads),
        ]
        if failing:
            cmd += ["--model", MODEL, "--collate", "ragged", "--item-shape", str(DEFAULT_HIDDEN_SIZE)]
        if not batching:
            cmd.append("--no-batching")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if asyncio.run(self._get("/health"))[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 120 s")
            time.sleep(0.2)

    async def _get(self, path: str) -> Tuple[int, bytes]:
        conn = await Connection.open(self.port)
        try:
            return await conn.request("GET", path)
        finally:
            conn.close()

    def metrics(self) -> Dict[str, float]:
        text = asyncio.run(self._get("/metrics"))[1].decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> Tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        self.writer.write(head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status, length = int(status_line.split()[1]), 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class Load:
    """Request bodies and the answer bookkeeping of one measurement point."""

    def __init__(self, tokens: int, seed: int, failing: bool = False, check_all: bool = False):
        self.failing, self.check_all = failing, check_all
        rng = random.Random(seed)
        self.rows = [self._rows(rng, tokens, DEFAULT_HIDDEN_SIZE) for _ in range(16)]
        self.good = [self._json(rows) for rows in self.rows]
        self.bad = self._json(self._rows(rng, tokens, DEFAULT_HIDDEN_SIZE - 1))
        marked = [list(row) for row in self.rows[0]]
        marked[0][0] = FAIL_MARK
        self.marked = self._json(marked)
        # (id, 200 answer) of the requests checked against the unbatched model: all of them with
        # check_all, else those sent around a marked one and every CHECK_EVERY-th
        self.checked: List[Tuple[int, bytes]] = []
        self.next_id = 0
        self.sent = 0
        self.answers: Counter = Counter()
        self.latency: List[float] = []
        self.statuses: Counter = Counter()
        self.errors: List[str] = []

    @staticmethod
    def _rows(rng: random.Random, tokens: int, features: int) -> List[List[float]]:
        return [[round(rng.gauss(0, 1), 4) for _ in range(features)] for _ in range(tokens)]

    @staticmethod
    def _json(rows: List[List[float]]) -> bytes:
        return json.dumps(rows, separators=(",", ":")).encode()

    def body(self) -> Tuple[int, int, bytes]:
        """The next request: its id, the status it must get (200: or 429) and its body."""
        rid = self.next_id
        self.next_id += 1
        if rid % BAD_EVERY == BAD_EVERY - 1:
            want, inputs = 400, self.bad
        elif self.failing and rid % FAIL_EVERY == FAIL_AT:
            want, inputs = 500, self.marked
        else:
            want, inputs = 200, self.good[rid % len(self.good)]
        return rid, want, b'{"inputs":' + inputs + b',"id":%d}' % rid

    async def one(self, conn: Connection, start: Optional[float] = None) -> None:
        rid, want, body = self.body()
        start = time.perf_counter() if start is None else start
        self.sent += 1
        try:
            status, data = await asyncio.wait_for(conn.request("POST", "/v1/infer", body), ANSWER_TIMEOUT)
        except asyncio.TimeoutError:
            self.errors.append(f"request {rid} not answered within {ANSWER_TIMEOUT} s")
            raise
        elapsed = time.perf_counter() - start
        got = data[data.rfind(b'"id":') + 5 : -1]
        if got != b"%d" % rid:
            self.errors.append(f"request {rid} answered with id {got!r}")
        self.answers[rid] += 1
        self.statuses[status] += 1
        # 429 is the server's backpressure (queue full): an answer, counted apart.
        if status != want and not (status == 429 and want != 400):
            self.errors.append(f"request {rid} (should get {want}) got {status}: {data[:200]!r}")
        elif status == 500 and not (b'"type":"ModelError"' in data and b'"message":"ValueError: ' in data):
            self.errors.append(f"request {rid} got a 500 for another reason than the model's: {data[:200]!r}")
        if status == 200:
            self.latency.append(elapsed)
            near = self.failing and abs(rid % FAIL_EVERY - FAIL_AT) <= NEIGHBOURS
            if self.check_all or near or rid % CHECK_EVERY == 0:
                self.checked.append((rid, data))

    def check(self, expected: List[torch.Tensor]) -> None:
        """No request lost or answered twice, every status as it must be, and the checked 200
        answers equal to the model's output for their input computed alone
        (``expected[i]``: for ``self.rows[i]``)."""
        lost = self.sent - len(self.answers)
        twice = sum(1 for c in self.answers.values() if c > 1)
        if lost or twice or self.errors:
            raise AssertionError(f"lost {lost}, answered twice {twice}, errors: {self.errors[:5]}")
        for rid, data in self.checked:
            got = torch.tensor(json.loads(data)["outputs"])
            torch.testing.assert_close(got, expected[rid % len(self.rows)], rtol=1e-4, atol=1e-5)


async def closed_loop(
    port: int, load: Load, concurrency: int, duration: float, requests: Optional[int] = None
) -> float:
    """``concurrency`` clients, each sending its next request when the last is answered, for
    ``duration`` seconds or, with ``requests``, until that many are sent."""
    conns = [await Connection.open(port) for _ in range(concurrency)]
    stop = time.perf_counter() + duration

    def more() -> bool:
        return load.next_id < requests if requests is not None else time.perf_counter() < stop

    async def client(conn: Connection) -> None:
        while more():
            await load.one(conn)

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    return elapsed


async def open_loop(
    port: int, load: Load, rate: float, duration: float, seed: int, requests: Optional[int] = None
) -> float:
    """Poisson arrivals at ``rate`` per second, for ``duration`` seconds or ``requests`` arrivals."""
    rng = random.Random(seed)
    idle: List[Connection] = []
    tasks = []

    async def send(at: float) -> None:
        conn = idle.pop() if idle else await Connection.open(port)
        await load.one(conn, start=at)
        idle.append(conn)

    start = time.perf_counter()
    t = start
    while (len(tasks) < requests) if requests is not None else (t < start + duration):
        t += rng.expovariate(rate)
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(t)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for c in idle:
        c.close()
    return elapsed


def percentile(xs: List[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def expected_outputs(load: Load) -> List[torch.Tensor]:
    """The served model's output for each good input of ``load``, computed here, one at a time."""
    model = default_model()
    with torch.inference_mode():
        return [model(torch.tensor(rows)) for rows in load.rows]


def measure(server: Server, load: Load, run) -> Dict[str, Any]:
    before = server.metrics()
    elapsed = asyncio.run(run)
    after = server.metrics()
    load.check(expected_outputs(load))
    batches = after["deepseek_batcher_batch_size_count"] - before["deepseek_batcher_batch_size_count"]
    requests = after["deepseek_batcher_batch_size_sum"] - before["deepseek_batcher_batch_size_sum"]
    completed_key = 'deepseek_batcher_requests_total{outcome="completed"}'
    completed = after[completed_key] - before[completed_key]
    if completed != load.statuses[200]:
        raise AssertionError(
            f"the server completed {completed} requests, the client got {load.statuses[200]} answers"
        )
    return {
        "requests": load.sent,
        "ok": load.statuses[200],
        "bad_400": load.statuses[400],
        "failed_500": load.statuses[500],
        "checked": len(load.checked),
        "lost": load.sent - len(load.answers),
        "answered_twice": sum(1 for c in load.answers.values() if c > 1),
        "rejected_429": load.statuses[429],
        "qps": load.statuses[200] / elapsed,
        "p50_ms": percentile(load.latency, 0.5) * 1e3,
        "p99_ms": percentile(load.latency, 0.99) * 1e3,
        "mean_batch": requests / batches if batches else float("nan"),
    }


def in_process(
    batching: bool, tokens: int, concurrency: int, duration: float, **batcher: Any
) -> Dict[str, Any]:
    """The same model and batcher without HTTP: ``concurrency`` asyncio clients in one event loop
    (as in the server) awaiting ``batcher.infer(x)`` in a closed loop. ``batcher``: options of
    the ``DynamicBatcher`` beyond the server's (``min_size=32, max_size=32`` is static batching)."""
    x = torch.randn(tokens, DEFAULT_HIDDEN_SIZE)
    latency: List[float] = []

    async def run(b: DynamicBatcher) -> float:
        stop = time.perf_counter() + duration

        async def client() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await b.infer(x)
                latency.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start

    with make_batcher(
        default_model(), batching=batching, collate="ragged", item_shape=(DEFAULT_HIDDEN_SIZE,), **batcher
    ) as b:
        b.submit(x).result()  # warm-up
        elapsed = asyncio.run(run(b))
        mean_batch = b.metrics()["mean_batch_size"]
    return {
        "qps": len(latency) / elapsed,
        "p50_ms": percentile(latency, 0.5) * 1e3,
        "p99_ms": percentile(latency, 0.99) * 1e3,
        "mean_batch": mean_batch,
        "rejected_429": 0,
    }


def scheduler_overhead(n: int) -> Dict[str, float]:
    """Per-request cost with a no-op model: the whole batcher path, and the scheduler alone."""
    x = torch.zeros(4)
    with DynamicBatcher(
        nn.Identity(), min_size=1, max_size=32, max_queue_delay=0.0, max_queue_size=n + 1
    ) as b:
        for f in [b.submit(x) for _ in range(256)]:  # warm-up
            f.result()
        batcher_s = float("inf")
        for _ in range(5):  # best of 5: the host is shared, the minimum is the code's cost
            window: List[Any] = []
            start = time.perf_counter()
            for _ in range(n // 5):
                window.append(b.submit(x))
                if len(window) == 64:
                    wait(window)
                    window = []
            wait(window)
            batcher_s = min(batcher_s, (time.perf_counter() - start) / (n // 5))
        mean_batch = b.metrics()["mean_batch_size"]
    s = Scheduler(max_size=32, min_size=1, max_queue_delay=0.0, max_queue_size=n + 1)
    scheduler_s, rid = float("inf"), 0
    for _ in range(5):
        start, first = time.perf_counter(), rid
        while rid < first + n // 5:
            for _ in range(32):
                s.submit(rid)
                rid += 1
            kind, ids, _ = s.next_batch(None)
            s.complete(ids)
        scheduler_s = min(scheduler_s, (time.perf_counter() - start) / (rid - first))
    # One request at a time: the latency the batcher adds to a lone call. Next to it, the bare
    # two-thread hand-off it cannot avoid (a worker blocked on a queue, the caller on a Future),
    # measured in alternation with it so both see the same host load.
    handoff: queue.SimpleQueue = queue.SimpleQueue()

    def bare_worker() -> None:
        for item in iter(handoff.get, None):
            item[1].set_result(item[0])

    bare = threading.Thread(target=bare_worker, daemon=True)
    bare.start()
    sequential_s = bare_s = float("inf")
    with DynamicBatcher(nn.Identity(), min_size=1, max_size=32, max_queue_delay=0.0) as b:
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n // 25):
                b.submit(x).result()
            sequential_s = min(sequential_s, (time.perf_counter() - start) / (n // 25))
            start = time.perf_counter()
            for _ in range(n // 25):
                f: Future = Future()
                handoff.put((x, f))
                f.result()
            bare_s = min(bare_s, (time.perf_counter() - start) / (n // 25))
    handoff.put(None)
    bare.join()
    return {
        "batcher_us": batcher_s * 1e6,
        "sequential_us": sequential_s * 1e6,
        "handoff_us": bare_s * 1e6,
        "scheduler_us": scheduler_s * 1e6,
        "mean_batch": mean_batch,
    }


def run(
    quick: bool,
    duration: float,
    tokens: int,
    threads: int,
    concurrencies: List[int],
    say: Callable[[str], None],
) -> Dict[str, Any]:
    """Every point with batching off and on; ``quick``: a fixed request count per point."""
    requests = QUICK_REQUESTS if quick else None
    warmup = 64 if quick else None
    rows: List[Dict[str, Any]] = []
    rate: Optional[float] = None
    for batching in (False, True):
        say(f"server, batching {'on' if batching else 'off'}")
        server = Server(batching, threads, failing=False)
        try:
            asyncio.run(closed_loop(server.port, Load(tokens, seed=99), 8, 0.5, warmup))  # warm-up
            for c in concurrencies:
                say(f"closed loop c={c}, batching {'on' if batching else 'off'}")
                load = Load(tokens, seed=c, check_all=quick)
                r = measure(server, load, closed_loop(server.port, load, c, duration, requests))
                rows.append({"batching": batching, "load": f"closed c={c}", **r})
            if rate is None:  # set by the batching-off run, used by both
                ref = [r for r in rows if r["load"] in ("closed c=32", f"closed c={concurrencies[-1]}")]
                rate = 2 * ref[0]["qps"]
            say(f"Poisson arrivals, {rate:.0f}/s")
            load = Load(tokens, seed=7, check_all=quick)
            r = measure(server, load, open_loop(server.port, load, rate, duration, seed=7, requests=requests))
            rows.append({"batching": batching, "load": f"Poisson {rate:.0f}/s", "rate": rate, **r})
        finally:
            server.stop()
    c_fail = concurrencies[-1] if quick else 32
    for batching in (False, True):
        say(f"server of the failing model, batching {'on' if batching else 'off'}")
        server = Server(batching, threads, failing=True)
        try:
            asyncio.run(closed_loop(server.port, Load(tokens, seed=98, failing=True), 8, 0.5, warmup))
            load = Load(tokens, seed=c_fail + 1000, failing=True, check_all=quick)
            r = measure(server, load, closed_loop(server.port, load, c_fail, duration, requests))
            rows.append({"batching": batching, "load": f"closed c={c_fail}, 1% failing in the model", **r})
        finally:
            server.stop()

    c_in = concurrencies[-1] if quick else 32
    torch.set_num_threads(threads)  # as the server's
    for batching in (False, True):
        say(f"in process, batching {'on' if batching else 'off'}")
        r = in_process(batching, tokens, c_in, duration)
        rows.append({"batching": batching, "load": f"in process c={c_in}, no HTTP", **r})
    say("scheduler overhead")
    over = scheduler_overhead(2000 if quick else 50000)
    return {"rows": rows, "overhead": over}


def report(rows: List[Dict[str, Any]], over: Dict[str, float]) -> None:
    header = "| load | QPS off | QPS on | ratio | p50 ms off / on | p99 ms off / on | mean batch on | 429 off / on |"  # noqa: E501
    print("\n" + header + "\n|---|---|---|---|---|---|---|---|")
    off = [r for r in rows if not r["batching"]]
    on = [r for r in rows if r["batching"]]
    for a, b in zip(off, on):
        ratio = b["qps"] / a["qps"]
        print(
            f"| {a['load']} | {a['qps']:.0f} | {b['qps']:.0f} | {ratio:.2f}x "
            f"| {a['p50_ms']:.1f} / {b['p50_ms']:.1f} | {a['p99_ms']:.1f} / {b['p99_ms']:.1f} "
            f"| {b['mean_batch']:.1f} | {a['rejected_429']} / {b['rejected_429']} |"
        )
    total = sum(r.get("requests", 0) for r in rows)
    bad = sum(r.get("bad_400", 0) for r in rows)
    failed = sum(r.get("failed_500", 0) for r in rows)
    checked = sum(r.get("checked", 0) for r in rows)
    print(
        f"\n{total} requests, none lost or answered twice; all {bad} bad ones got 400, all {failed} that "
        "made the model raise got 500, every good one 200 (or 429 when the queue was full); "
        f"{checked} answers checked equal to the model's output for the request alone (unbatched)"
    )
    print(
        f"no-op model, in process: {over['batcher_us']:.1f} us per request through DynamicBatcher "
        f"with 64 outstanding (mean batch {over['mean_batch']:.1f}); {over['sequential_us']:.1f} us "
        f"for one request at a time (submit to result), against {over['handoff_us']:.1f} us for the bare "
        "two-thread hand-off (queue.SimpleQueue + Future, no scheduler); "
        f"{over['scheduler_us']:.2f} us per request in the scheduler's calls alone (target < 20 us)"
    )


def main(argv: Optional[List[str]] = None) -> int:
    ap = common.parser("batching", __doc__)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per measurement point (default 6)")
    ap.add_argument("--tokens", type=int, default=4, help="tokens per request (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    ap.add_argument(
        "--concurrency", type=int, nargs="+", metavar="C", help="closed-loop points (default 1 8 32 64)"
    )
    common.add_json(ap)
    args = ap.parse_args(argv)
    for module in ("starlette", "uvicorn"):
        common.require(module, "the batching benchmark (it runs `deepseek-rs serve`)")
    concurrencies = args.concurrency or ([1, 8] if args.quick else [1, 8, 32, 64])
    duration = 0.7 if args.quick else args.duration
    machine = common.machine_info()
    print(common.format_machine(machine))
    per_point = f"{QUICK_REQUESTS} requests per point" if args.quick else f"{duration:g} s per point"
    print(
        f"workload: server torch threads {args.threads}; {args.tokens} tokens x {DEFAULT_HIDDEN_SIZE} per "
        f"request, 1 in {BAD_EVERY} requests bad (400); {per_point}; the last HTTP point also has "
        f"1 in {FAIL_EVERY} requests failing in the model (500). Baseline: the same server with batching "
        "off; ours: batching on (min 4, max 32, 5 ms); ratio: QPS on / off",
        flush=True,
    )
    results = run(
        args.quick, duration, args.tokens, args.threads, concurrencies, common.progress("batching", args)
    )
    report(results["rows"], results["overhead"])
    common.write_json(args.json, machine, args.quick, results)
    return 0
