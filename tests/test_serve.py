"""`deepseek-rs serve` started for real on loopback, driven over HTTP."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from deepseek_rs import InvalidValueError  # noqa: E402
from deepseek_rs.serving.server import default_model, load_model  # noqa: E402

RESULT_TIMEOUT = 30  # seconds: a hang fails the test instead of stalling the suite


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args):
        self.port = free_port()
        # The test models' folder first, then whatever makes deepseek_rs importable here.
        path = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        cmd = [
            sys.executable,
            "-m",
            "deepseek_rs",
            "serve",
            "--port",
            str(self.port),
            "--threads",
            "1",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    def request(self, method, path, body=None):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()}

    def get(self, path):
        return self.request("GET", path)

    def infer(self, body):
        status, text, headers = self.request("POST", "/v1/infer", body)
        return status, json.loads(text), headers

    def stop(self):
        """SIGTERM; True if the server drained and exited with the signal's status (uvicorn
        re-raises the signal after a graceful shutdown, as a process killed by it would end)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.proc.stdout.close()
        return code == -signal.SIGTERM


def test_the_default_model_is_served_with_json_in_and_out_and_bad_input_is_400():
    server = Server()
    try:
        x = torch.randn(3, 256)
        status, body, _ = server.infer({"inputs": x.tolist(), "id": 7})
        assert status == 200 and body["id"] == 7
        with torch.inference_mode():
            want = default_model()(x)
        torch.testing.assert_close(torch.tensor(body["outputs"]), want, rtol=1e-4, atol=1e-5)
        x = torch.randn(200, 256)  # a body of ~1 MB reaches the app in many chunks
        status, body, _ = server.infer({"inputs": x.tolist(), "id": "big"})
        assert status == 200 and body["id"] == "big"
        with torch.inference_mode():
            want = default_model()(x)
        torch.testing.assert_close(torch.tensor(body["outputs"]), want, rtol=1e-4, atol=1e-5)
        status, _, headers = server.get("/v1/infer")
        assert status == 405 and headers["allow"] == "POST"
        status, text, headers = server.request("HEAD", "/v1/infer")
        assert (status, text, headers["allow"]) == (405, "", "POST")
        status, text, _ = server.request("POST", "/v1/infer/", {"inputs": [[0.5] * 256], "id": 8})
        assert status == 200 and json.loads(text)["id"] == 8  # the trailing slash is served too
        assert server.get("/nowhere")[0] == 404
        for bad, name in [
            (b"{not json", "InvalidJSON"),
            ({"input": [[1.0]]}, "InvalidValueError"),
            ({"inputs": [[1.0] * 255]}, "ShapeError"),
            ({"inputs": [[1.0] * 256, [1.0]]}, "InvalidValueError"),
            ({"inputs": [["a"] * 256]}, "InvalidValueError"),
            ({"inputs": [["1"] * 256]}, "InvalidValueError"),  # numpy would parse it as 1.0
            ({"inputs": [[1.0] * 255 + ["1"]], "id": "x"}, "InvalidValueError"),
            ({"inputs": [[1.0] * 256], "priority": "high"}, "InvalidValueError"),
            ({"inputs": [[None] * 256]}, "InvalidValueError"),  # null would be NaN
            ({"inputs": [[1e39] * 256]}, "InvalidValueError"),  # inf in float32
            ({"inputs": [[1.0] * 256], "timeout": -1}, "InvalidValueError"),
            ({"inputs": [[True] * 256]}, "InvalidValueError"),  # true is not 1.0
            ({"inputs": [[1.0] * 255 + [False]], "id": True}, "InvalidValueError"),
        ]:
            status, body, _ = server.infer(bad)
            assert status == 400 and body["error"]["type"] == name, body
            assert set(body) == {"error", "id"} and set(body["error"]) == {"type", "message"}
        status, body, _ = server.infer({"inputs": [[1.0] * 255 + [True]]})
        assert "true and false are not numbers" in body["error"]["message"]
        wrong = [("GET", "/nowhere", 404), ("POST", "/health", 405), ("PUT", "/metrics", 405)]
        for method, path, code in wrong:
            status, text, headers = server.request(method, path, b"" if method != "GET" else None)
            body = json.loads(text)
            assert status == code and headers["content-type"] == "application/json", (path, text)
            assert body["error"]["type"] == {404: "NotFound", 405: "MethodNotAllowed"}[code], body
        status, text, _ = server.get("/metrics")
        assert status == 200
        assert 'deepseek_batcher_requests_total{outcome="completed"} 3' in text
        # Every response, by route and status: 2 GETs of /v1/infer and HEAD are 405s, bad bodies
        # 400s, /nowhere 404, the wrong methods 405, and this scrape itself.
        assert 'deepseek_http_responses_total{route="/v1/infer",code="400"} 14' in text
        assert 'deepseek_http_responses_total{route="/v1/infer",code="405"} 2' in text
        assert 'deepseek_http_responses_total{route="/v1/infer",code="200"} 3' in text
        assert 'deepseek_http_responses_total{route="unmatched",code="404"} 2' in text
        assert 'deepseek_http_responses_total{route="/health",code="405"} 1' in text
        assert 'deepseek_http_responses_total{route="/metrics",code="405"} 1' in text
        assert 'deepseek_http_responses_total{route="/metrics",code="200"} 1' in text
        assert "deepseek_batcher_latency_seconds_count 3" in text
    finally:
        assert server.stop()


