"""Shared fixtures: paths to the real LAMOST files in ../shared (skipped when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
REAL_LAMOST = SHARED / "data" / "real" / "lamost"
MANN15_CSV = SHARED / "data" / "real" / "catalogs" / "mann15.stars.csv"


@pytest.fixture(scope="session")
def real_lamost_dir() -> Path:
    """Directory of real LAMOST files (../shared/data/real/lamost), or skip."""
    if not REAL_LAMOST.is_dir():
        pytest.skip(f"real LAMOST files not found at {REAL_LAMOST} (../shared is not beside the checkout)")
    return REAL_LAMOST
