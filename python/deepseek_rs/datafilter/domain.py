"""Stage 2, domain screening: keep documents that look like a reference corpus of the target domain.

Two screens over the same hashed unigram + bigram counts (``_core.hashed_features``, CJK aware):

* ``LDADomainFilter``: scikit-learn's LDA fit on the reference corpus. By default a document's
  score is how well the domain's topics explain it: the mean log-probability of its n-grams under
  its own topic mixture of the domain's topics. The alternative ``score="mixture"`` compares topic
  mixtures directly (``1 - Hellinger(theta_doc, theta_domain)``, ``theta_domain`` the mean mixture
  of the reference); it is weaker, because a document made of words the domain never uses gets
  a flat mixture, which lies close to a broad domain's mean.
* ``DSIRDomainFilter``: DSIR (Xie et al. 2023) importance weights, ``log p_target(x) - log p_raw(x)``
  under bag-of-hashed-n-gram models, per feature so long and short documents compare; the fast
  alternative (no model fit beyond two histograms).

Both keep a document whose score is at least the ``keep_quantile`` quantile of the scores of
held-out reference documents (every fifth, not used to fit), so the threshold calibrates itself
on the domain.
"""

from __future__ import annotations

import abc
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .. import _core
from ..errors import InvalidValueError


def require_sklearn() -> None:
    """Stages 2 and 3 use scikit-learn (and SciPy): the ``filter`` extra."""
    try:
        import scipy.sparse  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"domain screening and hard-example mining need scikit-learn: "
            f"pip install 'deepseek-rs[filter]' ({e})"
        ) from e


def hashed_matrix(texts: Sequence[str], buckets: int):
    """Hashed n-gram counts as a scipy CSR matrix ``[len(texts), buckets]``."""
    require_sklearn()
    from scipy.sparse import csr_matrix

    indptr, idx, counts = _core.hashed_features(list(texts), buckets)
    return csr_matrix((counts.astype(np.float64), idx.astype(np.int64), indptr), shape=(len(texts), buckets))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise InvalidValueError(f"{name} must be in [0, 1), got {value}")


