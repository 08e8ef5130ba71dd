"""``deepseek-rs serve --batch-invariant``: a request's answer has the same bits alone and in any
batch (issue 14). The built-in PEAMoE, ragged batching of 1 to 3 rows per request."""

import json
import threading
import urllib.request

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import torch  # noqa: E402
from test_serve_integrity import start, stop  # noqa: E402


def infer(port, rows):
    body = json.dumps({"inputs": rows}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/infer", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["outputs"]


def send(port, answers, i, rows):
    answers[i] = infer(port, rows)


def test_the_same_request_gets_the_same_bits_whatever_shares_its_batch():
    proc, port, _ = start(
        "--batch-invariant", "--min-batch-size", "8", "--max-batch-size", "16", "--max-queue-delay-ms", "50"
    )
    try:
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(2, 256, generator=g).tolist()
        alone = infer(port, probe)
        for round_ in range(4):
            others = [torch.randn(1 + (i + round_) % 3, 256, generator=g).tolist() for i in range(7)]
            answers = {}
            requests = enumerate([probe, *others])
            threads = [threading.Thread(target=send, args=(port, answers, i, r)) for i, r in requests]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert answers[0] == alone, f"round {round_}: the probe's answer changed with its batch"
    finally:
        stop(proc)
