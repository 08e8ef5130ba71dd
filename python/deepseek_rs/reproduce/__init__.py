"""``deepseek-rs reproduce``: the ledger of every claim of the article.

One row per claim (:data:`~deepseek_rs.reproduce.claims.CLAIMS`), each measured by the benchmark
modules' own functions beside a baseline that could beat the technique
(:mod:`~deepseek_rs.reproduce.rows`), or marked ``not measurable here`` with the reason and what
would measure it; :mod:`~deepseek_rs.reproduce.ledger` writes ``ledger.json`` and ``ledger.md``.
"""

from .claims import CLAIMS
from .command import main, run
from .ledger import VERDICTS
from .rows import ROWS

__all__ = ["CLAIMS", "ROWS", "VERDICTS", "main", "run"]