def _split(reference: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(fit, calibrate): every fifth reference document is held out to set the threshold, so it
    is scored as unseen documents are (in-sample scores are optimistic). Fewer than 10
    documents: all serve both."""
    reference = list(reference)
    if len(reference) < 10:
        return reference, reference
    return [t for i, t in enumerate(reference) if i % 5], reference[::5]


class _QuantileScreen(abc.ABC):
    keep_quantile: float
    threshold: Optional[float] = None
    reason: str = ""

    @abc.abstractmethod
    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Per-text domain score, higher is closer to the reference domain."""

    def _calibrate(self, reference_scores: np.ndarray) -> None:
        self.threshold = float(np.quantile(reference_scores, self.keep_quantile))

    def keep(self, texts: Sequence[str]) -> np.ndarray:
        """Whether each text passes the screen (``fit`` first)."""
        return self.keep_scores(self.score(texts))

    def keep_scores(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise InvalidValueError(f"{type(self).__name__} is not fit; call fit(reference_texts) first")
        return scores >= self.threshold


class LDADomainFilter(_QuantileScreen):
    """LDA screen (see the module docstring); ``score`` is ``"likelihood"`` or ``"mixture"``."""

    reason = "off_domain_lda"

    def __init__(
        self,
        topics: int = 20,
        buckets: int = 1 << 14,
        keep_quantile: float = 0.05,
        seed: int = 0,
        score: str = "likelihood",
    ):
        if topics < 2 or buckets < 1:
            raise InvalidValueError(f"need topics >= 2 and buckets >= 1, got {topics} and {buckets}")
        if score not in ("likelihood", "mixture"):
            raise InvalidValueError(f"score must be 'likelihood' or 'mixture', got {score!r}")
        _check_fraction("keep_quantile", keep_quantile)
        self.topics, self.buckets, self.keep_quantile, self.seed = topics, buckets, keep_quantile, seed
        self.kind = score
        self.lda = None
        self.domain_mixture: Optional[np.ndarray] = None
        self.topic_words: Optional[np.ndarray] = None

    def fit(self, reference_texts: Sequence[str]) -> LDADomainFilter:
        require_sklearn()
        from sklearn.decomposition import LatentDirichletAllocation

        if len(reference_texts) < 2:
            raise InvalidValueError("the reference corpus needs at least 2 documents")
        fit, held_out = _split(reference_texts)
        x = hashed_matrix(fit, self.buckets)
        self.lda = LatentDirichletAllocation(
            n_components=self.topics, learning_method="batch", max_iter=20, random_state=self.seed
        ).fit(x)
        comp = self.lda.components_
        self.topic_words = comp / comp.sum(axis=1, keepdims=True)  # p(bucket | topic)
        self.domain_mixture = self.lda.transform(x).mean(axis=0)
        self._calibrate(self.score(held_out))
        return self

    def _score(self, x, theta: np.ndarray) -> np.ndarray:
        if self.kind == "mixture":
            assert self.domain_mixture is not None
            bc = np.sqrt(theta * self.domain_mixture[None, :]).sum(axis=1)  # Bhattacharyya coefficient
            return 1.0 - np.sqrt(np.clip(1.0 - bc, 0.0, 1.0))
        # Mean log2 p(feature | document) under the domain's topics, theta_d . p(feature | topic),
        # evaluated only where the document has features.
        assert self.topic_words is not None
        x = x.tocoo()
        out = np.zeros(x.shape[0])
        total = np.zeros(x.shape[0])
        for lo in range(0, x.nnz, 1 << 18):
            r, c, v = x.row[lo : lo + (1 << 18)], x.col[lo : lo + (1 << 18)], x.data[lo : lo + (1 << 18)]
            p = np.einsum("nk,kn->n", theta[r], self.topic_words[:, c])
            np.add.at(out, r, v * np.log2(np.maximum(p, 1e-300)))
            np.add.at(total, r, v)
        # A document without features has nothing the domain explains: the lowest score.
        return np.divide(out, total, out=np.full_like(out, -np.inf), where=total > 0)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Per text: with ``"likelihood"`` (default), the mean log2-probability of its hashed
        n-grams under the domain's topics mixed by its own topic mixture (how well the domain
        explains it); with ``"mixture"``, ``1 - Hellinger`` distance of its topic mixture to the
        domain's mean mixture, in [0, 1]."""
        if self.lda is None:
            raise InvalidValueError("LDADomainFilter is not fit; call fit(reference_texts) first")
        if len(texts) == 0:
            return np.zeros(0)
        x = hashed_matrix(texts, self.buckets)
        return self._score(x, self.lda.transform(x))


class DSIRDomainFilter(_QuantileScreen):
    """DSIR importance-weight screen (see the module docstring)."""

    reason = "off_domain_dsir"

    def __init__(self, buckets: int = 1 << 16, keep_quantile: float = 0.05, smoothing: float = 1.0):
        if buckets < 1 or smoothing <= 0:
            raise InvalidValueError(f"need buckets >= 1 and smoothing > 0, got {buckets} and {smoothing}")
        _check_fraction("keep_quantile", keep_quantile)
        self.buckets, self.keep_quantile, self.smoothing = buckets, keep_quantile, smoothing
        self.log_ratio: Optional[np.ndarray] = None

    def _log_probs(self, texts: Sequence[str]) -> np.ndarray:
        _, idx, counts = _core.hashed_features(list(texts), self.buckets)
        totals = np.bincount(idx, weights=counts, minlength=self.buckets) + self.smoothing
        return np.log(totals / totals.sum())

    def fit(self, reference_texts: Sequence[str], raw_texts: Sequence[str]) -> DSIRDomainFilter:
        """Fit the target model on ``reference_texts`` and the raw model on ``raw_texts``
        (a sample of the data to be filtered)."""
        if len(reference_texts) < 2 or len(raw_texts) < 1:
            raise InvalidValueError("DSIR needs at least 2 reference documents and 1 raw document")
        fit, held_out = _split(reference_texts)
        self.log_ratio = self._log_probs(fit) - self._log_probs(raw_texts)
        self._calibrate(self.score(held_out))
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Log importance weight per hashed feature of each text (0 for a text without words)."""
        if self.log_ratio is None:
            raise InvalidValueError("DSIRDomainFilter is not fit; call fit(reference, raw) first")
        return _core.dsir_log_importance(list(texts), self.log_ratio, per_feature=True)
