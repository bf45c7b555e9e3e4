"""The throwaway PostgreSQL server the tests and `python -m concept_db.local_pg` start."""

import os
import shutil
import stat

import pytest

from concept_db import local_pg


@pytest.mark.pg
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="as another user than root the server runs as that user, who can read its own files")
def test_starts_when_the_binaries_are_in_a_private_directory(tmp_path, monkeypatch):
    """As root the server runs as an unprivileged user, who cannot enter a checkout (and its venv) under a
    directory other users cannot enter (/root, a fresh `mktemp -d`): the binaries are copied out for it."""
    try:
        install = local_pg.binaries().parent
    except local_pg.LocalServerUnavailable as e:
        if os.environ.get("MMPERSONA_REQUIRE_PG") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    private = tmp_path / "private"  # a venv's site-packages inside a directory only root may enter
    private.mkdir(mode=0o700)
    package = install.parent
    for part in (package, package.parent / f"{package.name}.libs"):
        if part.is_dir():
            shutil.copytree(part, private / "site-packages" / part.name, symlinks=True)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    monkeypatch.setattr(local_pg, "binaries",
                        lambda: private / "site-packages" / package.name / install.name / "bin")
    server = local_pg.start()
    try:
        assert not str(server.bindir).startswith(str(private))  # it runs a copy others can execute
        import psycopg

        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT extname FROM pg_extension WHERE extname = 'vector'").fetchone()
    finally:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)
        shutil.rmtree(server.socketdir, ignore_errors=True)
        if not str(server.bindir).startswith(str(private)):
            shutil.rmtree(server.bindir.parents[2], ignore_errors=True)  # this test's own copy
