"""Records of the concept database, its errors, and the validation every backend shares."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any


class MmpersonaError(Exception):
    """Base class of every error mmpersona raises on purpose.

    The root of the whole distribution's errors (`mmpersona.errors` re-exports it, and users catch it as
    `mmpersona.MmpersonaError`). It is defined here, in the lowest layer, so that the concept database's errors
    are mmpersona errors while `concept_db` imports nothing from `mmpersona`."""


class ConceptDBError(MmpersonaError):
    """Base class of concept database errors."""


class ConceptNotFound(ConceptDBError, KeyError):
    """No concept with that id or name for this owner."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "concept not found"


class DuplicateConceptError(ConceptDBError):
    """The owner already has a concept with that name or alias."""


class InvalidConceptError(ConceptDBError, ValueError):
    """A name, owner, field or vector that the database refuses."""


class UnknownBackendError(ConceptDBError):
    """A database URL whose scheme no backend handles."""


class QuotaExceeded(ConceptDBError):
    """A write that would take an owner past their quota; nothing of it was stored."""


@dataclass(frozen=True)
class Usage:
    """What an owner stores: concept images (links, each counted with its bytes), profile events, and the bytes of
    both (an image is counted for every owner that stores it, whoever stored it first)."""

    images: int = 0
    events: int = 0
    bytes: int = 0
    memory: int = 0  # memory entries (proposed or accepted)
    conversations: int = 0  # kept chats (`Conversation`)
    turns: int = 0  # their turns (a turn's photo counts in `bytes`)

    def to_dict(self) -> dict[str, int]:
        return {"images": self.images, "events": self.events, "bytes": self.bytes, "memory": self.memory,
                "conversations": self.conversations, "turns": self.turns}


@dataclass(frozen=True)
class Quota:
    """Per-owner limits on what writes may store (None: no limit). The server and the app set one
    (`Quota.from_env`); a store opened by the CLI or the Python API has none unless given one."""

    images: int | None = 2_000
    events: int | None = 10_000
    bytes: int | None = 2**30
    memory: int | None = 5_000
    conversations: int | None = 1_000
    turns: int | None = 20_000

    @classmethod
    def from_env(cls) -> "Quota":
        """The defaults, or `MMPERSONA_QUOTA_IMAGES`, `MMPERSONA_QUOTA_EVENTS`, `MMPERSONA_QUOTA_MB`,
        `MMPERSONA_QUOTA_MEMORY`, `MMPERSONA_QUOTA_CONVERSATIONS`, `MMPERSONA_QUOTA_TURNS` (0: no limit)."""
        import os

        def read(name: str, default: int | None, scale: int = 1) -> int | None:
            text = os.environ.get(name, "").strip()
            if not text:
                return default
            try:
                value = float(text)
            except ValueError:
                raise ConceptDBError(f"{name} must be a number (0: no limit), got {text!r}") from None
            if value < 0:
                raise ConceptDBError(f"{name} must not be negative, got {text!r}")
            return int(value * scale) or None

        d = cls()
        return cls(read("MMPERSONA_QUOTA_IMAGES", d.images), read("MMPERSONA_QUOTA_EVENTS", d.events),
                   read("MMPERSONA_QUOTA_MB", d.bytes, 2**20), read("MMPERSONA_QUOTA_MEMORY", d.memory),
                   read("MMPERSONA_QUOTA_CONVERSATIONS", d.conversations), read("MMPERSONA_QUOTA_TURNS", d.turns))

    def check(self, owner: str, now: Usage, images: int = 0, events: int = 0, size: int = 0,
              memory: int = 0, conversations: int = 0, turns: int = 0) -> None:
        """Raise `QuotaExceeded` if adding `images`, `events`, `size` bytes, `memory` entries, `conversations` and
        `turns` to `now` goes past a limit."""
        mb = lambda n: f"{n / 2**20:.1f} MB"  # noqa: E731
        for what, have, more, limit, shown in (("concept images", now.images, images, self.images, str),
                                               ("profile events", now.events, events, self.events, str),
                                               ("of images", now.bytes, size, self.bytes, mb),
                                               ("memory entries", now.memory, memory, self.memory, str),
                                               ("conversations", now.conversations, conversations,
                                                self.conversations, str),
                                               ("conversation turns", now.turns, turns, self.turns, str)):
            if more and limit is not None and have + more > limit:
                raise QuotaExceeded(f"user {owner!r} stores {shown(have)} {what} of the {shown(limit)} allowed, "
                                    f"and this would add {shown(more)}: delete some to make room")


