"""The server under hostile input and overload: the banner only once the model is loaded and
warm, the access log, a hypothesis campaign on the request body parser, and twice the
saturation rate (every accepted request answered, the rest 429 with Retry-After, p99 under the
timeout, resident memory back within 10%). Long variants: DEEPSEEK_RS_LONG=1 pytest -m slow."""

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from deepseek_rs import DynamicBatcher  # noqa: E402
from deepseek_rs.serving.server import ERROR_TYPES, create_app  # noqa: E402

LONG = os.environ.get("DEEPSEEK_RS_LONG") == "1"
LONG_ONLY = [pytest.mark.slow, pytest.mark.skipif(not LONG, reason="long run: set DEEPSEEK_RS_LONG=1")]
HERE = Path(__file__).parent


def start(*args, env=None, port=0):
    """``deepseek-rs serve`` on 127.0.0.1 (port 0: a free one); returns (process, port, lines
    of stderr read until the banner)."""
    path = [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), **(env or {}))
    cmd = [sys.executable, "-m", "deepseek_rs", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--threads", "1", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("the server exited:\n" + "".join(lines))
        lines.append(line)
        if "listening on http://127.0.0.1:" in line:
            return proc, int(line.rsplit(":", 1)[1]), lines
    proc.kill()
    raise AssertionError("no banner:\n" + "".join(lines))


def stop(proc):
    proc.terminate()
    try:
        proc.wait(60)
    finally:
        proc.stdout.close()


def get(port, path):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return r.status, r.read().decode()


def test_the_banner_comes_once_the_model_is_loaded_and_warm_and_the_access_log(tmp_path):
    warm = tmp_path / "warm"
    t0 = time.monotonic()
    proc, port, lines = start(
        *("--model", "serve_models:slow_start", "--collate", "stack", "--item-shape", "2", "--access-log"),
        env={"SERVE_TEST_LOAD_S": "1.0", "SERVE_TEST_WARM": str(warm)},
    )
    try:
        assert time.monotonic() - t0 >= 1.0  # not before the model loaded
        assert warm.read_text() == "warm"  # nor before its warm-up call
        banner = [ln for ln in lines if "listening on" in ln]
        assert len(banner) == 1 and "serve_models:slow_start" in banner[0], lines
        assert get(port, "/health")[0] == 200  # it does listen when it says so
        # --access-log: one line per request, although the log level stays at warning
        for _ in range(200):
            line = proc.stdout.readline()
            if "GET /health" in line:
                assert " 200" in line
                break
        else:
            raise AssertionError("no access log line")
    finally:
        stop(proc)


def test_a_server_that_cannot_bind_prints_no_banner():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        path = [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        cmd = [sys.executable, "-m", "deepseek_rs", "serve", "--port", str(port), "--threads", "1"]
        cmd += ["--model", "serve_models:picky", "--item-shape", "1"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "listening on" not in out.stderr + out.stdout


# --- the request body parser under hostile input ----------------------------------------------------

_BATCHER = None


def app():
    global _BATCHER
    if _BATCHER is None:
        _BATCHER = DynamicBatcher(torch.nn.Identity(), dtype=torch.float32, min_size=1, max_queue_delay=0.0)
    return create_app(_BATCHER, shutdown_batcher=False, max_body_bytes=4096)


async def post(application, chunks):
    last = len(chunks) - 1
    messages = [{"type": "http.request", "body": c, "more_body": i < last} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/v1/infer", "root_path": "", "headers": [],
        "query_string": b"", "http_version": "1.1", "scheme": "http", "raw_path": b"/v1/infer",
    }  # fmt: skip
    await asyncio.wait_for(application(scope, receive, send), 10)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def numbers_only(x):
    """A list tree of numbers that float32 holds (no bool, null, string, object, infinity)."""
    if type(x) is list:
        return all(numbers_only(v) for v in x)
    if type(x) not in (int, float) or not math.isfinite(x):
        return False
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(x)))


def expect(raw, status, body):
    """The answer a correct parser gives ``raw``, checked against the one given."""
    answer = json.loads(body)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    if status == 200:  # accepted: only a well-formed numeric request, answered with itself
        assert type(doc) is dict and "inputs" in doc and numbers_only(doc["inputs"]), raw
        got = torch.tensor(answer["outputs"], dtype=torch.float32)
        assert torch.equal(got, torch.tensor(doc["inputs"], dtype=torch.float32))
    elif status == 504:  # a well-formed request whose own timeout (0, say) ran out in the queue
        assert type(doc) is dict and numbers_only(doc["inputs"]), raw
        assert type(doc.get("timeout")) in (int, float) and answer["error"]["type"] == "RequestTimeoutError"
    else:
        assert status in (400, 413), (status, raw, body)
        assert set(answer) == {"error", "id"} and answer["error"]["type"] in ERROR_TYPES[status], answer
        assert answer["error"]["message"]


number = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False, width=32))
value = st.recursive(
    st.one_of(number, st.booleans(), st.none(), st.text(max_size=3)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
)
body = st.one_of(
    st.binary(max_size=300),  # random bytes
    st.builds(lambda v: json.dumps({"inputs": v}).encode(), value),  # any JSON as inputs
    st.builds(
        lambda rows, extra: json.dumps({"inputs": rows, **extra}).encode(),
        st.lists(st.lists(number, min_size=2, max_size=2), min_size=1, max_size=3),
        st.dictionaries(st.sampled_from(["id", "priority", "timeout"]), value, max_size=2),
    ),
)
CAMPAIGN = settings(
    max_examples=10_000 if LONG else 60,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


@CAMPAIGN
@given(raw=body, cut=st.none() | st.integers(0, 300), split=st.integers(1, 8))
@example(raw=b'{"inputs": [[0.001, -131073]], "timeout": 0}', cut=None, split=3)  # found by the long run
def test_request_body_campaign(raw, cut, split):
    if cut is not None:
        raw = raw[:cut]  # truncated bodies
    step = max(1, len(raw) // split)
    chunks = [raw[i : i + step] for i in range(0, len(raw), step)] or [b""]
    status, answer = asyncio.run(post(app(), chunks))
    expect(raw, status, answer)


@pytest.mark.parametrize("n", [100, 400])
def test_deep_nesting_is_a_400_not_a_crash(n):
    raw = b'{"inputs": ' + b"[" * n + b"1" + b"]" * n + b"}"
    status, answer = asyncio.run(post(app(), [raw]))
    assert status == 400 and json.loads(answer)["error"]["type"] in ERROR_TYPES[400]


# --- overload: twice the saturation rate --------------------------------------------------------------


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def one(port, body, results, pool):
    reader, writer = await pool.get()
    t0 = time.monotonic()
    try:
        head = b"POST /v1/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
        writer.write(head + body)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(ln.lower().split(": ", 1) for ln in lines[1:] if ": " in ln)
        payload = await reader.readexactly(int(headers["content-length"]))
        results.append((status, time.monotonic() - t0, headers.get("retry-after"), payload))
    finally:
        await pool.put((reader, writer))


async def load(port, rate, seconds, connections=64, cap=50_000):
    """Open loop: ``rate`` requests per second for ``seconds`` (at most ``cap``)."""
    pool = asyncio.Queue()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    for c in conns:
        pool.put_nowait(c)
    results, tasks = [], []
    n = min(cap, int(rate * seconds))
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        body = b'{"inputs": [%d.0], "id": %d}' % (i % 100, i)
        tasks.append(asyncio.ensure_future(one(port, body, results, pool)))
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    for _, w in conns:
        w.close()
    return results, time.monotonic() - t0


async def closed(port, seconds, connections):
    """Closed loop: ``connections`` clients, each sending its next request on the last answer."""
    results = []
    deadline = time.monotonic() + seconds

    async def client(k):
        pool = asyncio.Queue()
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
        while time.monotonic() < deadline:
            await one(port, b'{"inputs": [1.0], "id": 1}', results, pool)
        (await pool.get())[1].close()

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(connections))), 60)
    return results, time.monotonic() - t0


