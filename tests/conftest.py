"""Shared pytest fixtures.

Data: ``$OBA_FX_DATA`` if set, else the sibling checkout folder ``../shared/data`` (a test-only
fallback: the library itself never guesses paths).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder holding the CIFAR-10 npz files and ``weights/``; skips the test when absent."""
    env = os.environ.get("OBA_FX_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        how = "$OBA_FX_DATA" if env else "the fallback ../shared/data (set OBA_FX_DATA to override)"
        pytest.skip(f"CIFAR-10 data folder not found at {path} (from {how})")
    return path