class ProfileChanged(ConceptDBError):
    """The preference profile was reset or lost entries after a result was computed from it; nothing was stored."""


def content_hash(data: bytes) -> str:
    """The key under which an image's bytes are stored (and embedded) once."""
    return hashlib.sha256(data).hexdigest()


def hash_key(image_hash: str) -> int:
    """A content hash's first 64 bits as a signed integer: the small, fixed-size key that indexes find images by.

    Keys may collide; every lookup also compares the full hash. (A 64-bit key keeps the index that new images
    land in at random places about a fifth of the size of one on the 64-character hash, which is what makes
    bulk inserts into a large database fast; see concept_db/sqlite.py.)"""
    value = int(image_hash[:16], 16)
    return value - (1 << 64) if value >= 1 << 63 else value


_NAME = re.compile(r"^<?([^<>]+)>?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_NAME = 64
_PLAIN = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_NAME)  # no brackets, separators, dots, spaces or controls
MAX_INFO = 20_000
MAX_ALIASES = 32  # per concept: other names for it, not a word list

#: Unicode categories a handle may not hold: controls (C0, C1 and NEL), format characters (bidirectional
#: overrides such as U+202E, zero-width spaces and joiners, soft hyphens), surrogates, private use, unassigned
#: code points, and line and paragraph separators.
_REFUSED_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible format character (bidirectional "
                       "control or zero-width)", "Cs": "a lone surrogate", "Co": "a private-use character",
                       "Cn": "an unassigned code point", "Zl": "a line separator", "Zp": "a paragraph separator"}

#: Lookalikes of Latin letters and digits from other scripts (a small part of Unicode TR39's confusables.txt,
#: covering the Cyrillic, Greek and Armenian letters that render identically to ASCII in common fonts), mapped
#: to the ASCII character they imitate. Applied after NFKC, which already folds full-width and styled forms.
_LOOKALIKES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "B", "е": "e", "ё": "e", "г": "r", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k",
    "м": "M", "н": "H", "о": "o", "р": "p", "с": "c", "т": "T", "у": "y", "х": "x", "ѕ": "s", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "ү": "y", "ɡ": "g", "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H",
    "О": "O", "Р": "P", "С": "C", "Т": "T", "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Ү": "Y", "Ԍ": "G",
    "Ԁ": "D", "Ԛ": "Q", "Ԝ": "W", "Ӏ": "l", "ӏ": "l",
    # Greek
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "ι": "i", "κ": "k", "τ": "t", "υ": "u", "χ": "x", "γ": "y",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "ϲ": "c", "ϳ": "j",
    # Armenian and Latin lookalikes outside ASCII
    "օ": "o", "ս": "u", "ց": "g", "հ": "h", "ո": "n", "ı": "i", "ȷ": "j", "ℓ": "l", "ǀ": "l",
})


def handle_skeleton(handle: str) -> str:
    """What a handle looks like, for the confusable check: NFKC, then lookalike letters of other scripts mapped
    to the ASCII letter they imitate. Two handles of one user may not share a skeleton (`bo` and `bо` with a
    Cyrillic о). ASCII handles are their own skeleton, so distinct ASCII handles never clash."""
    if handle.isascii():
        return handle
    return unicodedata.normalize("NFKC", handle).translate(_LOOKALIKES)


def _refused_character(text: str) -> str | None:
    for ch in text:
        category = unicodedata.category(ch)
        if category in _REFUSED_CATEGORIES:
            return f"{_REFUSED_CATEGORIES[category]} (U+{ord(ch):04X})"
        if category == "Zs" and ch != " ":
            return f"a space other than U+0020 (U+{ord(ch):04X})"
    return None


