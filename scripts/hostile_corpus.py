"""Hostile input built on the fly: forged and squatting archives, zip bombs, malformed manifests and RAP files.

Each builder writes one file (or folder) under the directory it is given and returns its path. Sizes are
parameters, so that tests build small versions and `scripts/reliability.py hostile` the full ones (a bomb that
declares gigabytes, a 48 MB BMP named by 60 concepts). Nothing here is a fixture of the toolkit: every file is
made with the standard library, as an attacker would.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

ARCHIVE = "mmpersona-concepts"
MiB = 1 << 20


def png(seed: int, size: int = 48) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(120, 255, 3)))
    ImageDraw.Draw(img).ellipse((6, 6, size - 8, size - 8), fill=tuple(int(c) for c in rng.integers(0, 110, 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bmp(width: int, height: int) -> bytes:
    """An uncompressed 24-bit BMP of one colour (compresses thousands of times, decodes to width*height*3)."""
    row = (width * 3 + 3) & ~3
    header = b"BM" + struct.pack("<IHHI", 54 + row * height, 0, 0, 54) + struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, 24, 0, row * height, 2835, 2835, 0, 0)
    return header + bytes([90, 140, 200] * width + [0] * (row - width * 3)) * height


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    header, blobs, offset = {}, [], 0
    for key, arr in arrays.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_archive(path: Path, concepts: list[dict[str, Any]], files: dict[str, bytes], *,
                  compression: int = zipfile.ZIP_STORED, manifest: bytes | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("manifest.json", manifest if manifest is not None else
                    json.dumps({"format": ARCHIVE, "version": 1, "concepts": concepts}))
    return path


def image_entry(data: bytes) -> dict[str, str]:
    return {"hash": _sha(data), "file": f"images/{_sha(data)}.png"}


# ------------------------------------------------------------------------------------------ forged archives


def forged_vector_archive(path: Path, image: bytes, vector: np.ndarray, embedder: str) -> Path:
    """Image X stored with the vector of another image Y (embedding poisoning)."""
    entry = {"name": "forged", "images": [image_entry(image)],
             "embeddings": {embedder: {"images": [_sha(image)], "key": "k0"}}}
    return write_archive(path, [entry], {image_entry(image)["file"]: image,
                                         "embeddings.safetensors": safetensors_bytes({"k0": vector[None, :]})})


def squatting_archive(path: Path, image: bytes, embedder: str, dim: int = 7) -> Path:
    """Registers `embedder` with a dimension of its choosing (embedder squatting)."""
    v = np.ones((1, dim), np.float32) / np.sqrt(dim)
    entry = {"name": "squat", "images": [image_entry(image)],
             "embeddings": {embedder: {"images": [_sha(image)], "key": "k0"}}}
    return write_archive(path, [entry], {image_entry(image)["file"]: image,
                                         "embeddings.safetensors": safetensors_bytes({"k0": v})})


# ------------------------------------------------------------------------------------------ bombs


def _zero_member(zf: zipfile.ZipFile, name: str, size: int) -> None:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=True) as f:
        chunk = bytes(MiB)
        for _ in range(size // MiB):
            f.write(chunk)
        f.write(bytes(size % MiB))


def vector_bomb(path: Path, image: bytes, declared: int) -> Path:
    """embeddings.safetensors of `declared` bytes of zeros, deflated to almost nothing."""
    entry = {"name": "bomb", "images": [image_entry(image)],
             "embeddings": {"tiny:clip": {"images": [_sha(image)], "key": "k0"}}}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(image_entry(image)["file"], image)
        _zero_member(zf, "embeddings.safetensors", declared)
        zf.writestr("manifest.json", json.dumps({"format": ARCHIVE, "version": 1, "concepts": [entry]}))
    return path


def header_bomb(path: Path, image: bytes) -> Path:
    """A safetensors member whose first 8 bytes claim a header of a terabyte."""
    entry = {"name": "bomb", "images": [image_entry(image)],
             "embeddings": {"tiny:clip": {"images": [_sha(image)], "key": "k0"}}}
    return write_archive(path, [entry], {image_entry(image)["file"]: image,
                                         "embeddings.safetensors": struct.pack("<Q", 1 << 40) + b"{}"})


def shared_image_archive(path: Path, image: bytes, concepts: int, *, compression: int = zipfile.ZIP_STORED) -> Path:
    """One image member named by many concepts (each must not read it again)."""
    entries = [{"name": f"c{i}", "images": [image_entry(image)]} for i in range(concepts)]
    return write_archive(path, entries, {image_entry(image)["file"]: image}, compression=compression)


def many_members(path: Path, members: int) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(members):
            zf.writestr(f"images/{i}", b"")
        zf.writestr("manifest.json", json.dumps({"format": ARCHIVE, "version": 1, "concepts": []}))
    return path


def lying_size(path: Path, image: bytes) -> Path:
    """A member whose directory entry says it is small while its data inflates to much more (the zip module
    must stop at the declared size and fail the CRC)."""
    big = bytes(8 * MiB)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(image_entry(image)["file"], big)
        zf.writestr("manifest.json", json.dumps({"format": ARCHIVE, "version": 1,
                                                 "concepts": [{"name": "x", "images": [image_entry(image)]}]}))
    data = bytearray(buf.getvalue())
    # patch the declared uncompressed size (local header offset 22, central directory offset 24) to 100 bytes
    local = data.index(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, 100)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 100)
    path.write_bytes(bytes(data))
    return path


def bad_crc(path: Path, image: bytes) -> Path:
    write_archive(path, [{"name": "x", "images": [image_entry(image)]}], {image_entry(image)["file"]: image})
    data = bytearray(path.read_bytes())
    at = data.index(image[:32]) + len(image) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def unzip_bomb(path: Path, declared: int, name: str = "db/bo/0.png") -> Path:
    """A zipped RAP database or folder holding one member of `declared` zero bytes (the app unpacks these)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("db/database.json", json.dumps({"concept_dict": {}}))
        _zero_member(zf, name, declared)
    return path


