"""Where the project keeps downloaded packages, converted weights and the demo set."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the project cache: ``$SR_CACHE`` or ``~/.cache/speech_redundancy``."""
    root = Path(os.environ.get("SR_CACHE") or Path.home() / ".cache" / "speech_redundancy")  # unset or empty: default
    root.mkdir(parents=True, exist_ok=True)
    return root
