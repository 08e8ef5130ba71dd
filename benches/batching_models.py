"""Models the batching benchmark serves (``deepseek-rs serve --model batching_models:FACTORY``,
with ``benches/`` on ``PYTHONPATH``)."""

from __future__ import annotations

from typing import Any

import torch
from deepseek_rs.serving.server import DEFAULT_HIDDEN_SIZE, default_model
from torch import Tensor, nn

# A request whose first feature (of any token) is this makes the model raise.
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
    """The server's built-in PEAMoE (the same seeded weights), failing on marked rows."""
    model = FailsOnMark(default_model())
    with torch.inference_mode():  # the first call pays one-time set-up: not a client's
        model(torch.zeros(4, DEFAULT_HIDDEN_SIZE))
    return model