def normalize_name(name: Any, what: str = "name") -> str:
    """The canonical handle of a concept: `<bo>` and `bo` are the same concept, stored as `bo`.

    Handles are NFC-normalised (a composed and a decomposed "café" are one handle). Refuses empty names, path
    separators, `..`, overlong names, and characters that hide or disguise what a handle says: controls,
    bidirectional and zero-width format characters, line separators, surrogates, unassigned code points and
    spaces other than U+0020.
    """
    if type(name) is str and _PLAIN.fullmatch(name):  # the common case, valid as it stands
        return name
    if not isinstance(name, str):
        raise InvalidConceptError(f"concept {what} must be a string, got {type(name).__name__}")
    if _SURROGATE.search(name):
        raise InvalidConceptError(f"concept {what} {name!r} contains a lone surrogate (not valid Unicode text)")
    text = unicodedata.normalize("NFC", name.strip())
    m = _NAME.match(text)
    bare = m.group(1).strip() if m else ""
    if not bare:
        raise InvalidConceptError(f"concept {what} {name!r} is empty")
    if "/" in bare or "\\" in bare or ".." in bare or bare in {".", "~"}:
        raise InvalidConceptError(f"concept {what} {name!r} must not contain path separators or '..'")
    if _CONTROL.search(bare):
        raise InvalidConceptError(f"concept {what} {name!r} contains control characters")
    if len(bare) > MAX_NAME:
        raise InvalidConceptError(f"concept {what} {name[:20]!r}... is longer than {MAX_NAME} characters")
    refused = _refused_character(bare)
    if refused:
        raise InvalidConceptError(f"concept {what} {name!r} contains {refused}")
    return bare


def check_owner(owner: Any) -> str:
    if not isinstance(owner, str) or not owner.strip():
        raise InvalidConceptError(f"owner must be a non-empty string, got {owner!r}")
    if _CONTROL.search(owner) or _SURROGATE.search(owner) or len(owner) > 256:
        raise InvalidConceptError(f"owner {owner[:40]!r} is not a valid user id")
    return owner


def check_text(value: Any, what: str, limit: int = MAX_INFO) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidConceptError(f"concept {what} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidConceptError(f"concept {what} is {len(value)} characters, over the limit of {limit}")
    if "\x00" in value:  # no backend-dependent behaviour: PostgreSQL text cannot hold NUL at all
        raise InvalidConceptError(f"concept {what} contains a NUL character")
    if _SURROGATE.search(value):  # e.g. "\ud800" in a JSON file: no database can encode it
        raise InvalidConceptError(f"concept {what} contains a lone surrogate (not valid Unicode text)")
    return value


@dataclass(frozen=True)
class Concept:
    """A user's concept. `name` is the bare handle (`bo`), written `<bo>` in prompts."""

    id: str
    owner: str
    name: str
    category: str = ""
    info: str = ""
    aliases: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)
    images: tuple[str, ...] = ()  # content hashes of the reference images, in order
    created: float = 0.0
    updated: float = 0.0
    version: int = 1

    @property
    def handle(self) -> str:
        return f"<{self.name}>"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "owner": self.owner, "name": self.name, "handle": self.handle,
                "category": self.category, "info": self.info, "aliases": list(self.aliases),
                "attributes": dict(self.attributes), "images": list(self.images), "created": self.created,
                "updated": self.updated, "version": self.version}


@dataclass(frozen=True)
class Match:
    """A search hit: the concept, its best cosine score, and which of its images scored it."""

    concept: Concept
    score: float
    image: str

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept.to_dict(), "score": self.score, "image": self.image}


@dataclass(frozen=True)
class StoredTensor:
    """A learned tensor blob (safetensors bytes) attached to a concept, tagged with the model it fits."""

    concept_id: str
    name: str
    model: str
    fingerprint: str
    data: bytes
    created: float


