"""Graph capture (CUDA graphs) and engine export.

``wanrt.graph.cuda_graphs``: :class:`StepGraphs`, a step wrapper that captures one CUDA graph per shape key
(bounded LRU, eager fallback), :class:`CudaGraphCapturer` and :func:`graphs_supported`. The names are
imported lazily, so ``import wanrt.graph`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CudaGraphCapturer", "GraphCapturer", "StepGraphs", "graphs_supported"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".cuda_graphs", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
