"""Copy everything from one concept database to another (SQLite -> PostgreSQL, or any pair of backends).

    from concept_db.migrate import migrate
    report = migrate("~/.local/share/mmpersona/concepts.db", "postgresql://...")

Per user: concepts (ids, times and versions kept), reference images, every embedder's vectors, learned tensors,
preference events (ids kept), per-user artefacts and settings. Resumable: what the target already holds is
skipped, so an interrupted run is simply run again; each batch of concepts lands in one transaction. Verified:
afterwards each user's counts and a SHA-256 digest over all of their content must match on both sides, or
`MigrationError` says which user and what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .postgres import redacted
from .types import ConceptDBError, NewConcept

if TYPE_CHECKING:
    from .sql import SQLStore


_MISSING = object()


class MigrationError(ConceptDBError):
    """The target does not hold the same data as the source after copying."""


@dataclass
class OwnerMigration:
    owner: str
    copied: dict[str, int]  # what this run wrote (0 everywhere on a re-run)
    counts: dict[str, int]  # what both databases now hold for this owner
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "copied": self.copied, "counts": self.counts, "digest": self.digest}


@dataclass
class MigrationReport:
    source: str
    target: str
    owners: list[OwnerMigration] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "verified": True,
                "owners": [o.to_dict() for o in self.owners]}


def _vectors_by_concept(store: "SQLStore", owner: str) -> dict[str, dict[str, dict[str, Any]]]:
    """embedder -> concept id -> image hash -> vector."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for embedder in store.embedder_dims():
        ids, hashes, matrix = store.owner_vectors(owner, embedder)
        per = out.setdefault(embedder, {})
        for i, (cid, h) in enumerate(zip(ids, hashes, strict=True)):
            per.setdefault(cid, {})[h] = matrix[i]
    return out


#: What a user's data is made of, as `summarize` counts it (`migrate_owner` copies all but images on their own)
KINDS = ("concepts", "images", "vectors", "tensors", "events", "blobs", "settings", "memory", "conversations",
         "turns")


def summarize(store: "SQLStore", owner: str) -> tuple[dict[str, int], str]:
    """Counts and a digest of everything `owner` has in `store`, independent of backend and of concept ids."""
    digest, counts = hashlib.sha256(), Counter()

    def feed(*parts: Any) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
            digest.update(len(data).to_bytes(8, "little") + data)

    concepts = sorted(store.all_concepts(owner), key=lambda c: c.name)
    name_of = {c.id: c.name for c in concepts}
    for c in concepts:
        feed("concept", c.name, c.category, c.info, list(c.aliases), c.attributes, list(c.images), c.created,
             c.updated, c.version)
        counts["concepts"] += 1
        counts["images"] += len(c.images)
        for tname in store.list_tensors(owner, c.id):
            t = store.get_tensor(owner, c.id, tname)
            feed("tensor", c.name, tname, t.model, t.fingerprint, hashlib.sha256(t.data).hexdigest())
            counts["tensors"] += 1
    for embedder in sorted(store.embedder_dims()):
        ids, hashes, matrix = store.owner_vectors(owner, embedder)
        for i in sorted(range(len(ids)), key=lambda i: (name_of.get(ids[i], ""), hashes[i])):
            feed("vector", embedder, name_of.get(ids[i], ids[i]), hashes[i], matrix[i].astype("<f4").tobytes())
            counts["vectors"] += 1
    for e in sorted(store.profile_events(owner), key=lambda e: e.id):
        feed("event", e.id, e.kind, e.prompt, e.image, e.other, e.comment, e.created)
        counts["events"] += 1
    for name in store.blob_names(owner):
        data, model = store.get_blob(owner, name)
        feed("blob", name, model, hashlib.sha256(data).hexdigest())
        counts["blobs"] += 1
    for key, value in sorted(store.settings(owner).items()):
        feed("setting", key, value)
        counts["settings"] += 1
    for m in sorted(store.memory(owner), key=lambda m: m.id):
        feed("memory", m.id, m.text, name_of.get(m.concept_id) if m.concept_id else None, m.kind, m.topic, m.status,
             m.source, m.valid_from, m.superseded_by, m.created, m.updated)
        counts["memory"] += 1
    for chat in sorted(store.all_conversations(owner), key=lambda c: c.id):
        feed("conversation", chat.id, chat.title, chat.created, chat.updated)
        counts["conversations"] += 1
        for t in store.turns(owner, chat.id):
            feed("turn", chat.id, t.position, t.question, t.answer, t.image, t.created)
            counts["turns"] += 1
    return {k: counts[k] for k in KINDS}, digest.hexdigest()


