"""Unified semantic space (the article's USS): one shared encoder for every modality, trained with
a symmetric contrastive loss plus a cross-modal semantic-consistency loss.

The article's ``uss_loss`` calls an ``encoder`` and a ``decoder`` it never defines, and applies one
decoder to both modalities. Here they are:

* ``UnifiedSemanticSpace``: per-modality input projections (``nn.Linear`` to ``dim``) into one
  modality-agnostic encoder (pre-LayerNorm residual MLP blocks) whose output is L2-normalised:
  ``space(features, "image")`` is an embedding on the unit sphere, whatever the modality. Each
  modality also has a decoder (an MLP from the shared space back to that modality's features).
* ``USSLoss``: ``contrastive_weight * L_cl + consistency_weight * L_sem`` (0.7 / 0.3 by
  default), where ``L_cl`` is the symmetric InfoNCE of the paired embeddings, text-to-image plus
  image-to-text cross-entropy as the article writes it, with a learnable temperature (CLIP's
  ``logit_scale``, capped at 100); and ``L_sem`` is the cycle through the other modality: the
  image embedding decoded into text features and encoded again must land on the paired text
  embedding, and the other way round:
  ``|t - E(D_text(i), text)|^2 + |i - E(D_image(t), image)|^2``, squared Euclidean distances of
  unit vectors averaged over the batch (the article's element-wise ``mse_loss`` would divide the
  term by the embedding width and make its 0.3 weight vanish).
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import DeviceError, DTypeError, InvalidValueError, ShapeError


class _Block(nn.Module):
    """Pre-LayerNorm residual MLP block: ``x + W2 gelu(W1 LN(x))``."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_float_tensor(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise DTypeError(f"{name} must be floating point, got {x.dtype}")


def _check_pair(a: Tensor, b: Tensor) -> None:
    """``a`` and ``b`` are paired embeddings: float tensors of one shape [B >= 1, dim], one dtype
    and one device."""
    _check_float_tensor("a", a)
    _check_float_tensor("b", b)
    if a.dim() != 2 or a.shape != b.shape or a.shape[0] < 1:
        raise ShapeError(
            "a and b must be paired embeddings of one shape [B >= 1, dim], "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise DTypeError(f"a and b must have one dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise DeviceError(f"a is on {a.device} and b on {b.device}")


class UnifiedSemanticSpace(nn.Module):
    """Per-modality projections into one shared, modality-agnostic encoder.

    Args:
        modality_dims: feature width of each modality, e.g. ``{"text": 768, "image": 1024}``.
        dim: width of the shared space (the embeddings).
        depth: residual MLP blocks in the shared encoder.
        mlp_ratio: hidden width of those blocks (and of the decoders), in multiples of ``dim``.
        dropout: dropout inside the blocks.

    ``space(features, modality)`` maps ``[..., modality_dims[modality]]`` to unit vectors
    ``[..., dim]``; ``space.decode(embedding, modality)`` maps back to that modality's features.
    """

    def __init__(
        self,
        modality_dims: Mapping[str, int],
        dim: int = 256,
        depth: int = 2,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(modality_dims, Mapping) or not modality_dims:
            raise InvalidValueError(f"modality_dims must be a non-empty mapping, got {modality_dims!r}")
        for name, width in modality_dims.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise InvalidValueError(f"a modality name must be an identifier string, got {name!r}")
            _check_int(f"modality_dims[{name!r}]", width, 1)
        _check_int("dim", dim, 1)
        _check_int("depth", depth, 0)
        _check_int("mlp_ratio", mlp_ratio, 1)
        if not (_is_number(dropout) and 0.0 <= dropout < 1.0):
            raise InvalidValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.modality_dims = dict(modality_dims)
        self.dim = dim
        hidden = dim * mlp_ratio
        self.projections = nn.ModuleDict({m: nn.Linear(w, dim) for m, w in self.modality_dims.items()})
        self.encoder = nn.Sequential(*[_Block(dim, hidden, dropout) for _ in range(depth)], nn.LayerNorm(dim))
        self.decoders = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, w))
                for m, w in self.modality_dims.items()
            }
        )

    def _check(self, x: Tensor, modality: str, what: str, decode: bool) -> None:
        if not isinstance(modality, str) or modality not in self.modality_dims:
            raise InvalidValueError(
                f"unknown modality {modality!r}; this space has {sorted(self.modality_dims)}"
            )
        _check_float_tensor(what, x)
        width = self.dim if decode else self.modality_dims[modality]
        if x.dim() == 0 or x.shape[-1] != width:
            raise ShapeError(f"{what} for {modality!r} must be [..., {width}], got {tuple(x.shape)}")
        # The first layer x meets: torch would fail inside it with a message naming neither.
        weight = getattr(self.decoders[modality][0] if decode else self.projections[modality], "weight", None)
        if isinstance(weight, Tensor):
            if x.device != weight.device:
                raise DeviceError(f"{what} is on {x.device}, the space's parameters on {weight.device}")
            if (
                weight.is_floating_point()
                and x.dtype != weight.dtype
                and not torch.is_autocast_enabled(x.device.type)
            ):
                raise DTypeError(
                    f"{what} is {x.dtype} but the space's parameters are {weight.dtype}: "
                    "convert one to the other's dtype (or run under torch.autocast)"
                )

    def forward(self, features: Tensor, modality: str) -> Tensor:
        """Embed ``features`` of ``modality`` into the shared space (unit vectors)."""
        self._check(features, modality, "features", decode=False)
        return F.normalize(self.encoder(self.projections[modality](features)), dim=-1)

    encode = forward

    def decode(self, embedding: Tensor, modality: str) -> Tensor:
        """Map shared-space embeddings to features of ``modality``."""
        self._check(embedding, modality, "embedding", decode=True)
        return self.decoders[modality](embedding)

    def extra_repr(self) -> str:
        return f"modality_dims={self.modality_dims}, dim={self.dim}"


