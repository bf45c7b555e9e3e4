"""Where mmpersona keeps its data (databases) and its cache (built tiny models)."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "mmpersona"


def data_dir() -> Path:
    """User data directory; `MMPERSONA_HOME` overrides the platform default."""
    env = os.environ.get("MMPERSONA_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    """User cache directory (tiny models live here); `MMPERSONA_CACHE_DIR` overrides the platform default."""
    env = os.environ.get("MMPERSONA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME))


def default_db_path() -> Path:
    return data_dir() / "concepts.db"
