"""The GPU path of deepseek_rs: CUDA kernels compiled at run time through CuPy.

The kernels (``cuda/*.cu`` in the repository, shipped as ``deepseek_rs/cuda/sources``):

* ``gemm.cu``: FP16/BF16 tensor-core GEMM (``mma.sync``, ``ldmatrix``, a 4-stage ``cp.async``
  pipeline), the grouped GEMM that runs every expert's segment of the expert-sorted buffer in
  one launch, the same with the SwiGLU activation fused, and the grouped weight gradient;
* ``router.cu``: softmax top-k, progressive top-p and sigmoid group-limited routing;
* ``permute.cu``: the stable counting sort by expert (histogram, scan, scatter), gather,
  weighted combine and the backward helpers.

The MoE ops of :mod:`deepseek_rs.moe.ops` have these kernels registered as their CUDA
kernels (:mod:`deepseek_rs.moe.ops_cuda`), so ``PEAMoE`` and :func:`deepseek_rs.route` take this
path by themselves when their input is a CUDA tensor; it needs CuPy (``pip install
'deepseek-rs[gpu]'``) and a GPU of compute capability 8.0 or newer. :func:`is_available` and
:func:`unavailable_reason` say whether it can run here. The functions of
:mod:`deepseek_rs.cuda.kernels` are the kernels one by one.
"""

from ._runtime import is_available, kernel_dir, require, unavailable_reason
from .kernels import gemm, grouped_gemm, grouped_swiglu, grouped_wgrad

__all__ = [
    "gemm",
    "grouped_gemm",
    "grouped_swiglu",
    "grouped_wgrad",
    "is_available",
    "kernel_dir",
    "require",
    "unavailable_reason",
]
