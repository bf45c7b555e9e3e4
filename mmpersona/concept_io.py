"""Import and export of concept databases: RAP's `database.json`, a Yo'LLaVA-style folder, and our archive.

Every import first reads and checks the whole source (structure, paths inside the source folder, image
readability), then embeds in batches with a progress bar and writes in one transaction. Structural problems
(malformed JSON, a path outside the folder, an unreadable archive) raise `ImportFormatError` and write
nothing; a concept that cannot be added (unreadable image, invalid or duplicate name) is skipped and reported
in the `ImportReport`, or raises with `strict=True`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable

from concept_db.types import ConceptDBError, InvalidConceptError, NewConcept, content_hash, normalize_name

from .errors import ImageLoadError
from .images import load_image_bytes
from .safe_io import MiB, ArchiveLimits, SafeZip, UnsafeInputError, parse_json, read_limited

if TYPE_CHECKING:
    from concept_db import ConceptStore

    from .embedder import ClipEmbedder

logger = logging.getLogger(__name__)

FORMATS = ("rap", "folder", "archive")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ARCHIVE_FORMAT = "mmpersona-concepts"
ARCHIVE_VERSION = 1


class ImportFormatError(ConceptDBError, ValueError):
    """An import source that is malformed as a whole; nothing was written."""


@dataclass
class ImportReport:
    """What an import did: concepts added, and `(item, reason)` for everything skipped."""

    format: str
    source: str
    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "source": self.source, "added": self.added,
                "skipped": [{"item": i, "reason": r} for i, r in self.skipped]}


@dataclass
class _Pending:
    """A concept read from a source, before its images are checked and embedded."""

    name: str
    category: str = ""
    info: str = ""
    images: list[Any] = field(default_factory=list)  # paths or bytes
    labels: list[str] = field(default_factory=list)  # how each image is named in messages
    restore: dict[str, Any] = field(default_factory=dict)  # archive: id, timestamps, aliases, vectors...


# ------------------------------------------------------------------------------------------- readers


def _inside(root: Path, candidate: Path, label: str) -> Path:
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ImportFormatError(f"{label}: image path {str(candidate)!r} points outside the database folder {str(root)!r}")
    return resolved


def resolve_relative(root: Path, rel: Any, label: str) -> Path:
    """An image path as RAP-style files write them (relative; starting with the folder's own name, resolved from
    its parent, or else relative to the folder itself), refused when it leaves `root`."""
    if not isinstance(rel, str) or not rel.strip():
        raise ImportFormatError(f"{label}: image path must be a non-empty string, got {rel!r}")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute():
        raise ImportFormatError(f"{label}: image path {rel!r} must be relative to the database folder")
    base = root.parent if p.parts and p.parts[0] == root.name else root
    return _inside(root, base.joinpath(*p.parts), label)


def read_rap(path: str | Path) -> list[_Pending]:
    """RAP's `database.json` (or the folder holding it).

    Image paths are relative, as RAP writes them: starting with the database folder's own name (resolved from its
    parent), or else relative to the folder itself. Paths may not leave the folder.
    """
    path = Path(path)
    file = path / "database.json" if path.is_dir() else path
    if not file.is_file():
        raise ImportFormatError(f"no RAP database.json at {str(path)!r}")
    root = file.parent
    limits = ArchiveLimits()
    try:
        data = parse_json(read_limited(file, limits.max_json_bytes, "RAP database"), repr(str(file)),
                          max_depth=limits.max_json_depth)
    except UnsafeInputError as e:
        raise ImportFormatError(str(e)) from e
    if not isinstance(data, dict) or not isinstance(data.get("concept_dict"), dict):
        raise ImportFormatError(f"{str(file)!r}: expected an object with a 'concept_dict' object")
    path_to_concept = data.get("path_to_concept", {})
    if not isinstance(path_to_concept, dict):
        raise ImportFormatError(f"{str(file)!r}: 'path_to_concept' must be an object")

    def resolve(rel: Any, label: str) -> Path:
        return resolve_relative(root, rel, label)

    pending: dict[str, _Pending] = {}
    for key, entry in data["concept_dict"].items():
        label = f"concept_dict[{key!r}]"
        if not isinstance(entry, dict):
            raise ImportFormatError(f"{str(file)!r}: {label} must be an object")
        images = entry.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list):
            raise ImportFormatError(f"{str(file)!r}: {label}.image must be a path or a list of paths")
        for field_name in ("info", "category", "name"):
            if field_name in entry and not isinstance(entry[field_name], str):
                raise ImportFormatError(f"{str(file)!r}: {label}.{field_name} must be a string")
        item = _Pending(name=str(key), category=entry.get("category", ""), info=entry.get("info", ""))
        for rel in images:
            item.images.append(resolve(rel, f"{file.name} {label}"))
            item.labels.append(str(rel))
        pending[key] = item
    for rel, key in path_to_concept.items():
        if not isinstance(key, str) or key not in pending:
            raise ImportFormatError(f"{str(file)!r}: path_to_concept[{rel!r}] names {key!r}, not in concept_dict")
        resolved = resolve(rel, f"{file.name} path_to_concept[{rel!r}]")
        if resolved not in pending[key].images:
            pending[key].images.append(resolved)
            pending[key].labels.append(str(rel))
    return list(pending.values())


def read_folder(path: str | Path) -> tuple[list[_Pending], list[tuple[str, str]]]:
    """A Yo'LLaVA-style folder: one sub-folder of images per concept, named after the concept."""
    root = Path(path)
    if not root.is_dir():
        raise ImportFormatError(f"{str(root)!r} is not a folder")
    pending, skipped = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        item = _Pending(name=sub.name)
        for f in sorted(sub.iterdir()):
            if f.name.startswith("."):
                continue
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                item.images.append(_inside(root, f, sub.name))
                item.labels.append(f"{sub.name}/{f.name}")
            else:
                skipped.append((f"{sub.name}/{f.name}", "not an image file"))
        pending.append(item)
    for f in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        skipped.append((f.name, "files at the top level belong to no concept"))
    return pending, skipped


