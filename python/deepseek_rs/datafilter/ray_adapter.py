"""Stages 1 and 2 inside Ray Data: ``ds.map_batches(RayFilter(config), batch_format="numpy")``.

Every batch (a dict of numpy columns with a ``text`` column) comes back with one column per
signal, ``keep`` and ``reason`` (empty when kept); the same ``DensityFilter`` and (fitted) domain
screen run as in ``deepseek-rs filter``. Stage 3 compares documents across the whole corpus, so
it runs after the map on the collected embeddings, not per batch.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import numpy as np

from ..errors import InvalidValueError
from .config import FilterConfig
from .density import KEEP, DensityFilter
from .domain import DSIRDomainFilter, LDADomainFilter
from .signals import SIGNAL_NAMES, compute_signals


class RayFilter:
    """A picklable batch function (see the module docstring)."""

    def __init__(
        self,
        config: Optional[FilterConfig] = None,
        domain: Optional[Union[LDADomainFilter, DSIRDomainFilter]] = None,
    ):
        self.config = config or FilterConfig()
        if self.config.model_density is not None or self.config.hard_examples:
            raise InvalidValueError(
                "RayFilter runs stages 1 (thresholds) and 2 per batch; the MiniLM density score and "
                "hard-example mining are not run here: turn them off in the config"
            )
        if self.config.domain is not None and domain is None:
            raise InvalidValueError("the config enables domain screening: pass the fitted screen as domain=")
        self.density = DensityFilter(self.config.thresholds) if self.config.density else None
        self.domain = domain

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if "text" not in batch:
            raise InvalidValueError(f"the batch has no 'text' column; columns: {sorted(batch)}")
        raw = list(batch["text"])
        valid = np.array([isinstance(t, str) for t in raw], dtype=bool)
        texts = [t if ok else "" for t, ok in zip(raw, valid)]
        signals = compute_signals(texts)
        n = len(texts)
        reasons = np.full(n, "", dtype=object)
        keep = np.ones(n, dtype=bool)
        if self.density is not None:
            codes = self.density.decide(signals)
            table = np.array(self.density.reasons + [""], dtype=object)
            keep = codes == KEEP
            reasons = np.where(keep, "", table[codes]).astype(object)
            reasons[~keep] = ["density:" + r for r in reasons[~keep]]
        # a row whose text is not a string (None, a number, bytes) is malformed, never guessed at
        keep &= valid
        reasons[~valid] = "malformed:text is not a string"
        if self.domain is not None and keep.any():
            alive = np.flatnonzero(keep)
            ok = self.domain.keep([texts[i] for i in alive])
            reasons[alive[~ok]] = "domain:" + self.domain.reason
            keep[alive[~ok]] = False
        out = dict(batch)
        for j, name in enumerate(SIGNAL_NAMES):
            out[name] = signals[:, j]
        out["keep"] = keep
        out["reason"] = reasons.astype(str)
        return out
