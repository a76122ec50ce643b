"""Where wanrt keeps files between runs (a leaf module: it imports nothing of wanrt)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """wanrt's cache directory: ``$WANRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/wanrt`` (``~/.cache/wanrt``)."""
    explicit = os.environ.get("WANRT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wanrt"
