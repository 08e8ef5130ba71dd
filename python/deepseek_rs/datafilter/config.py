"""The filter's configuration (``deepseek-rs filter --config filter.yaml``), validated field by field.

The file's schema is :class:`FilterFile` (pydantic v2; ``deepseek-rs config schema filter``
prints it as JSON Schema). Every section and key is optional; every section is validated, enabled
or not; an unknown key, a wrong type (``true`` is not a number, ``"5"`` is not 5) or a value out
of range raises ``InvalidValueError`` naming the field's path::

    batch_docs: 4096            # documents per batch (memory is bounded by this and batch_bytes)
    batch_bytes: 67108864
    max_line_bytes: 33554432    # longer lines are reported as malformed and skipped
    output:
      compression: gz           # gz, zst or none
      write_dropped: true       # dropped documents go to OUTDIR/dropped with their reason
      annotate: true            # add {"filter": {"keep", "reason", "signals"}} to every document
      plot: true                # draw OUTDIR/signals.png (needs the filter-plot extra)
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
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Tuple, Union

from pydantic import Field, field_validator, model_validator

from ..errors import InvalidValueError
from ..schema import Section, validate
from .density import DEFAULT_THRESHOLDS, Threshold, thresholds_from_config

PositiveInt = Annotated[int, Field(ge=1)]
Number = Annotated[float, Field(allow_inf_nan=False)]


def _enabled_shorthand(value: Any) -> Any:
    """``density: false`` means ``density: {enabled: false}``."""
    return {"enabled": value} if isinstance(value, bool) else value


class ThresholdSpec(Section):
    """One threshold of stage 1 (``density.thresholds.<signal>``)."""

    min: Optional[Number] = None
    max: Optional[Number] = None
    applies_to_cjk: Optional[bool] = None

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class OutputSection(Section):
    compression: Literal["gz", "zst", "none"] = "gz"
    write_dropped: bool = True
    annotate: bool = True
    plot: bool = True


class ModelDensitySection(Section):
    enabled: bool = False
    min_density: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    segments: PositiveInt = 8


class DensitySection(Section):
    enabled: bool = True
    thresholds: Optional[Dict[str, Optional[ThresholdSpec]]] = None
    model: ModelDensitySection = ModelDensitySection()

    _shorthand = field_validator("model", mode="before")(_enabled_shorthand)


class DomainSection(Section):
    enabled: bool = False
    method: Literal["lda", "dsir"] = "lda"
    score: Literal["likelihood", "mixture"] = "likelihood"
    reference: List[str] = []
    keep_quantile: Annotated[float, Field(ge=0.0, le=0.99)] = 0.05
    topics: PositiveInt = 20
    buckets: Annotated[int, Field(ge=1, le=1 << 30)] = 1 << 14
    raw_sample: PositiveInt = 10_000

    @field_validator("reference", mode="before")
    @classmethod
    def _one_path(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _needs_reference(self) -> DomainSection:
        if self.enabled and not self.reference:
            raise ValueError("reference must name at least one JSONL shard of the target domain")
        return self


class HardExamplesSection(Section):
    enabled: bool = False
    embedding: Literal["hashed", "minilm"] = "hashed"
    clusters: PositiveInt = 100
    dedup_threshold: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.95
    keep_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    seed: int = 0


class FilterFile(Section):
    """The filter YAML, as written (see the module docstring)."""

    batch_docs: PositiveInt = 4096
    batch_bytes: PositiveInt = 64 << 20
    max_line_bytes: PositiveInt = 32 << 20
    output: OutputSection = OutputSection()
    density: DensitySection = DensitySection()
    domain: DomainSection = DomainSection()
    hard_examples: HardExamplesSection = HardExamplesSection()

    _shorthand = field_validator("output", "density", "domain", "hard_examples", mode="before")(
        _enabled_shorthand
    )


@dataclass
class FilterConfig:
    """The validated configuration; ``FilterConfig()`` is stage 1 with the default thresholds."""

    batch_docs: int = 4096
    batch_bytes: int = 64 << 20
    max_line_bytes: int = 32 << 20
    compression: str = "gz"
    write_dropped: bool = True
    annotate: bool = True
    plot: bool = True
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
        if m is not None and not isinstance(m, Mapping):
            raise InvalidValueError(f"the filter config must be a mapping, got {type(m).__name__}")
        f = validate(FilterFile, dict(m or {}))
        try:
            thresholds = thresholds_from_config(f.density.thresholds and {
                name: None if spec is None else spec.model_dump(exclude_none=True)
                for name, spec in f.density.thresholds.items()
            })
        except InvalidValueError as e:
            raise InvalidValueError(f"density.thresholds: {e}") from None
        c = cls(
            batch_docs=f.batch_docs,
            batch_bytes=f.batch_bytes,
            max_line_bytes=f.max_line_bytes,
            compression=f.output.compression,
            write_dropped=f.output.write_dropped,
            annotate=f.output.annotate,
            plot=f.output.plot,
            density=f.density.enabled,
            thresholds=thresholds,
        )
        # A disabled section is validated above but changes nothing.
        if f.density.model.enabled:
            c.model_density = f.density.model.min_density
            c.model_segments = f.density.model.segments
        dom = f.domain
        if dom.enabled:
            c.domain = dom.method
            c.reference = [str(Path(base_dir) / r) for r in dom.reference]
            c.keep_quantile, c.topics, c.lda_score = dom.keep_quantile, dom.topics, dom.score
            c.buckets, c.raw_sample = dom.buckets, dom.raw_sample
        hard = f.hard_examples
        if hard.enabled:
            c.hard_examples, c.embedding, c.clusters = True, hard.embedding, hard.clusters
            c.dedup_threshold, c.keep_fraction, c.seed = hard.dedup_threshold, hard.keep_fraction, hard.seed
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
