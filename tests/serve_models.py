"""Model factories for the HTTP server tests (``--model serve_models:gated``)."""

import os
import time

from torch import nn


class Gated(nn.Module):
    """Doubles its input, but first waits while the file named by $SERVE_TEST_GATE exists:
    the test decides when a batch finishes, so requests pile up deterministically."""

    def forward(self, x):
        gate = os.environ.get("SERVE_TEST_GATE")
        while gate and os.path.exists(gate):
            time.sleep(0.005)
        return x * 2


def gated():
    return Gated()


class Picky(nn.Module):
    """One value per request (``[B, 1]`` in, ``[B]`` out: each caller gets a 0-d slice), but
    raises StopIteration on a 7 and SystemExit on a -1: errors asyncio and servers handle badly."""

    def forward(self, x):
        if (x == 7).any():
            raise StopIteration("no next item")
        if (x == -1).any():
            raise SystemExit("the model exits")
        return x.sum(-1)


def picky():
    return Picky()


class SlowStart(nn.Module):
    """Takes $SERVE_TEST_LOAD_S seconds to load, and records its first call (the warm-up) in the
    file $SERVE_TEST_WARM: the server must not say it listens before both."""

    def __init__(self):
        super().__init__()
        time.sleep(float(os.environ.get("SERVE_TEST_LOAD_S", "1")))

    def forward(self, x):
        warm = os.environ.get("SERVE_TEST_WARM")
        if warm and not os.path.exists(warm):
            with open(warm, "w") as f:
                f.write("warm")
        return x * 2


def slow_start():
    return SlowStart()


class Sleepy(nn.Module):
    """Sleeps $SERVE_TEST_BATCH_S seconds per batch (whatever its size), then doubles: a model
    whose saturation rate is max_batch_size / that time, cheap on the CPU for overload tests."""

    def forward(self, x):
        time.sleep(float(os.environ.get("SERVE_TEST_BATCH_S", "0.02")))
        return x * 2


def sleepy():
    return Sleepy()
