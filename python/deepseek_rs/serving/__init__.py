"""Serving any torch module under concurrent load.

* :mod:`.batcher`: :class:`DynamicBatcher`, dynamic batching over the Rust scheduler;
* :mod:`.server`: the HTTP server of ``deepseek-rs serve`` (Starlette on uvicorn, optional
  extra ``deepseek-rs[serve]``), built on the batcher.

Their configuration is the ``batching`` section of the article's YAML (:mod:`deepseek_rs.config`).
"""

from .batcher import DynamicBatcher

__all__ = ["DynamicBatcher"]
