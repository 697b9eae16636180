"""Where Niyama caches what it builds or measures per machine (calibrated profiles, compiled kernels,
tokenizers built from GGUF metadata)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$NIYAMA_CACHE_DIR``, default ``~/.cache/niyama``."""
    return Path(os.environ.get("NIYAMA_CACHE_DIR") or Path.home() / ".cache" / "niyama")


def digest(*parts: str) -> str:
    """A short key for a cached build from what it depends on (16 hex digits of their SHA-256)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
