"""Mixture-of-Experts with Progressive Expert Activation.

Data flows one way through these modules:

* :mod:`.ops`: the ``torch.ops.deepseek_rs.*`` custom ops (route, sort by expert, dispatch,
  expert FFN, combine) with their CPU kernels in Rust; :mod:`.ops_cuda` registers the CUDA
  kernels of :mod:`deepseek_rs.cuda` on the same ops;
* :mod:`.routing`: :class:`RoutingConfig`, :func:`route`, :class:`Router` and the auxiliary losses;
* :mod:`.layer`: :class:`SwiGLUExperts`, :class:`SwiGLU` and the :class:`PEAMoE` layer;
* :mod:`.hf_experts`: ``"deepseek_rs"`` in transformers' ``ExpertsInterface`` (registered on
  import), so ``experts_implementation="deepseek_rs"`` runs a model's experts on these ops;
* :mod:`.hf`: :func:`patch`, which swaps the MoE blocks of Hugging Face models for ``PEAMoE``.
"""

from . import hf_experts, ops_cuda  # noqa: F401  (ops_cuda registers the CUDA kernels on the ops)
from .hf import patch
from .layer import PEAMoE, SwiGLU, SwiGLUExperts, set_batch_invariant
from .routing import Router, RouterAuxLosses, RouterOutput, RoutingConfig, aux_losses, route

hf_experts.register()  # experts_implementation="deepseek_rs" (when transformers is installed)

__all__ = [
    "PEAMoE",
    "Router",
    "RouterAuxLosses",
    "RouterOutput",
    "RoutingConfig",
    "SwiGLU",
    "SwiGLUExperts",
    "aux_losses",
    "patch",
    "route",
    "set_batch_invariant",
]