def metric(port, name):
    text = get(port, "/metrics")[1]
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("seconds", [4, pytest.param(60, marks=LONG_ONLY)], ids=["ci", "long"])
def test_twice_the_saturation_rate(seconds):
    timeout = 2.0
    batch_s, max_batch = 0.02, 4  # saturation: about 4 / 0.02 = 200 requests per second
    proc, port, _ = start(
        *("--model", "serve_models:sleepy", "--collate", "stack", "--item-shape", "1"),
        *("--max-batch-size", str(max_batch), "--min-batch-size", "1", "--max-queue-delay-ms", "1"),
        *("--max-queue-size", "32", "--timeout", str(timeout)),
        env={"SERVE_TEST_BATCH_S": str(batch_s)},
    )
    try:
        # Saturation measured: a closed loop of 32 clients for one second.
        results, took = asyncio.run(closed(port, 1.0, connections=32))
        ok = sum(1 for r in results if r[0] == 200)
        saturation = ok / took
        assert saturation > 20, saturation
        before = rss_kib(proc.pid)
        accepted0 = metric(port, 'deepseek_batcher_requests_total{outcome="accepted"}')
        results, took = asyncio.run(load(port, 2 * saturation, seconds))
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))  # no 5xx, no 504
        assert statuses.count(429) > 0 and statuses.count(200) > 0
        assert all(r[2] is not None for r in results if r[0] == 429)  # Retry-After on every 429
        for status, _, _, payload in results:
            answer = json.loads(payload)
            if status == 200:
                assert answer["outputs"] == [2.0 * (answer["id"] % 100)]  # its own answer
            else:
                assert answer["error"]["type"] == "QueueFullError"
        # Every accepted request was answered (with 200), and the server saw each one.
        accepted = metric(port, 'deepseek_batcher_requests_total{outcome="accepted"}') - accepted0
        assert accepted == statuses.count(200)
        latencies = sorted(r[1] for r in results if r[0] == 200)
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        assert p99 < timeout, p99
        time.sleep(0.5)
        after = rss_kib(proc.pid)
        assert after <= 1.10 * before, (before, after)
    finally:
        stop(proc)