def wait_for(server, gauge, value):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = server.get("/metrics")[1]
        if f"deepseek_batcher_{gauge} {value}\n" in text:
            return
        time.sleep(0.01)
    raise AssertionError(f"{gauge} never reached {value}")


def test_queue_full_is_429_timeout_is_504_and_sigterm_drains(tmp_path):
    gate = tmp_path / "gate"
    os.environ["SERVE_TEST_GATE"] = str(gate)  # inherited by the server process
    try:
        server = Server(
            *("--model", "serve_models:gated", "--collate", "stack", "--max-queue-size", "2"),
            *("--item-shape", "1", "--max-body-bytes", "200"),
            *("--max-batch-size", "1", "--min-batch-size", "1", "--drain-delay", "1"),
        )
    finally:
        del os.environ["SERVE_TEST_GATE"]
    answers = {}

    def call(i, **extra):
        answers[i] = server.infer({"inputs": [float(i)], "id": i, **extra})

    def start(*ids, **extra):
        threads = [threading.Thread(target=call, args=(i,), kwargs=extra) for i in ids]
        for t in threads:
            t.start()
        return threads

    try:
        status, body, _ = server.infer({"inputs": [1.0] * 40})
        assert status == 413 and "more than 200" in body["error"]["message"]
        assert body["error"]["type"] == "PayloadTooLargeError"
        status, body, _ = server.infer({"inputs": [1.0, 2.0]})
        assert status == 400 and "item_shape (1,)" in body["error"]["message"]
        gate.touch()
        threads = start(0)
        wait_for(server, "in_flight", 1)
        threads += start(1, 2)
        wait_for(server, "queue_depth", 2)
        status, body, headers = server.infer({"inputs": [3.0], "id": 3})
        assert status == 429 and body["error"]["type"] == "QueueFullError" and headers["retry-after"] == "1"
        gate.unlink()
        for t in threads:
            t.join()
        assert [answers[i][0] for i in (0, 1, 2)] == [200, 200, 200]
        assert [answers[i][1]["outputs"] for i in (0, 1, 2)] == [[0.0], [2.0], [4.0]]

        gate.touch()
        threads = start(10)
        wait_for(server, "in_flight", 1)
        threads += start(11, timeout=0.05)
        wait_for(server, "queue_depth", 1)
        time.sleep(0.1)  # request 11 is now past its deadline, still waiting
        gate.unlink()
        for t in threads:
            t.join()
        assert answers[10][0] == 200
        assert answers[11][0] == 504 and answers[11][1]["error"]["type"] == "RequestTimeoutError"

        # A client that goes away while its request runs: the request is still run and answered
        # (to nobody), and that answer is counted as a response.
        before = server.get("/metrics")[1]
        assert 'deepseek_http_responses_total{route="/v1/infer",code="200"} 4\n' in before
        gate.touch()
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            body = b'{"inputs": [30.0], "id": 30}'
            conn.sendall(
                b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_for(server, "in_flight", 1)
        gate.unlink()
        wait_for(server, "in_flight", 0)
        deadline = time.monotonic() + 60
        while 'responses_total{route="/v1/infer",code="200"} 5\n' not in (text := server.get("/metrics")[1]):
            assert time.monotonic() < deadline, text
            time.sleep(0.01)
        assert 'deepseek_batcher_requests_total{outcome="completed"} 5\n' in text

        # SIGTERM with one request running and one queued: /health says 503 through the drain
        # delay, the listener then closes, both requests are still answered, then it exits.
        gate.touch()
        threads = start(20)
        wait_for(server, "in_flight", 1)
        threads += start(21)
        wait_for(server, "queue_depth", 1)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (health := server.get("/health"))[0] != 503:  # the signal is handled between ticks
            assert health[0] == 200 and time.monotonic() < deadline
            time.sleep(0.01)
        assert json.loads(health[1]) == {
            "status": "draining",
            "error": {"type": "ShutdownError", "message": "the server is draining"},
            "id": None,
        }
        with pytest.raises(OSError):  # refused once the delay is over
            while time.monotonic() < deadline:
                assert server.get("/health")[0] == 503
                time.sleep(0.05)
        assert server.proc.poll() is None and all(t.is_alive() for t in threads)  # still draining
        gate.unlink()
        for t in threads:
            t.join()
        assert [answers[i][:2] for i in (20, 21)] == [
            (200, {"outputs": [40.0], "id": 20}),
            (200, {"outputs": [42.0], "id": 21}),
        ]
        # The one SIGTERM, held through the delay, is still the exit status once drained.
        assert server.proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        gate.unlink(missing_ok=True)
        server.stop()


def test_scalar_outputs_are_json_numbers_and_stop_iteration_or_system_exit_from_the_model_is_500():
    server = Server(
        *("--model", "serve_models:picky", "--collate", "stack", "--item-shape", "1"),
        *("--min-batch-size", "4", "--max-queue-delay-ms", "2000"),
    )
    answers = {}

    def call(v):
        answers[v] = server.infer({"inputs": [v], "id": v})[:2]

    try:
        threads = [threading.Thread(target=call, args=(v,)) for v in (1.0, 7.0, 2.0, -1.0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # One batch of 4: bisection finds the two failing requests, the others are answered.
        assert answers[1.0] == (200, {"outputs": 1.0, "id": 1.0})
        assert answers[2.0] == (200, {"outputs": 2.0, "id": 2.0})
        for v, name in ((7.0, "StopIteration: no next item"), (-1.0, "SystemExit: the model exits")):
            status, body = answers[v]
            assert status == 500 and body["error"]["type"] == "ModelError", body
            assert name in body["error"]["message"], body
        assert 'deepseek_batcher_batch_size_bucket{le="4"} 1' in server.get("/metrics")[1]
    finally:
        assert server.stop()


def test_ctrl_c_through_the_drain_delay_still_ends_as_ctrl_c():
    server = Server("--model", "serve_models:picky", "--item-shape", "1", "--drain-delay", "0.2")
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=60) == -signal.SIGINT  # KeyboardInterrupt, re-raised once drained
    assert "KeyboardInterrupt" in server.proc.stdout.read()
    server.proc.stdout.close()


def test_the_yaml_batching_section_and_flags_configure_the_server(tmp_path):
    config = tmp_path / "optimization.yaml"
    config.write_text("optimization:\n  batching: {strategy: dynamic, min_size: 2, max_size: 8}\n")
    server = Server("--config", str(config), "--max-queue-delay-ms", "1", "--max-queue-size", "9")
    try:
        status, text, _ = server.get("/health")
        policy = json.loads(text)["batching"]
        assert status == 200
        assert (policy["min_size"], policy["max_size"], policy["max_queue_size"]) == (2, 8, 9)
        assert policy["max_queue_delay"] == 0.001
    finally:
        assert server.stop()


async def asgi(app, method, path, messages, root_path=""):
    """One request through the ASGI app in-process: ``messages`` are what ``receive()`` returns
    in turn (then ``http.disconnect``); the result is ``(status, headers, body)`` or None if the
    app sent nothing."""
    messages, sent = list(messages), []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "method": method, "path": root_path + path, "root_path": root_path, "headers": [],
        "query_string": b"", "http_version": "1.1", "scheme": "http", "raw_path": path.encode(),
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), RESULT_TIMEOUT)
    if not sent:
        return None
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], dict(sent[0]["headers"]), body


