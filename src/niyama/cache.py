"""Where Niyama caches what it builds or measures per machine (calibrated profiles, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$NIYAMA_CACHE_DIR``, default ``~/.cache/niyama``."""
    return Path(os.environ.get("NIYAMA_CACHE_DIR") or Path.home() / ".cache" / "niyama")