class USSLossOutput(NamedTuple):
    """The total loss and its two terms (``loss = w_cl * contrastive + w_sem * consistency``)."""

    loss: Tensor
    contrastive: Tensor
    consistency: Tensor


def symmetric_info_nce(a: Tensor, b: Tensor, logit_scale: Tensor) -> Tensor:
    """Cross-entropy of ``a`` against ``b`` plus of ``b`` against ``a``, row ``i`` of each being
    the positive pair and every other row of the batch a negative. Rows are L2-normalised;
    ``logit_scale`` is the inverse temperature."""
    _check_pair(a, b)
    logits = logit_scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    labels = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


class USSLoss(nn.Module):
    """The article's USS objective: ``0.7 * symmetric InfoNCE + 0.3 * semantic consistency``.

    Args:
        space: the ``UnifiedSemanticSpace`` whose encoder and decoders the consistency term runs
            through (may be None when ``consistency_weight`` is 0: plain contrastive loss).
        contrastive_weight, consistency_weight: the weights (article: 0.7 and 0.3).
        temperature: initial softmax temperature (CLIP: 0.07).
        learnable_temperature: train the temperature (as ``logit_scale = log(1 / temperature)``,
            kept at most ``log(max_logit_scale)``).
        max_logit_scale: cap of the inverse temperature (CLIP: 100).

    ``loss_fn(a, b, modalities=("text", "image"))`` takes paired embeddings ``[B, dim]`` from
    the space (row ``i`` of ``a`` pairs with row ``i`` of ``b``) and returns the scalar loss;
    ``return_parts=True`` returns a ``USSLossOutput`` with both terms too. The learnable
    temperature is the loss module's only parameter (the space is referenced, not owned): give
    ``loss_fn.parameters()`` to the optimizer beside ``space.parameters()``.
    """

    def __init__(
        self,
        space: Optional[UnifiedSemanticSpace] = None,
        *,
        contrastive_weight: float = 0.7,
        consistency_weight: float = 0.3,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if space is not None and not isinstance(space, UnifiedSemanticSpace):
            raise DTypeError(f"space must be a UnifiedSemanticSpace or None, got {type(space).__name__}")
        for name, w in (
            ("contrastive_weight", contrastive_weight),
            ("consistency_weight", consistency_weight),
        ):
            if not (_is_number(w) and math.isfinite(w) and w >= 0):
                raise InvalidValueError(f"{name} must be a finite number >= 0, got {w!r}")
        if contrastive_weight == 0 and consistency_weight == 0:
            raise InvalidValueError("contrastive_weight and consistency_weight are both 0: the loss is 0")
        if consistency_weight > 0 and not isinstance(space, UnifiedSemanticSpace):
            raise InvalidValueError(
                "the consistency term needs the UnifiedSemanticSpace it runs through: pass space=, "
                "or consistency_weight=0 for a plain contrastive loss"
            )
        if not (_is_number(max_logit_scale) and math.isfinite(max_logit_scale) and max_logit_scale > 1):
            raise InvalidValueError(f"max_logit_scale must be a finite number > 1, got {max_logit_scale!r}")
        if not (_is_number(temperature) and 1 / max_logit_scale <= temperature < math.inf):
            raise InvalidValueError(
                f"temperature must be a finite number >= 1/max_logit_scale = {1 / max_logit_scale}, "
                f"got {temperature!r}"
            )
        if not isinstance(learnable_temperature, bool):
            raise InvalidValueError(f"learnable_temperature must be a bool, got {learnable_temperature!r}")
        # Not a submodule: loss_fn.parameters() is the temperature alone, so the space's
        # parameters are not given to an optimizer twice.
        self.__dict__["space"] = space
        self.contrastive_weight, self.consistency_weight = (
            float(contrastive_weight),
            float(consistency_weight),
        )
        self.max_logit_scale = float(max_logit_scale)
        scale = torch.tensor(math.log(1.0 / temperature))
        self.logit_scale = nn.Parameter(scale, requires_grad=learnable_temperature)

    @property
    def temperature(self) -> float:
        """The current softmax temperature."""
        return 1.0 / self._scale().item()

    def _scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        modalities: Tuple[str, str] = ("text", "image"),
        return_parts: bool = False,
    ):
        _check_pair(a, b)
        if not (
            isinstance(modalities, (tuple, list))
            and len(modalities) == 2
            and all(isinstance(m, str) for m in modalities)
        ):
            raise InvalidValueError(f"modalities must be a pair of modality names, got {modalities!r}")
        scale_device = self.logit_scale.device
        if scale_device != a.device and scale_device.type != "cpu":  # a CPU scalar goes anywhere
            raise DeviceError(f"a and b are on {a.device} but the temperature is on {scale_device}")
        # The consistency term runs through the space (never None then: see __init__).
        space: Optional[UnifiedSemanticSpace] = self.space if self.consistency_weight > 0 else None
        if space is not None:
            if a.shape[1] != space.dim:
                raise ShapeError(
                    f"a and b must be embeddings of the space, [B, {space.dim}], got {tuple(a.shape)}"
                )
            # b is decoded into the features of a's modality and a into b's.
            space._check(b, modalities[0], "b", decode=True)
            space._check(a, modalities[1], "a", decode=True)
        contrastive = symmetric_info_nce(a, b, self._scale())
        if space is not None:
            ma, mb = modalities
            a_unit, b_unit = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
            # b decoded into a's features and encoded again must land on a, and the other way round.
            a_again = space(space.decode(b_unit, ma), ma)
            b_again = space(space.decode(a_unit, mb), mb)
            consistency = (a_unit - a_again).square().sum(-1).mean() + (b_unit - b_again).square().sum(
                -1
            ).mean()
        else:
            consistency = contrastive.new_zeros(())
        loss = self.contrastive_weight * contrastive + self.consistency_weight * consistency
        return USSLossOutput(loss, contrastive, consistency) if return_parts else loss

    def extra_repr(self) -> str:
        return (
            f"contrastive_weight={self.contrastive_weight}, consistency_weight={self.consistency_weight}, "
            f"temperature={self.temperature:.4g}"
        )


__all__ = ["USSLoss", "USSLossOutput", "UnifiedSemanticSpace", "symmetric_info_nce"]
