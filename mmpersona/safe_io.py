"""Reading what a user hands us without trusting what it claims: JSON with bounded nesting, zip archives with
bounded members, sizes and compression ratios, checked before anything is decompressed.

Every refusal is an `UnsafeInputError` that says which limit was hit and how to raise it. The limits are
documented in README ("Limits on imported files"); `ArchiveLimits()` holds the defaults.
"""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from .errors import MmpersonaError
from .images import DEFAULT_MAX_BYTES

MiB = 1 << 20
GiB = 1 << 30


class UnsafeInputError(MmpersonaError, ValueError):
    """A file that is malformed or over a limit; nothing was written."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else default


@dataclass(frozen=True)
class ArchiveLimits:
    """What one zip archive (our concept archive, or a zipped RAP database / folder) may hold.

    Args:
        max_members: entries in the archive (read from its end record, before the directory is parsed).
        max_total_bytes: the uncompressed size of every member read or extracted, together.
        max_member_bytes: one image member (the image loader's own limit by default).
        max_json_bytes: a manifest.json or database.json.
        max_vectors_header_bytes: the header of embeddings.safetensors (its vectors are read one by one).
        max_tensor_bytes: one learned-tensor member; max_tensors_bytes: all of them together.
        max_ratio: uncompressed / compressed size of any member over 1 MiB (zip bombs compress thousands of
            times; photos barely compress at all).
        max_json_depth: nesting of JSON arrays and objects.
    """

    max_members: int = _env_int("MMPERSONA_MAX_ARCHIVE_MEMBERS", 100_000)
    max_total_bytes: int = _env_int("MMPERSONA_MAX_ARCHIVE_BYTES", 16 * GiB)
    max_member_bytes: int = DEFAULT_MAX_BYTES
    max_json_bytes: int = _env_int("MMPERSONA_MAX_MANIFEST_BYTES", 64 * MiB)
    max_vectors_header_bytes: int = 16 * MiB
    max_tensor_bytes: int = 64 * MiB
    max_tensors_bytes: int = 256 * MiB
    max_ratio: float = 200.0
    max_json_depth: int = 64


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text (strings skipped), without parsing it."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    depth = deepest = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json(data: bytes | str, what: str, *, max_depth: int = ArchiveLimits.max_json_depth) -> Any:
    """Parse JSON from a user's file: UTF-8 only, nesting bounded, every failure an `UnsafeInputError`."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UnsafeInputError(f"{what} is not UTF-8 text ({e})") from e
    else:
        text = data
    depth = json_depth(text)
    if depth > max_depth:
        raise UnsafeInputError(f"{what} nests arrays or objects {depth} deep, over the limit of {max_depth}")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise UnsafeInputError(f"{what} is not valid JSON ({e})") from e


def read_limited(path: str | Path, limit: int, what: str) -> bytes:
    """A file's bytes, refusing it (before reading) when it is larger than `limit`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UnsafeInputError(f"{what} {str(path)!r} is not a regular file")
        if size > limit:
            raise UnsafeInputError(f"{what} {str(path)!r} is {size} bytes, over the limit of {limit}")
        with path.open("rb") as f:
            return f.read(limit + 1)[:limit]
    except OSError as e:
        raise UnsafeInputError(f"cannot read {what} {str(path)!r} ({e})") from e


def _declared_entries(f: BinaryIO) -> int:
    """The member count from the zip's end-of-central-directory record (zip64 aware), read from the end of the
    file: a crafted directory of millions of entries is refused before any of it is parsed."""
    record = zipfile._EndRecData(f)  # stable since Python 2; returns None when there is no end record
    if record is None:
        raise zipfile.BadZipFile("no end-of-central-directory record")
    return int(record[zipfile._ECD_ENTRIES_TOTAL])


class SafeZip:
    """A zip archive opened under `ArchiveLimits`: members read whole (bounded, once) or streamed, never
    more than they declare (the zip module stops there and checks the CRC), every problem an
    `UnsafeInputError` naming the archive."""

    def __init__(self, path: str | Path, limits: ArchiveLimits | None = None):
        self.path, self.limits = Path(path), limits or ArchiveLimits()
        self._read_total = 0
        try:
            with self.path.open("rb") as f:
                entries = _declared_entries(f)
            if entries > self.limits.max_members:
                raise self.error(f"holds {entries} members, over the limit of {self.limits.max_members}")
            self.zf = zipfile.ZipFile(self.path)
        except UnsafeInputError:
            raise
        except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as e:
            raise UnsafeInputError(f"{str(self.path)!r} is not a readable archive ({e})") from e
        infos = self.zf.infolist()
        if len(infos) > self.limits.max_members:
            self.zf.close()
            raise self.error(f"holds {len(infos)} members, over the limit of {self.limits.max_members}")
        self.members = {info.filename: info for info in infos}

    def error(self, message: str) -> UnsafeInputError:
        return UnsafeInputError(f"{str(self.path)!r}: {message}")

    def close(self) -> None:
        self.zf.close()

    def __enter__(self) -> "SafeZip":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def info(self, name: str) -> zipfile.ZipInfo:
        info = self.members.get(name)
        if info is None:
            raise self.error(f"member {name!r} is missing")
        return info

    def _check_member(self, info: zipfile.ZipInfo, limit: int) -> None:
        """What a member's directory entry alone must satisfy: size, compression ratio, no encryption."""
        if info.file_size > limit:
            raise self.error(f"member {info.filename!r} is {info.file_size} bytes, over the limit of {limit}")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > MiB and ratio > self.limits.max_ratio:
            raise self.error(f"member {info.filename!r} expands {ratio:.0f} times, over the compression-ratio "
                             f"limit of {self.limits.max_ratio:.0f} (a zip bomb?)")
        if info.flag_bits & 0x1:
            raise self.error(f"member {info.filename!r} is encrypted")

    def check(self, info: zipfile.ZipInfo, limit: int) -> None:
        """Refuse a member over `limit`, over the compression ratio, or past the archive's total budget."""
        self._check_member(info, limit)
        if self._read_total + info.file_size > self.limits.max_total_bytes:
            raise self.error(f"members read so far would come to more than {self.limits.max_total_bytes} "
                             "bytes, over the limit (set MMPERSONA_MAX_ARCHIVE_BYTES to raise it)")
        self._read_total += info.file_size

    def read(self, name: str, limit: int | None = None) -> bytes:
        """One member's bytes, after `check`."""
        info = self.info(name)
        self.check(info, self.limits.max_member_bytes if limit is None else limit)
        try:
            with self.zf.open(info) as f:
                return f.read()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError,
                ValueError) as e:
            raise self.error(f"member {name!r} is corrupt ({e})") from e

    def open(self, name: str, limit: int) -> BinaryIO:
        """A member as a stream, after `check` (for members read in parts)."""
        info = self.info(name)
        self.check(info, limit)
        try:
            return self.zf.open(info)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, OSError) as e:
            raise self.error(f"member {name!r} is corrupt ({e})") from e

    def extract_to(self, dest: str | Path, *, json_names: tuple[str, ...] = ("database.json",)) -> Path:
        """Extract every member under `dest` (a fresh temporary folder): no member outside it, no links or
        devices, each member and the whole within the limits (JSON files within `max_json_bytes`), checked
        for every member before the first byte is written."""
        dest = Path(dest).resolve()
        plan = []
        total = 0
        for info in self.members.values():
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise self.error(f"member {name!r} points outside the archive")
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 where the zip records no file type
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise self.error(f"member {name!r} is a link or a special file")
            target = dest.joinpath(*parts).resolve() if parts else dest
            if not target.is_relative_to(dest):
                raise self.error(f"member {name!r} points outside the archive")
            if info.is_dir():
                plan.append((info, target))
                continue
            self._check_member(info, self.limits.max_json_bytes if PurePosixPath(name).name in json_names
                               else self.limits.max_member_bytes)
            total += info.file_size
            plan.append((info, target))
        if total > self.limits.max_total_bytes:
            raise self.error(f"unpacks to {total} bytes, over the limit of {self.limits.max_total_bytes}")
        for info, target in plan:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            self.check(info, info.file_size)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with self.zf.open(info) as src, target.open("wb") as out:
                    while chunk := src.read(MiB):
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
                raise self.error(f"member {info.filename!r} is corrupt ({e})") from e
        return dest