def migrate_owner(source: "SQLStore", target: "SQLStore", owner: str, *, batch: int = 200,
                  on_progress: Callable[[int], None] | None = None) -> OwnerMigration:
    """Copy one owner's data that the target lacks, then verify the owner's counts and digest."""
    import numpy as np

    copied = Counter()
    concepts = source.all_concepts(owner)
    vectors = _vectors_by_concept(source, owner)
    for start in range(0, len(concepts), batch):
        page = concepts[start : start + batch]
        present = target.get_many(owner, [c.id for c in page])
        named = target.find_many(owner, [c.name for c in page])
        todo = [c for c in page if c.id not in present and c.name not in named]
        items = []
        for c in todo:
            embeddings = {}
            for embedder, per in vectors.items():
                got = per.get(c.id, {})
                if c.images and all(h in got for h in c.images):
                    embeddings[embedder] = np.stack([got[h] for h in c.images])
                # vectors for only some images are filled in below, with any others the target lacks
            items.append(NewConcept(name=c.name, category=c.category, info=c.info, aliases=c.aliases,
                                    attributes=c.attributes, images=[source.image_bytes(owner, h) for h in c.images],
                                    embeddings=embeddings, id=c.id, created=c.created, updated=c.updated,
                                    version=c.version))
        if items:
            target.add_many(owner, items)
            copied["concepts"] += len(items)
        if on_progress:
            on_progress(len(page))
    # vectors, tensors, events, artefacts and settings: each keyed, so a re-run adds only what is missing
    on_target = {c.name: c.id for c in target.all_concepts(owner)}
    source_name = {c.id: c.name for c in concepts}
    for embedder, per in vectors.items():
        have = {(cid, h) for cid, h in zip(*target.owner_vectors(owner, embedder)[:2], strict=True)}
        for cid, got in per.items():
            tid = on_target[source_name[cid]]
            missing = [h for h in got if (tid, h) not in have]
            if missing:
                target.set_embeddings(owner, tid, embedder, missing, np.stack([got[h] for h in missing]))
                copied["vectors"] += len(missing)
    for c in concepts:
        have = set(target.list_tensors(owner, on_target[c.name]))
        for tname in source.list_tensors(owner, c.id):
            if tname not in have:
                t = source.get_tensor(owner, c.id, tname)
                target.put_tensor(owner, on_target[c.name], tname, t.data, model=t.model, fingerprint=t.fingerprint)
                copied["tensors"] += 1
    have_events = {e.id for e in target.profile_events(owner)}
    for e in source.profile_events(owner):
        if e.id not in have_events:
            images = [source.image_bytes(owner, h) for h in (e.image, e.other) if h]
            target.add_profile_event(owner, e.kind, images=images, prompt=e.prompt, comment=e.comment,
                                     event_id=e.id, created=e.created)
            copied["events"] += 1
    for name in source.blob_names(owner):
        data, model = source.get_blob(owner, name)
        if target.get_blob(owner, name) != (data, model):
            target.put_blob(owner, name, data, model=model)
            copied["blobs"] += 1
    for key, value in source.settings(owner).items():
        if target.get_setting(owner, key, _MISSING) != value:
            target.set_setting(owner, key, value)
            copied["settings"] += 1
    have_memory = {m.id for m in target.memory(owner)}
    # oldest first: each state is added after those it replaces, so the target orders them as the source does
    for m in sorted(source.memory(owner), key=lambda m: (m.valid_from, m.created, m.id)):
        if m.id not in have_memory:
            target.add_memory(owner, m.text, concept_id=on_target[source_name[m.concept_id]] if m.concept_id else None,
                              kind=m.kind, topic=m.topic, status=m.status, source=m.source, valid_from=m.valid_from,
                              entry_id=m.id, created=m.created, updated=m.updated)
            copied["memory"] += 1
    have_chats = {c.id: c.turns for c in target.all_conversations(owner)}
    for chat in source.all_conversations(owner):
        if chat.id not in have_chats:
            target.start_conversation(owner, chat.title, conversation_id=chat.id, created=chat.created,
                                      updated=chat.updated)
            copied["conversations"] += 1
        for t in source.turns(owner, chat.id)[have_chats.get(chat.id, 0):]:  # turns only append
            target.add_turn(owner, chat.id, t.question, t.answer, created=t.created,
                            image=source.image_bytes(owner, t.image) if t.image else None)
            copied["turns"] += 1
    counts, digest = summarize(source, owner)
    target_counts, target_digest = summarize(target, owner)
    if (counts, digest) != (target_counts, target_digest):
        differ = {k: (counts[k], target_counts[k]) for k in counts if counts[k] != target_counts[k]}
        raise MigrationError(f"user {owner!r} differs after copying: "
                             + (f"counts (source, target) {differ}" if differ else "same counts, different content"))
    return OwnerMigration(owner, {k: copied[k] for k in KINDS if k != "images"}, counts, digest)



def migrate(source: "str | os.PathLike | SQLStore", target: "str | os.PathLike | SQLStore", *, owners: Sequence[str] | None = None,
            batch: int = 200, progress: bool = False) -> MigrationReport:
    """Copy every owner (or `owners`) from `source` to `target` (URLs/paths or open stores); see the module doc."""
    from . import open_store

    opened = (str, os.PathLike)
    src = open_store(source) if isinstance(source, opened) else source
    dst = open_store(target) if isinstance(target, opened) else target
    try:
        if getattr(src, "url", None) == getattr(dst, "url", object()):
            raise MigrationError("source and target are the same database")
        names = list(owners) if owners is not None else src.owners()
        report = MigrationReport(redacted(str(getattr(src, "url", source))),
                                 redacted(str(getattr(dst, "url", target))))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(src.count(o) for o in names), unit="concept", desc="migrate")
        for owner in names:
            report.owners.append(migrate_owner(src, dst, owner, batch=batch,
                                               on_progress=bar.update if bar is not None else None))
        if bar is not None:
            bar.close()
        return report
    finally:
        if isinstance(source, opened):
            src.close()
        if isinstance(target, opened):
            dst.close()