#: Memory entries one archived concept may carry (the server's per-user quota is 5,000).
MAX_ARCHIVED_MEMORY = 5_000
_JSON_TYPE = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}


def _typed(entry: dict, key: str, kinds: type | tuple[type, ...], default: Any, where: str) -> Any:
    """A manifest field of the expected JSON type (booleans are not numbers), or its default when absent."""
    value = entry.get(key, default)
    if value is None and default is None:
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ImportFormatError(f"{where}.{key} must be {' or '.join(_JSON_TYPE[k] for k in kinds)}, "
                                f"got {type(value).__name__}")
    return value


def _manifest_entry(entry: Any, where: str) -> dict[str, Any]:
    """One concept of an archive manifest, every field checked for its type."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ImportFormatError(f"{where} must be an object with a 'name' string")
    out = {"name": entry["name"]}
    for key in ("category", "info"):
        out[key] = _typed(entry, key, str, "", where)
    out["id"] = _typed(entry, "id", str, None, where)
    for key in ("created", "updated"):
        out[key] = _finite(entry, key, where)
    out["version"] = _typed(entry, "version", int, None, where)
    if out["version"] is not None and out["version"] < 1:
        raise ImportFormatError(f"{where}.version must be a positive integer")
    out["aliases"] = _typed(entry, "aliases", list, [], where)
    if not all(isinstance(a, str) for a in out["aliases"]):
        raise ImportFormatError(f"{where}.aliases must be a list of strings")
    out["attributes"] = _typed(entry, "attributes", dict, {}, where) or {}
    images = _typed(entry, "images", list, [], where)
    for j, image in enumerate(images):
        _image_ref(image, f"{where}.images[{j}]")
    out["images"] = images
    embeddings = _typed(entry, "embeddings", dict, {}, where)
    for embedder, ref in embeddings.items():
        if not isinstance(ref, dict) or not isinstance(ref.get("key"), str) or not isinstance(ref.get("images"), list) \
                or not all(isinstance(h, str) for h in ref["images"]):
            raise ImportFormatError(f"{where}.embeddings[{embedder!r}] must be an object with a 'key' and "
                                    "an 'images' list of hashes")
    out["embeddings"] = embeddings
    tensors = _typed(entry, "tensors", list, [], where)
    for j, t in enumerate(tensors):
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("name", "model", "fingerprint", "file")) \
                or not t["file"].startswith("tensors/"):
            raise ImportFormatError(f"{where}.tensors[{j}] must be an object with 'name', 'model', 'fingerprint' "
                                    "and a 'tensors/...' file")
    out["tensors"] = tensors
    out["memory"] = _memory_items(entry, where)
    return out


def _memory_items(entry: dict, where: str) -> list[dict[str, Any]]:
    """The memory entries of a manifest object (a concept's, or the user's own at the top level), checked."""
    memory = _typed(entry, "memory", list, [], where)
    if len(memory) > MAX_ARCHIVED_MEMORY:
        raise ImportFormatError(f"{where}.memory has {len(memory)} entries, over the limit of {MAX_ARCHIVED_MEMORY}")
    out = []
    for j, m in enumerate(memory):
        at = f"{where}.memory[{j}]"
        if not isinstance(m, dict):
            raise ImportFormatError(f"{at} must be an object")
        item = {key: _typed(m, key, str, "", at) for key in ("text", "kind", "topic", "source")}
        for key in ("valid_from", "created", "updated"):
            item[key] = _finite(m, key, at)
        out.append(item)
    return out


def _finite(entry: dict, key: str, where: str) -> float | None:
    value = _typed(entry, key, (int, float), None, where)
    if value is not None and not math.isfinite(value):
        raise ImportFormatError(f"{where}.{key} must be a finite number")
    return value


def _image_ref(image: Any, where: str) -> None:
    if not isinstance(image, dict) or not isinstance(image.get("hash"), str) \
            or not isinstance(image.get("file"), str) or not image["file"].startswith("images/"):
        raise ImportFormatError(f"{where} must be an object with a 'hash' and an 'images/...' file")


def _conversation_entries(data: Any, where: str) -> list[dict[str, Any]]:
    """The kept conversations of an archive (conversations.json), every field checked for its type."""
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise ImportFormatError(f"{where} must be an object with a 'conversations' list")
    out = []
    for i, chat in enumerate(data["conversations"]):
        at = f"{where}: conversations[{i}]"
        if not isinstance(chat, dict):
            raise ImportFormatError(f"{at} must be an object")
        item: dict[str, Any] = {"title": _typed(chat, "title", str, "", at), "created": _finite(chat, "created", at),
                                "updated": _finite(chat, "updated", at), "turns": []}
        for j, turn in enumerate(_typed(chat, "turns", list, [], at)):
            tat = f"{at}.turns[{j}]"
            if not isinstance(turn, dict):
                raise ImportFormatError(f"{tat} must be an object")
            image = turn.get("image")
            if image is not None:
                _image_ref(image, f"{tat}.image")
            item["turns"].append({"question": _typed(turn, "question", str, "", tat),
                                  "answer": _typed(turn, "answer", str, "", tat), "image": image,
                                  "created": _finite(turn, "created", tat)})
        out.append(item)
    return out


def _read_vectors(archive: SafeZip, wanted: dict[str, int], dim: int) -> dict[str, Any]:
    """The float32 (rows, dim) arrays named in `wanted` (key -> rows) from embeddings.safetensors, read one by
    one from the stream: the rest of the member is skipped, never held. Entries of another shape or dtype are
    left out (their concepts are embedded afresh)."""
    import numpy as np

    lim = archive.limits
    name = "embeddings.safetensors"
    out: dict[str, Any] = {}
    with archive.open(name, lim.max_total_bytes) as f:
        try:
            size = int.from_bytes(f.read(8), "little")
            if size > lim.max_vectors_header_bytes:
                raise archive.error(f"{name} has a {size}-byte header, over the limit of {lim.max_vectors_header_bytes}")
            header = parse_json(f.read(size), f"{name} header", max_depth=lim.max_json_depth)
            if not isinstance(header, dict):
                raise archive.error(f"{name} has a malformed header")
            spans = []
            for key, rows in wanted.items():
                meta = header.get(key)
                if not isinstance(meta, dict):
                    continue
                offsets, shape = meta.get("data_offsets"), meta.get("shape")
                if meta.get("dtype") != "F32" or shape != [rows, dim] or not isinstance(offsets, list) \
                        or len(offsets) != 2 or not all(type(o) is int for o in offsets) \
                        or offsets[1] - offsets[0] != rows * dim * 4 or offsets[0] < 0:
                    continue
                spans.append((offsets[0], offsets[1], key))
            position = 0
            for begin, end, key in sorted(spans):
                if begin < position:
                    continue  # overlapping entries: not what our exporter writes
                while position < begin:  # skip, a bounded chunk at a time
                    skipped = len(f.read(min(begin - position, MiB)))
                    if not skipped:
                        raise archive.error(f"{name} is shorter than its header says")
                    position += skipped
                data = f.read(end - begin)
                if len(data) != end - begin:
                    raise archive.error(f"{name} is shorter than its header says")
                position = end
                out[key] = np.frombuffer(data, dtype="<f4").reshape(wanted[key], dim)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise archive.error(f"{name} is corrupt ({e})") from e
    return out


def read_archive(path: str | Path, *, embedder: "Callable[[], tuple[str, int]] | None" = None,
                 limits: ArchiveLimits | None = None) -> list[_Pending]:
    """Our archive: a zip of manifest.json, images/<hash>.<ext>, embeddings.safetensors and tensors.

    Checked before reading (see `ArchiveLimits`): member count, sizes, compression ratio, total size, JSON
    nesting; every field of the manifest for its type. Each image member is read once, however many concepts
    name it. Stored vectors are kept only for the embedder in use (`embedder()` gives its name and dimension,
    asked only when the archive holds vectors) and only with that dimension; others are dropped, so an archive
    cannot register an embedder name or dimension, and its concepts are embedded afresh.
    """
    return read_user_archive(path, embedder=embedder, limits=limits)[0]


@dataclass
class UserData:
    """What an archive holds of the user beyond their concepts: the memory entries about them and their kept
    conversations (each turn's photo as bytes, read and checked against its hash)."""

    memory: list[dict[str, Any]] = field(default_factory=list)
    conversations: list[dict[str, Any]] = field(default_factory=list)


def read_user_archive(path: str | Path, *, embedder: "Callable[[], tuple[str, int]] | None" = None,
                      limits: ArchiveLimits | None = None) -> tuple[list[_Pending], UserData]:
    """`read_archive`, and what the archive holds of the user beyond their concepts (`UserData`)."""
    path = Path(path)
    limits = limits or ArchiveLimits()
    try:
        with SafeZip(path, limits) as archive:
            return _read_archive(archive, embedder)
    except UnsafeInputError as e:
        raise ImportFormatError(str(e)) from e


def _read_archive(archive: SafeZip, embedder: "Callable[[], tuple[str, int]] | None"
                  ) -> tuple[list[_Pending], UserData]:
    where = repr(str(archive.path))
    manifest = parse_json(archive.read("manifest.json", archive.limits.max_json_bytes), f"{where}: manifest.json",
                          max_depth=archive.limits.max_json_depth)
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise ImportFormatError(f"{where} is not an mmpersona concept archive")
    if manifest.get("version") != ARCHIVE_VERSION:
        raise ImportFormatError(f"{where}: archive version {manifest.get('version')!r} is not supported")
    concepts = manifest.get("concepts")
    if not isinstance(concepts, list):
        raise ImportFormatError(f"{where}: manifest 'concepts' must be a list")
    entries = [_manifest_entry(entry, f"{where}: concepts[{i}]") for i, entry in enumerate(concepts)]

    # vectors: only those of the embedder in use, at its dimension, one row per listed image
    vectors: dict[str, Any] = {}
    if "embeddings.safetensors" in archive.members and any(e["embeddings"] for e in entries) and embedder:
        name, dim = embedder()
        wanted = {ref["key"]: len(ref["images"]) for e in entries for emb, ref in e["embeddings"].items()
                  if emb == name and ref["images"]}
        if wanted:
            vectors = _read_vectors(archive, wanted, dim)
        for e in entries:
            e["embeddings"] = {emb: ref for emb, ref in e["embeddings"].items() if emb == name}

    images: dict[str, tuple[bytes, str]] = {}  # member -> (bytes, hash): each read and hashed once

    def image_bytes(image: dict[str, str]) -> bytes:
        member = image["file"]
        if member not in images:
            data = archive.read(member)
            images[member] = (data, content_hash(data))
        if images[member][1] != image["hash"]:
            raise ImportFormatError(f"{where}: {member} does not match its hash (corrupt archive)")
        return images[member][0]

    tensors_total = 0
    pending = []
    for e in entries:
        item = _Pending(name=e["name"], category=e["category"], info=e["info"])
        for image in e["images"]:
            item.images.append(image_bytes(image))
            item.labels.append(image["file"])
        tensors = []
        for t in e["tensors"]:
            tensors_total += archive.info(t["file"]).file_size
            if tensors_total > archive.limits.max_tensors_bytes:
                raise ImportFormatError(f"{where}: learned tensors come to more than "
                                        f"{archive.limits.max_tensors_bytes} bytes, over the limit")
            tensors.append({**t, "data": archive.read(t["file"], archive.limits.max_tensor_bytes)})
        item.restore = {
            "id": e["id"], "created": e["created"], "updated": e["updated"], "version": e["version"],
            "aliases": e["aliases"], "attributes": e["attributes"], "tensors": tensors,
            "vectors": {emb: (ref["images"], vectors[ref["key"]]) for emb, ref in e["embeddings"].items()
                        if ref["key"] in vectors},
            "memory": e["memory"],
        }
        pending.append(item)
    user = UserData(memory=_memory_items(manifest, f"{where}: manifest"))
    if "conversations.json" in archive.members:
        chats = _conversation_entries(
            parse_json(archive.read("conversations.json", archive.limits.max_json_bytes),
                       f"{where}: conversations.json", max_depth=archive.limits.max_json_depth),
            f"{where}: conversations.json")
        for chat in chats:
            for turn in chat["turns"]:
                if turn["image"] is not None:
                    turn["image"] = image_bytes(turn["image"])
        user.conversations = chats
    return pending, user


# ------------------------------------------------------------------------------------------- import


def import_concepts(store: "ConceptStore", user: str, path: str | Path, fmt: str, *,
                    get_embedder: "Callable[[], ClipEmbedder]", strict: bool = False, batch_size: int = 32,
                    progress: bool = True) -> ImportReport:
    """Import concepts for `user` from `path` in format `fmt` (one of `FORMATS`) into `store`.

    `get_embedder` returns the embedder; it is called only when an image needs a vector (an archive that
    carries every vector loads no model)."""
    if fmt not in FORMATS:
        raise ImportFormatError(f"unknown import format {fmt!r}; valid: {', '.join(FORMATS)}")
    report = ImportReport(fmt, str(path))
    user_data = UserData()
    if fmt == "rap":
        pending = read_rap(path)
    elif fmt == "folder":
        pending, skipped = read_folder(path)
        report.skipped += skipped
    else:
        pending, user_data = read_user_archive(path, embedder=lambda: (get_embedder().name, get_embedder().dim))

    def skip(item: str, reason: str) -> None:
        if strict:
            raise InvalidConceptError(f"{item}: {reason}")
        report.skipped.append((item, reason))

    # check every name and image before any embedding or write
    ready: list[tuple[_Pending, list[bytes]]] = []
    checked: dict[int, bytes] = {}  # an archive image named by many concepts is one bytes object: check it once
    for item in pending:
        try:
            normalize_name(item.name)
            datas = []
            for img in item.images:
                if isinstance(img, bytes) and id(img) in checked:
                    datas.append(checked[id(img)])
                    continue
                data = load_image_bytes(img)
                if isinstance(img, bytes):
                    checked[id(img)] = data
                datas.append(data)
        except (InvalidConceptError, ImageLoadError) as e:
            skip(item.name, str(e))
            continue
        if not datas and not item.restore:
            skip(item.name, "no images")
            continue
        ready.append((item, datas))

    embeddings = _embed_all(store, get_embedder, user, ready, batch_size, progress, fmt)
    new = []
    for (item, datas), vecs in zip(ready, embeddings, strict=True):
        r = item.restore
        new.append(NewConcept(name=item.name, category=item.category, info=item.info, aliases=r.get("aliases", ()),
                              attributes=r.get("attributes"), images=datas, embeddings=vecs, id=r.get("id"),
                              created=r.get("created"), updated=r.get("updated"), version=r.get("version")))
    by_name = {normalize_name(item.name): item for item, _ in ready}  # names were checked above
    with store.transaction():
        result = store.add_many(user, new, skip_invalid=not strict)
        added = store.get_many(user, result.added)
        for cid in result.added:  # restore learned tensors and memory of archived concepts
            restore = by_name[added[cid].name].restore
            for t in restore.get("tensors", []):
                store.put_tensor(user, cid, t["name"], t["data"], model=t["model"], fingerprint=t["fingerprint"])
            # oldest first, so that each state replaces the ones before it as it did; new ids (an id is global)
            for m in sorted(restore.get("memory", []), key=lambda m: (m["valid_from"] or 0, m["created"] or 0)):
                try:
                    store.add_memory(user, m["text"], concept_id=cid, kind=m["kind"] or "fact", topic=m["topic"],
                                     source=m["source"], valid_from=m["valid_from"], created=m["created"],
                                     updated=m["updated"])
                except InvalidConceptError as e:
                    skip(f"{added[cid].name} memory", str(e))
        _restore_user_data(store, user, user_data, skip)
    report.skipped += result.skipped
    report.added = [added[cid].name for cid in result.added]
    logger.info("imported %d concepts from %s (%d skipped)", len(report.added), path, len(report.skipped))
    return report


def _restore_user_data(store: "ConceptStore", user: str, data: UserData, skip: Callable[[str, str], None]) -> None:
    """The memory about the user and their kept conversations, under new ids (ids are global); a conversation
    that cannot be stored whole (a bad turn, a full quota) is skipped whole."""
    for m in sorted(data.memory, key=lambda m: (m["valid_from"] or 0, m["created"] or 0)):
        try:
            store.add_memory(user, m["text"], kind=m["kind"] or "fact", topic=m["topic"], source=m["source"],
                             valid_from=m["valid_from"], created=m["created"], updated=m["updated"])
        except InvalidConceptError as e:
            skip("memory", str(e))
    for i, chat in enumerate(data.conversations):
        try:
            with store.transaction():  # nested in the import's: a savepoint, undone alone
                kept = store.start_conversation(user, chat["title"], created=chat["created"],
                                                updated=chat["updated"])
                for turn in chat["turns"]:
                    store.add_turn(user, kept.id, turn["question"], turn["answer"], image=turn["image"],
                                   created=turn["created"])
        except ConceptDBError as e:
            skip(f"conversation {i} ({chat['title'][:40]!r})", str(e))


def _embed_all(store: "ConceptStore", get_embedder: "Callable[[], ClipEmbedder]", user: str,
               ready: list[tuple[_Pending, list[bytes]]], batch_size: int, progress: bool,
               fmt: str) -> list[dict[str, Any]]:
    """Per concept, {embedder: vectors}: restored from an archive when complete (trusted for the importing
    user alone: `known_vectors` never hands one user's vectors to another), else embedded in batches."""
    import numpy as np

    out: list[dict[str, Any]] = [{} for _ in ready]
    hashes = [[content_hash(d) for d in datas] for _, datas in ready]
    todo: list[int] = []  # concepts that still need vectors from the current embedder
    for ci, (item, _) in enumerate(ready):
        for embedder, (stored_hashes, matrix) in item.restore.get("vectors", {}).items():
            if isinstance(stored_hashes, list) and sorted(stored_hashes) == sorted(hashes[ci]) and hashes[ci]:
                out[ci][embedder] = np.asarray(matrix)[[stored_hashes.index(h) for h in hashes[ci]]]
        if fmt != "archive" or not out[ci]:
            todo.append(ci)
    if not todo:
        return out
    emb = get_embedder()
    data_of = {h: d for ci in todo for h, d in zip(hashes[ci], ready[ci][1], strict=True)}
    vectors = store.known_vectors(user, emb.name, list(data_of))
    fresh = [h for h in data_of if h not in vectors]  # each distinct image is embedded once
    if fresh:
        computed = emb.embed_images([data_of[h] for h in fresh], batch_size=batch_size, progress=progress)
        vectors.update(zip(fresh, computed, strict=True))
    for ci in todo:
        out[ci][emb.name] = (np.stack([vectors[h] for h in hashes[ci]]) if hashes[ci]
                             else np.empty((0, emb.dim), np.float32))
    return out


# ------------------------------------------------------------------------------------------- export


def _extension(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "png").lower()
    return {"jpeg": "jpg"}.get(fmt, fmt)


def export_concepts(store: "ConceptStore", user: str, path: str | Path, fmt: str = "archive") -> int:
    """Export all of `user`'s concepts in `store` to `path`; returns how many were exported."""
    if fmt not in FORMATS:
        raise ImportFormatError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    concepts = store.all_concepts(user)
    path = Path(path)
    if fmt == "archive":
        _write_archive(store, user, concepts, path)
        return len(concepts)
    root = path
    root.mkdir(parents=True, exist_ok=True)
    concept_dict, path_to_concept = {}, {}
    for c in concepts:
        folder = root / c.name  # names never hold separators or '..' (checked on write)
        folder.mkdir(exist_ok=True)
        rels = []
        for i, h in enumerate(c.images):
            data = store.image_bytes(user, h)
            file = folder / f"{i}.{_extension(data)}"
            file.write_bytes(data)
            rels.append(f"{root.name}/{c.name}/{file.name}")
        if fmt == "rap":
            concept_dict[c.handle] = {"name": c.name, "image": rels, "info": c.info, "category": c.category}
            path_to_concept.update({rel: c.handle for rel in rels})
    if fmt == "rap":
        (root / "database.json").write_text(
            json.dumps({"concept_dict": concept_dict, "path_to_concept": path_to_concept}, indent=2), encoding="utf-8")
    return len(concepts)



def _write_archive(store, user: str, concepts, path: Path) -> None:
    from safetensors.numpy import save as save_safetensors

    entries, arrays, written = [], {}, set()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for c in concepts:
            images = []
            for h in c.images:
                data = store.image_bytes(user, h)
                member = f"images/{h}.{_extension(data)}"
                if member not in written:
                    zf.writestr(member, data, compress_type=zipfile.ZIP_STORED)
                    written.add(member)
                images.append({"hash": h, "file": member})
            embeddings = {}
            for embedder, (hashes, matrix) in store.vectors(user, c.id).items():
                key = f"{c.id}/{embedder}"
                arrays[key] = matrix
                embeddings[embedder] = {"images": hashes, "key": key}
            tensors = []
            for name in store.list_tensors(user, c.id):
                t = store.get_tensor(user, c.id, name)
                member = f"tensors/{c.id}/{len(tensors)}.safetensors"
                zf.writestr(member, t.data)
                tensors.append({"name": name, "model": t.model, "fingerprint": t.fingerprint, "file": member})
            memory = [{"text": m.text, "kind": m.kind, "topic": m.topic, "source": m.source,
                       "valid_from": m.valid_from, "created": m.created, "updated": m.updated}
                      for m in store.memory(user, concept_ids=[c.id], status="accepted")]
            entries.append({"id": c.id, "name": c.name, "category": c.category, "info": c.info,
                            "aliases": list(c.aliases), "attributes": c.attributes, "created": c.created,
                            "updated": c.updated, "version": c.version, "images": images,
                            "embeddings": embeddings, "tensors": tensors, "memory": memory})
        if arrays:
            zf.writestr("embeddings.safetensors", save_safetensors(arrays))
        chats = []
        for chat in store.all_conversations(user):
            turns = []
            for t in store.turns(user, chat.id):
                image = None
                if t.image:
                    data = store.image_bytes(user, t.image)
                    image = {"hash": t.image, "file": f"images/{t.image}.{_extension(data)}"}
                    if image["file"] not in written:
                        zf.writestr(image["file"], data, compress_type=zipfile.ZIP_STORED)
                        written.add(image["file"])
                turns.append({"question": t.question, "answer": t.answer, "image": image, "created": t.created})
            chats.append({"title": chat.title, "created": chat.created, "updated": chat.updated, "turns": turns})
        if chats:
            zf.writestr("conversations.json", json.dumps({"conversations": chats}, separators=(",", ":"),
                                                         ensure_ascii=False).encode("utf-8"))
        about_user = [{"text": m.text, "kind": m.kind, "topic": m.topic, "source": m.source,
                       "valid_from": m.valid_from, "created": m.created, "updated": m.updated}
                      for m in store.memory(user, concept_ids=[None], status="accepted")]
        manifest = json.dumps({"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "concepts": entries,
                               "memory": about_user}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        limit = ArchiveLimits().max_json_bytes
        if len(manifest) > limit:  # still written: the importing side may raise its limit
            logger.warning("%s: the manifest is %d bytes, over the import limit of %d; importing it needs "
                           "MMPERSONA_MAX_MANIFEST_BYTES=%d", path, len(manifest), limit, len(manifest))
        zf.writestr("manifest.json", manifest)
    tmp.replace(path)
