"""Training pieces of the article.

* :mod:`.gvrt`: :class:`GVRT`, gradient-variance-aware clipping and learning rate;
* :mod:`.uss`: :class:`USSLoss` and :class:`UnifiedSemanticSpace`, the unified semantic space
  loss for multimodal retrieval.
"""

from .gvrt import GVRT, GVRTStats
from .uss import UnifiedSemanticSpace, USSLoss

__all__ = ["GVRT", "GVRTStats", "USSLoss", "UnifiedSemanticSpace"]
