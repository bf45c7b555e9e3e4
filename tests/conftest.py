"""Test session set-up: a private cache and data dir, tiny models built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before any mmpersona module reads them; subprocesses inherit them.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="mmpersona-tests-"))
os.environ.setdefault("MMPERSONA_CACHE_DIR", str(_SESSION_DIR / "cache"))
os.environ.setdefault("MMPERSONA_HOME", str(_SESSION_DIR / "home"))
# The suite never downloads: no hub is reachable here, and a test that tried would be a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_cache() -> Path:
    from mmpersona.models import build_tiny

    build_tiny()
    return Path(os.environ["MMPERSONA_CACHE_DIR"])


@pytest.fixture(scope="session")
def tiny_embedder(tiny_cache):
    from mmpersona.models import load_embedder

    return load_embedder(preset="tiny", device="cpu")
