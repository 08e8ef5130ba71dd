"""The article's pre-training data filter: semantic density, domain screening, hard-example mining.

* Signals (Rust, one pass per document, parallel): ``compute_signals``, ``SIGNAL_NAMES``.
* Stage 1: ``DensityFilter`` with Gopher / FineWeb / entropy ``Threshold``s (``DEFAULT_THRESHOLDS``);
  optional model density from ``MiniLMEncoder.semantic_density``.
* Stage 2: ``LDADomainFilter`` and ``DSIRDomainFilter``.
* Stage 3: ``mine_hard_examples`` (SemDeDup + prototypicality) over ``HashedEmbedder`` or
  ``MiniLMEncoder`` embeddings.
* Shards: ``run_filter`` (``deepseek-rs filter``), ``FilterConfig``; Ray Data: ``RayFilter``.
"""

from .config import FilterConfig
from .density import DEFAULT_THRESHOLDS, KEEP, DensityFilter, Threshold
from .domain import DSIRDomainFilter, LDADomainFilter
from .embed import HashedEmbedder, MiniLMEncoder
from .hard_examples import HardExampleResult, mine_hard_examples
from .pipeline import AccountingError, run_filter
from .ray_adapter import RayFilter
from .signals import SIGNAL_NAMES, compute_signals

__all__ = [
    "DEFAULT_THRESHOLDS",
    "KEEP",
    "SIGNAL_NAMES",
    "AccountingError",
    "DSIRDomainFilter",
    "DensityFilter",
    "FilterConfig",
    "HardExampleResult",
    "HashedEmbedder",
    "LDADomainFilter",
    "MiniLMEncoder",
    "RayFilter",
    "Threshold",
    "compute_signals",
    "mine_hard_examples",
    "run_filter",
]