def chunk(body, more=False):
    return {"type": "http.request", "body": body, "more_body": more}


def test_asgi_disconnects_head_root_path_and_model_base_exceptions():
    from deepseek_rs import DynamicBatcher
    from deepseek_rs.serving.server import create_app
    from serve_models import Picky

    async def main(app):
        ok = [chunk(b'{"inputs": [3.0], "id": 1}')]
        # The client goes away while the app waits for the body, or in the middle of it:
        # nothing is run and nothing is sent.
        assert await asgi(app, "POST", "/v1/infer", []) is None
        assert await asgi(app, "POST", "/v1/infer", [chunk(b'{"inputs": [', more=True)]) is None
        assert await asgi(app, "POST", "/v1/infer", [chunk(b'{"inputs"', True), chunk(b": [1", True)]) is None
        status, headers, _ = await asgi(app, "HEAD", "/v1/infer", [])
        assert status == 405 and headers[b"allow"] == b"POST"
        # Behind a mount point (root_path) and with a trailing slash, as Starlette routes.
        for root, path in [("", "/v1/infer/"), ("/api", "/v1/infer"), ("/api", "/v1/infer/")]:
            status, _, body = await asgi(app, "POST", path, ok, root_path=root)
            assert (status, json.loads(body)) == (200, {"outputs": 3.0, "id": 1}), (root, path)
        assert (await asgi(app, "GET", "/health", [], root_path="/api"))[0] == 200
        assert (await asgi(app, "POST", "/v1/inferx", ok))[0] == 404
        for value, name in ((7.0, "StopIteration"), (-1.0, "SystemExit")):
            status, _, body = await asgi(app, "POST", "/v1/infer", [chunk(b'{"inputs": [%g]}' % value)])
            assert status == 500 and f"the model raised {name}" in json.loads(body)["error"]["message"], body
        status, _, body = await asgi(app, "POST", "/v1/infer", [chunk(b'{"inputs": "1.5"}')])
        assert status == 400 and "not strings" in json.loads(body)["error"]["message"]

    batcher = DynamicBatcher(Picky(), dtype=None, item_shape=(1,), min_size=1, max_queue_delay=0.0)
    with batcher:
        asyncio.run(main(create_app(batcher, shutdown_batcher=False)))
        m = batcher.metrics()
    assert (m["accepted"], m["completed"], m["failed"]) == (5, 3, 2)


