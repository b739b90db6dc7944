"""What the benchmarks share: finding the reference data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shared_data() -> Path:
    """``$BAYESAL_SHARED_DATA`` or ``../shared/data`` beside the checkout; exit if missing."""
    env = os.environ.get("BAYESAL_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        sys.exit(f"shared data not found at {path}; set BAYESAL_SHARED_DATA")
    return path
