"""Stage 3, hard-example mining over document embeddings: SemDeDup, then D4-style prototypicality pruning.

1. k-means (spherical: unit embeddings, normalised centroids) splits the corpus into clusters.
2. SemDeDup (Abbas et al. 2023): within each cluster, documents are ordered from the farthest to
   the nearest to the centroid, and one whose cosine similarity to an earlier document exceeds
   ``dedup_threshold`` is a near-duplicate (so of each duplicate group, the least prototypical
   member stays).
3. Difficulty is the cosine distance to the cluster prototype (SSL prototypes, Sorscher et al.
   2022; D4, Tirumala et al. 2023): in each cluster the ``keep_fraction`` of the remaining
   documents farthest from the prototype are kept, the most prototypical (easiest) dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidValueError, ShapeError
from .domain import require_sklearn

KEPT, NEAR_DUPLICATE, PROTOTYPICAL = 0, 1, 2
REASONS = {NEAR_DUPLICATE: "near_duplicate", PROTOTYPICAL: "prototypical"}
_BLOCK = 1024


@dataclass
class HardExampleResult:
    """Per document: decision (``KEPT``, ``NEAR_DUPLICATE``, ``PROTOTYPICAL``), cluster, difficulty."""

    decision: np.ndarray
    cluster: np.ndarray
    difficulty: np.ndarray


def _kmeans(x: np.ndarray, k: int, seed: int, iters: int = 25) -> np.ndarray:
    require_sklearn()
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(x) > 20_000:
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096).fit(x)
    else:
        km = KMeans(n_clusters=k, random_state=seed, n_init=1, max_iter=iters).fit(x)
    return km.labels_.astype(np.int64)


def mine_hard_examples(
    embeddings: np.ndarray,
    clusters: int = 100,
    dedup_threshold: float = 0.95,
    keep_fraction: float = 0.8,
    seed: int = 0,
) -> HardExampleResult:
    """Decide every document of ``embeddings`` (``[docs, dim]``, rows of unit norm)."""
    if embeddings.ndim != 2:
        raise ShapeError(f"embeddings must be [docs, dim], got shape {embeddings.shape}")
    if clusters < 1 or not 0.0 < keep_fraction <= 1.0 or not -1.0 <= dedup_threshold <= 1.0:
        raise InvalidValueError(
            f"need clusters >= 1, 0 < keep_fraction <= 1, -1 <= dedup_threshold <= 1; "
            f"got {clusters}, {keep_fraction}, {dedup_threshold}"
        )
    n = len(embeddings)
    x = np.asarray(embeddings, dtype=np.float32)
    decision = np.full(n, KEPT, dtype=np.int8)
    difficulty = np.zeros(n, dtype=np.float64)
    if n == 0:
        return HardExampleResult(decision, np.zeros(0, dtype=np.int64), difficulty)
    k = min(clusters, n)
    labels = _kmeans(x, k, seed) if k > 1 else np.zeros(n, dtype=np.int64)
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        centroid = x[idx].mean(axis=0)
        norm = float(np.linalg.norm(centroid))
        centroid = centroid / norm if norm > 0 else centroid
        dist = 1.0 - x[idx] @ centroid
        difficulty[idx] = dist
        order = idx[np.argsort(-dist, kind="stable")]  # farthest first
        e = x[order]
        dup = np.zeros(len(order), dtype=bool)
        for s in range(1, len(order), _BLOCK):
            rows = e[s : s + _BLOCK]
            sims = rows @ e[: s + len(rows)].T  # against every earlier document (and the block)
            tri = np.arange(s, s + len(rows))[:, None] <= np.arange(s + len(rows))[None, :]
            sims[tri] = -np.inf
            dup[s : s + len(rows)] = sims.max(axis=1) > dedup_threshold
        decision[order[dup]] = NEAR_DUPLICATE
        rest = order[~dup]  # still farthest first
        keep = int(np.ceil(keep_fraction * len(rest)))
        decision[rest[keep:]] = PROTOTYPICAL
    return HardExampleResult(decision, labels, difficulty)