leaf = st.one_of(
    st.floats(-1e6, 1e6), st.integers(-1000, 1000), st.booleans(), st.sampled_from(["1", "2.5", "-3", "a"])
)


@given(
    rows=st.lists(st.lists(leaf, min_size=2, max_size=2), min_size=1, max_size=3),
    fields=st.dictionaries(
        st.sampled_from(["id", "timeout", 'x"y']),
        st.text(st.characters(exclude_characters="\\"), max_size=4) | st.none(),
    ),
    unicode_quotes=st.booleans(),
)
def test_a_string_or_boolean_anywhere_in_inputs_is_400_whatever_the_body_holds(rows, fields, unicode_quotes):
    from deepseek_rs import DynamicBatcher
    from deepseek_rs.serving.server import create_app

    fields.pop("timeout", None)  # a string timeout is a 400 of its own
    raw = json.dumps({**fields, "inputs": rows})
    if unicode_quotes:  # the same body, quotes inside strings written as \u0022
        raw = raw.replace('\\"', "\\u0022")
    with DynamicBatcher(torch.nn.Identity(), dtype=torch.float32, min_size=1, max_queue_delay=0.0) as b:
        status, _, body = asyncio.run(asgi(create_app(b), "POST", "/v1/infer", [chunk(raw.encode())]))
    has_string = any(type(v) is str for row in rows for v in row)
    has_bool = any(type(v) is bool for row in rows for v in row)
    assert status == (400 if has_string or has_bool else 200), body
    if has_bool:
        assert "true and false are not numbers" in json.loads(body)["error"]["message"]
    elif has_string:
        assert json.loads(body)["error"]["message"] == '"inputs" must be numbers, not strings'


def test_model_specs_are_checked():
    assert isinstance(load_model("serve_models:gated"), torch.nn.Module)
    for spec in ("serve_models", "no_such_module:f", "serve_models:nope", "json:dumps"):
        with pytest.raises(InvalidValueError):
            load_model(spec)