@dataclass
class NewConcept:
    """One concept to add: its fields, reference images (encoded bytes) and per-embedder vectors (one per image)."""

    name: str
    category: str = ""
    info: str = ""
    aliases: tuple[str, ...] | list[str] = ()
    attributes: dict[str, Any] | None = None
    images: list[bytes] | tuple[bytes, ...] = ()
    embeddings: dict[str, Any] | None = None
    # set only when restoring an exported concept as it was (lossless archive round trip)
    id: str | None = None
    created: float | None = None
    updated: float | None = None
    version: int | None = None


@dataclass
class BulkResult:
    """What a bulk write did: ids of the concepts added, and `(name, reason)` for each item it skipped."""

    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"added": len(self.added), "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}


PROFILE_KINDS = ("like", "dislike", "pair", "prompt")

#: What a memory entry is: a lasting fact ("Bo is a Shiba Inu"), or a state that holds from `valid_from` until a
#: newer state of the same concept and topic replaces it ("Bo's bed is on the balcony").
MEMORY_KINDS = ("fact", "state")
#: A proposed entry (extracted from a conversation) is used only once the user accepts it.
MEMORY_STATUSES = ("proposed", "accepted")
MAX_MEMORY_TEXT = 500
MAX_MEMORY_TOPIC = 64

#: The per-user artefacts learned from the preference events (`put_blob` names): the personal reward model, the
#: DPO LoRA, the user embedding and the cache of the events' image vectors. Removing an event removes them, so
#: that nothing keeps what the user took back (`delete_profile_event`); they are trained again on what is left.
PROFILE_ARTEFACTS = ("reward_model", "dpo_lora", "user_embedding", "profile_vectors")


@dataclass(frozen=True)
class MemoryEntry:
    """Something the user told the assistant, about one of their concepts (`concept_id`) or about themselves
    (None).

    `kind` "fact" lasts; "state" holds from `valid_from` until a newer accepted state of the same concept and
    `topic` replaces it (`superseded_by` then names that entry: it is history, never presented as current).
    `status` "proposed" entries are waiting for the user's yes; `source` says where the entry came from (a
    conversation's turn, "user" for one the user wrote)."""

    id: str
    owner: str
    text: str
    concept_id: str | None = None
    kind: str = "fact"
    topic: str = ""
    status: str = "accepted"
    source: str = ""
    valid_from: float = 0.0
    superseded_by: str | None = None
    created: float = 0.0
    updated: float = 0.0

    @property
    def current(self) -> bool:
        """Accepted and not replaced by a newer state."""
        return self.status == "accepted" and self.superseded_by is None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "concept_id": self.concept_id, "kind": self.kind,
                "topic": self.topic, "status": self.status, "source": self.source, "valid_from": self.valid_from,
                "superseded_by": self.superseded_by, "current": self.current, "created": self.created,
                "updated": self.updated}


MAX_TURN_TEXT = 64_000  # a kept turn's question, and its answer
#: the conversation id a client gives to start a kept conversation with its turn (CLI, HTTP API, app)
NEW_CONVERSATION = "new"
MAX_CONVERSATION_TITLE = 200


@dataclass(frozen=True)
class Turn:
    """One question and its answer in a kept conversation. `image`: the content hash of the photo the question
    was about (None: none); the photo is stored once, like every image."""

    position: int
    question: str
    answer: str
    image: str | None = None
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "question": self.question, "answer": self.answer, "image": self.image,
                "created": self.created}


@dataclass(frozen=True)
class Conversation:
    """A chat the user can come back to: its turns are `ConceptStore.turns(owner, id)`."""

    id: str
    owner: str
    title: str = ""
    created: float = 0.0
    updated: float = 0.0
    turns: int = 0  # how many

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "created": self.created, "updated": self.updated,
                "turns": self.turns}


@dataclass(frozen=True)
class ProfileEvent:
    """One piece of a user's text-to-image preference history.

    like / dislike: `image` (content hash) and an optional `comment`; pair: `prompt`, `image` the chosen and
    `other` the rejected image; prompt: a prompt the user generated with.
    """

    id: str
    owner: str
    kind: str
    prompt: str = ""
    image: str | None = None
    other: str | None = None
    comment: str = ""
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "prompt": self.prompt, "image": self.image, "other": self.other,
                "comment": self.comment, "created": self.created}
