"""`deepseek-rs serve` started for real on loopback, driven over HTTP."""

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

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from deepseek_rs import InvalidValueError  # noqa: E402
from deepseek_rs.serve import default_model, load_model  # noqa: E402


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
        """SIGTERM; True if the server drained and exited (uvicorn re-raises the signal after a
        graceful shutdown, so the exit status is 0 or -SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.proc.stdout.close()
        return code in (0, -signal.SIGTERM)


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
        assert server.get("/nowhere")[0] == 404
        for bad, name in [
            (b"{not json", "JSONDecodeError"),
            ({"input": [[1.0]]}, "InvalidValueError"),
            ({"inputs": [[1.0] * 255]}, "ShapeError"),
            ({"inputs": [[1.0] * 256, [1.0]]}, "InvalidValueError"),
            ({"inputs": [["a"] * 256]}, "InvalidValueError"),
            ({"inputs": [[1.0] * 256], "priority": "high"}, "InvalidValueError"),
            ({"inputs": [[None] * 256]}, "InvalidValueError"),  # null would be NaN
            ({"inputs": [[1e39] * 256]}, "InvalidValueError"),  # inf in float32
            ({"inputs": [[1.0] * 256], "timeout": -1}, "InvalidValueError"),
        ]:
            status, body, _ = server.infer(bad)
            assert status == 400 and body["error"] == name, body
        status, text, _ = server.get("/metrics")
        assert status == 200
        assert 'deepseek_batcher_requests_total{outcome="completed"} 2' in text
        assert 'deepseek_http_responses_total{code="400"} 9' in text
        assert "deepseek_batcher_latency_seconds_count 2" in text
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
        assert status == 413 and "more than 200" in body["detail"]
        status, body, _ = server.infer({"inputs": [1.0, 2.0]})
        assert status == 400 and "item_shape (1,)" in body["detail"]
        gate.touch()
        threads = start(0)
        wait_for(server, "in_flight", 1)
        threads += start(1, 2)
        wait_for(server, "queue_depth", 2)
        status, body, headers = server.infer({"inputs": [3.0], "id": 3})
        assert status == 429 and body["error"] == "QueueFullError" and headers["retry-after"] == "1"
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
        assert answers[11][0] == 504 and answers[11][1]["error"] == "RequestTimeoutError"

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
        assert json.loads(health[1]) == {"status": "draining"}
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
        assert server.stop()
    finally:
        gate.unlink(missing_ok=True)
        server.stop()


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


def test_model_specs_are_checked():
    assert isinstance(load_model("serve_models:gated"), torch.nn.Module)
    for spec in ("serve_models", "no_such_module:f", "serve_models:nope", "json:dumps"):
        with pytest.raises(InvalidValueError):
            load_model(spec)
