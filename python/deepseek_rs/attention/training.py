"""Training the gates of a model's :class:`~.module.DynamicAttention` layers: their summed loss
and DSA's warm-up (the gates alone, every block attended)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, List

import torch
from torch import Tensor, nn

from .module import DynamicAttention


@contextlib.contextmanager
def dense_warmup(model: nn.Module) -> Iterator[nn.Module]:
    """Run every :class:`DynamicAttention` in ``model`` in dense warm-up mode inside the block.

    ``with dense_warmup(model): train(...)`` attends every block (the dense result) and trains the
    gates by distillation over every routable block; each module's own ``warmup`` flag is
    restored on exit (for a warm-up that ends at a step count inside one loop, set
    ``module.warmup`` directly).
    """
    modules = [m for m in model.modules() if isinstance(m, DynamicAttention)]
    before = [m.warmup for m in modules]
    for m in modules:
        m.warmup = True
    try:
        yield model
    finally:
        for m, w in zip(modules, before):
            m.warmup = w


def gate_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The gate parameters of every :class:`DynamicAttention` in ``model`` (what DSA's warm-up trains)."""
    seen, params = set(), []
    for m in model.modules():
        if isinstance(m, DynamicAttention):
            for p in m.gate.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


@contextlib.contextmanager
def gate_warmup(model: nn.Module, dense: bool = True) -> Iterator[List[nn.Parameter]]:
    """DSA's warm-up of the gates on a converted model: only the gates train, every block attended.

    Inside the block every parameter of ``model`` but the gates' is frozen (``requires_grad``
    off, so no graph is built through the language model) and, with ``dense`` (the default),
    every :class:`DynamicAttention` runs in :func:`dense_warmup` mode. Yields
    :func:`gate_parameters`; train them on :func:`gate_losses` alone::

        with deepseek_rs.gate_warmup(model) as gates:
            opt = torch.optim.AdamW(gates, lr=1e-3)
            for batch in warmup_batches:
                model(batch)
                loss = deepseek_rs.gate_losses(model)
                opt.zero_grad(); loss.backward(); opt.step()
        # then train the whole model sparse on lm_loss + gate_losses(model)

    On exit the frozen parameters get ``requires_grad`` back and the ``warmup`` flags are
    restored. ``dense=False`` trains the gates alone in sparse mode (a control: the gate then
    learns only over the blocks it already picks).
    """
    gates = gate_parameters(model)
    ids = {id(p) for p in gates}
    frozen = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with dense_warmup(model) if dense else contextlib.nullcontext(model):
            yield gates
    finally:
        for p in frozen:
            p.requires_grad_(True)


def gate_losses(model: nn.Module) -> Tensor:
    """Sum of the ``gate_loss`` of every :class:`DynamicAttention` in ``model`` (0 if none is set).

    Warns (``RuntimeWarning``) when called with grad enabled while a module in training mode has
    no gate loss from its last forward: that forward ran without grad (reentrant gradient
    checkpointing does), so its gate would silently not be trained.
    """
    dars = [m for m in model.modules() if isinstance(m, DynamicAttention)]
    if torch.is_grad_enabled():
        missing = sum(m.training and m.last_selection is not None and m.gate_loss is None for m in dars)
        if missing:
            warnings.warn(
                f"{missing} of {len(dars)} DynamicAttention modules in training mode have no gate loss: "
                "their last forward ran without grad (reentrant gradient checkpointing?), so their gates "
                "are not trained; use use_reentrant=False",
                RuntimeWarning,
                stacklevel=2,
            )
    losses = [m.gate_loss for m in dars if m.gate_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()


__all__ = ["dense_warmup", "gate_losses", "gate_parameters", "gate_warmup"]
