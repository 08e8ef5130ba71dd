"""The filter's configuration (``deepseek-rs filter --config filter.yaml``), validated field by field.

Every section and key is optional; an unknown key raises ``InvalidValueError`` naming it::

    batch_docs: 4096            # documents per batch (memory is bounded by this and batch_bytes)
    batch_bytes: 67108864
    max_line_bytes: 33554432    # longer lines are reported as malformed and skipped
    output:
      compression: gz           # gz, zst or none
      write_dropped: true       # dropped documents go to OUTDIR/dropped with their reason
      annotate: true            # add {"filter": {"keep", "reason", "signals"}} to every document
    density:                    # stage 1
      enabled: true
      thresholds:               # merged over the defaults (see density.py); null removes one
        n_words: {min: 50, max: 100000}
      model:                    # optional MiniLM density (extra deepseek-rs[filter-model])
        enabled: false
        min_density: 0.5
        segments: 8
    domain:                     # stage 2
      enabled: false
      method: lda               # lda or dsir
      score: likelihood         # lda: likelihood (how well the topics explain it) or mixture
      reference: [ref.jsonl]    # JSONL shards of the target domain
      keep_quantile: 0.05
      topics: 20                # lda
      buckets: 16384
      raw_sample: 10000         # dsir: documents of the input that estimate the raw distribution
    hard_examples:              # stage 3
      enabled: false
      embedding: hashed         # hashed or minilm
      clusters: 100
      dedup_threshold: 0.95
      keep_fraction: 0.8
      seed: 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..errors import InvalidValueError
from .density import DEFAULT_THRESHOLDS, Threshold, thresholds_from_config


def _section(m: Mapping[str, Any], name: str, allowed: Dict[str, Any]) -> Dict[str, Any]:
    raw = m.get(name)
    if raw is None:
        raw = {}
    elif isinstance(raw, bool) and "enabled" in allowed:  # `density: false`
        raw = {"enabled": raw}
    if not isinstance(raw, Mapping):
        raise InvalidValueError(f"{name} must be a mapping, got {raw!r}")
    unknown = set(raw) - set(allowed)
    if unknown:
        raise InvalidValueError(f"unknown key(s) in {name}: {sorted(unknown)}; allowed: {sorted(allowed)}")
    out = dict(allowed)
    out.update(raw)
    for key, default in allowed.items():
        if isinstance(default, bool) and not isinstance(out[key], bool):
            raise InvalidValueError(f"{name}.{key} must be true or false, got {out[key]!r}")
    return out


def _choice(section: str, key: str, value: Any, allowed: Tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidValueError(f"{section}.{key} must be one of {allowed}, got {value!r}")
    return str(value)


def _positive(section: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValueError(f"{section}.{key} must be a positive integer, got {value!r}")
    return value


def _fraction(section: str, key: str, value: Any, lo: float = 0.0, hi: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise InvalidValueError(f"{section}.{key} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


@dataclass
class FilterConfig:
    """The validated configuration; ``FilterConfig()`` is stage 1 with the default thresholds."""

    batch_docs: int = 4096
    batch_bytes: int = 64 << 20
    max_line_bytes: int = 32 << 20
    compression: str = "gz"
    write_dropped: bool = True
    annotate: bool = True
    density: bool = True
    thresholds: Tuple[Threshold, ...] = DEFAULT_THRESHOLDS
    model_density: Optional[float] = None
    model_segments: int = 8
    domain: Optional[str] = None
    reference: List[str] = field(default_factory=list)
    keep_quantile: float = 0.05
    topics: int = 20
    lda_score: str = "likelihood"
    buckets: int = 1 << 14
    raw_sample: int = 10_000
    hard_examples: bool = False
    embedding: str = "hashed"
    clusters: int = 100
    dedup_threshold: float = 0.95
    keep_fraction: float = 0.8
    seed: int = 0

    @classmethod
    def from_mapping(cls, m: Optional[Mapping[str, Any]], base_dir: Union[str, Path] = ".") -> FilterConfig:
        """Validate a parsed YAML mapping; relative reference paths are taken from ``base_dir``."""
        m = dict(m or {})
        top = {"batch_docs", "batch_bytes", "max_line_bytes", "output", "density", "domain", "hard_examples"}
        unknown = set(m) - top
        if unknown:
            raise InvalidValueError(
                f"unknown key(s) in the filter config: {sorted(unknown)}; allowed: {sorted(top)}"
            )
        c = cls()
        for key in ("batch_docs", "batch_bytes", "max_line_bytes"):
            if key in m:
                setattr(c, key, _positive("config", key, m[key]))
        out = _section(m, "output", {"compression": "gz", "write_dropped": True, "annotate": True})
        c.compression = _choice("output", "compression", out["compression"], ("gz", "zst", "none"))
        c.write_dropped, c.annotate = bool(out["write_dropped"]), bool(out["annotate"])

        den = _section(m, "density", {"enabled": True, "thresholds": None, "model": None})
        c.density = bool(den["enabled"])
        c.thresholds = thresholds_from_config(den["thresholds"])
        model = _section(den, "model", {"enabled": False, "min_density": 0.5, "segments": 8})
        if model["enabled"]:
            c.model_density = _fraction("density.model", "min_density", model["min_density"])
            c.model_segments = _positive("density.model", "segments", model["segments"])

        dom = _section(
            m,
            "domain",
            {
                "enabled": False,
                "method": "lda",
                "score": "likelihood",
                "reference": [],
                "keep_quantile": 0.05,
                "topics": 20,
                "buckets": 1 << 14,
                "raw_sample": 10_000,
            },
        )
        if dom["enabled"]:
            c.domain = _choice("domain", "method", dom["method"], ("lda", "dsir"))
            refs = dom["reference"]
            if isinstance(refs, str):
                refs = [refs]
            if not refs:
                raise InvalidValueError(
                    "domain.reference must name at least one JSONL shard of the target domain"
                )
            c.reference = [str(Path(base_dir) / r) for r in refs]
            c.keep_quantile = _fraction("domain", "keep_quantile", dom["keep_quantile"], 0.0, 0.99)
            c.topics = _positive("domain", "topics", dom["topics"])
            c.lda_score = _choice("domain", "score", dom["score"], ("likelihood", "mixture"))
            c.buckets = _positive("domain", "buckets", dom["buckets"])
            c.raw_sample = _positive("domain", "raw_sample", dom["raw_sample"])

        hard = _section(
            m,
            "hard_examples",
            {
                "enabled": False,
                "embedding": "hashed",
                "clusters": 100,
                "dedup_threshold": 0.95,
                "keep_fraction": 0.8,
                "seed": 0,
            },
        )
        if hard["enabled"]:
            c.hard_examples = True
            c.embedding = _choice("hard_examples", "embedding", hard["embedding"], ("hashed", "minilm"))
            c.clusters = _positive("hard_examples", "clusters", hard["clusters"])
            c.dedup_threshold = _fraction(
                "hard_examples", "dedup_threshold", hard["dedup_threshold"], -1.0, 1.0
            )
            c.keep_fraction = _fraction("hard_examples", "keep_fraction", hard["keep_fraction"])
            if c.keep_fraction == 0.0:
                raise InvalidValueError("hard_examples.keep_fraction must be above 0")
            seed = hard["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise InvalidValueError(f"hard_examples.seed must be an integer, got {seed!r}")
            c.seed = seed
        return c

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> FilterConfig:
        import yaml

        path = Path(path)
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise InvalidValueError(f"{path}: no such file") from None
        except yaml.YAMLError as e:
            raise InvalidValueError(f"{path}: not valid YAML: {e}") from None
        if data is not None and not isinstance(data, Mapping):
            raise InvalidValueError(f"{path}: the filter config must be a mapping")
        return cls.from_mapping(data, base_dir=path.parent)