# ------------------------------------------------------------------------------------------ malformed files


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def manifest_variants(image: bytes) -> dict[str, Any]:
    """Manifests of the right outline with a field of the wrong type (each must be a clean error)."""
    good = {"name": "x", "images": [image_entry(image)]}
    return {
        "images-as-string": {**good, "images": "images/a.png"},
        "image-entry-not-object": {**good, "images": ["images/a.png"]},
        "embeddings-as-list": {**good, "embeddings": ["k0"]},
        "tensor-without-model": {**good, "tensors": [{"name": "t", "fingerprint": "f", "file": "tensors/0"}]},
        "created-yesterday": {**good, "created": "yesterday"},
        "version-true": {**good, "version": True},
        "aliases-number": {**good, "aliases": 5},
        "attributes-list": {**good, "attributes": [1]},
        "name-number": {**good, "name": 5},
        "info-object": {**good, "info": {"a": 1}},
    }


def malformed_archives(root: Path, image: bytes) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {image_entry(image)["file"]: image}
    out = {f"manifest-{k}": write_archive(root / f"{k}.zip", [v], files)
           for k, v in manifest_variants(image).items()}
    out["manifest-nested"] = write_archive(root / "nested.zip", [], files, manifest=nested(200_000))
    out["manifest-not-utf8"] = write_archive(root / "latin1.zip", [], files,
                                             manifest=json.dumps({"format": ARCHIVE, "version": 1, "concepts": [
                                                 {"name": "caf\u00e9", "images": []}]}, ensure_ascii=False).encode("latin-1"))
    out["manifest-lone-surrogate"] = write_archive(
        root / "surrogate.zip", [], files,
        manifest=b'{"format": "mmpersona-concepts", "version": 1, "concepts": [{"name": "x", "info": "\\ud800", '
                 b'"images": [' + json.dumps(image_entry(image)).encode() + b']}]}')
    out["bad-crc"] = bad_crc(root / "crc.zip", image)
    out["lying-size"] = lying_size(root / "lying.zip", image)
    out["header-bomb"] = header_bomb(root / "header.zip", image)
    out["not-a-zip"] = root / "junk.zip"
    out["not-a-zip"].write_bytes(b"PK\x03\x04 this is not a zip")
    return out


def rap_folder(root: Path, database: bytes | dict, image: bytes | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if image is not None:
        (root / "bo").mkdir(exist_ok=True)
        (root / "bo" / "0.png").write_bytes(image)
    (root / "database.json").write_bytes(database if isinstance(database, bytes) else json.dumps(database).encode())
    return root


def malformed_raps(root: Path, image: bytes) -> dict[str, Path]:
    cases: dict[str, Callable[[str], bytes | dict]] = {
        "rap-path-to-concept-list": lambda name: {"concept_dict": {"<bo>": {"image": [f"{name}/bo/0.png"]}},
                                                  "path_to_concept": [f"{name}/bo/0.png"]},
        "rap-path-to-concept-value-list": lambda name: {"concept_dict": {"<bo>": {"image": []}},
                                                        "path_to_concept": {f"{name}/bo/0.png": ["<bo>"]}},
        "rap-nested": lambda name: nested(200_000),
        "rap-not-utf8": lambda name: '{"concept_dict": {"<caf\u00e9>": {}}}'.encode("latin-1"),
        "rap-lone-surrogate": lambda name: ('{"concept_dict": {"<bo>": {"info": "\\ud800", "image": ["%s/bo/0.png"]}}}'
                                            % name).encode(),
        "rap-image-number": lambda name: {"concept_dict": {"<bo>": {"image": [5]}}},
        "rap-escape": lambda name: {"concept_dict": {"<bo>": {"image": ["../../etc/passwd"]}}},
    }
    return {key: rap_folder(root / key, build(key), image) for key, build in cases.items()}


LOOKALIKE_NAMES = {
    "rtl-override": "b\u202eo",
    "zero-width-space": "b\u200bo",
    "cyrillic-o": "b\u043e",  # looks like "bo"
    "nfd-cafe": "cafe\u0301",  # the same handle as NFC "café": a duplicate
    "line-separator": "b\u2028o",
    "nel": "b\u0085o",
    "no-break-space": "b\u00a0o",
}
