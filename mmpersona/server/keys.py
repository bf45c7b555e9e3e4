"""API keys: each belongs to one user, and only its SHA-256 is stored.

    mmpersona keys create --user alice        # prints the key once
    mmpersona keys list
    mmpersona keys revoke KEY_ID

A key reads `mmp-<id>-<secret>`: the id finds the record, the whole key's hash is compared in constant time.
The secret is 32 random bytes, so a fast hash is enough (a password hash guards low-entropy secrets). With a
SQLite database, keys live in one JSON file (`MMPERSONA_KEYS`, default `api_keys.json` in the data dir), written
atomically with mode 0600; a running server reads it again when it changes, so a key created or revoked takes
effect at once. With a PostgreSQL database they live in it (`DatabaseKeyStore`), so every replica of the server
behind a load balancer knows every key, from the moment it is created or revoked (`open_keys` chooses).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import MmpersonaError

PREFIX = "mmp"
FORMAT = 1

logger = logging.getLogger(__name__)


class KeysUnavailable(MmpersonaError):
    """The keys cannot be read and no good set was ever read: the server answers 503, naming nothing."""


def default_keys_path() -> Path:
    from ..paths import data_dir

    env = os.environ.get("MMPERSONA_KEYS")
    return Path(env).expanduser() if env else data_dir() / "api_keys.json"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    user: str
    sha256: str
    name: str = ""
    created: float = 0.0

    def public(self) -> dict[str, Any]:
        """What `keys list` shows: never the hash."""
        return {"id": self.id, "user": self.user, "name": self.name, "created": self.created}


def _new_key(user: str, name: str) -> tuple[KeyRecord, str]:
    from concept_db.types import check_owner

    check_owner(user)
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
    return KeyRecord(key_id, user, _digest(key), name, round(time.time(), 3)), key


def _key_id(key: Any) -> str | None:
    parts = key.split("-", 2) if isinstance(key, str) else []
    return parts[1] if len(parts) == 3 and parts[0] == PREFIX else None


def _owner(record: KeyRecord | None, key: str) -> str | None:
    if record is None or not hmac.compare_digest(record.sha256, _digest(key)):
        return None
    return record.user


def is_database_url(db: Any) -> bool:
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def open_keys(db: Any = None, path: str | Path | None = None, *, store: Any = None) -> "KeyStore | DatabaseKeyStore":
    """Where the API keys are: the file `path` when one is named; else, with a PostgreSQL database (`db`, its URL,
    or its open `store`), the database; else the default file."""
    if path is None and is_database_url(db if store is None else getattr(store, "url", None)):
        if store is None:
            from concept_db import open_store

            store = open_store(db)
        return DatabaseKeyStore(store)
    return KeyStore(path)


class DatabaseKeyStore:
    """The API keys in the PostgreSQL concept database (its `api_keys` table), shared by every server replica."""

    blocking = True  # a lookup is a database query (the server makes it off the event loop)

    def __init__(self, store: Any):
        from concept_db.postgres import redacted

        self.store = store
        self.path = redacted(store.url)  # where the keys are, for messages

    @staticmethod
    def _record(row: tuple | None) -> KeyRecord | None:
        return KeyRecord(*row) if row is not None else None

    def create(self, user: str, name: str = "") -> tuple[KeyRecord, str]:
        record, key = _new_key(user, name)
        self.store.put_api_key(record.id, record.user, record.sha256, record.name, record.created)
        return record, key

    def list(self, user: str | None = None) -> list[KeyRecord]:
        return [KeyRecord(*row) for row in self.store.api_keys(user)]

    def revoke(self, key_id: str) -> KeyRecord:
        record = self._record(self.store.delete_api_key(key_id))
        if record is None:
            raise MmpersonaError(f"no API key with id {key_id!r} (see `mmpersona keys list`)")
        return record

    def user_for(self, key: str) -> str | None:
        key_id = _key_id(key)
        return _owner(self._record(self.store.api_key(key_id)), key) if key_id is not None else None


class KeyStore:
    """The API keys file at `path` (None: `default_keys_path()`)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_keys_path()
        self._lock = threading.Lock()
        self._seen: tuple[float, int] | None = None
        self._records: dict[str, KeyRecord] = {}
        self._good = False  # a set of keys was read (or there was no file): what serving falls back on
        self._damaged: tuple[float, int] | None = None  # the damaged file's stamp, logged once

    def _load(self, *, serving: bool = False) -> dict[str, KeyRecord]:
        """The records, read again only when the file changed (one stat per lookup). A damaged file is an error
        naming it for the CLI; a server (`serving`) logs it once and goes on with the last good set, and
        without one raises `KeysUnavailable`, which tells a client nothing about the file."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._records, self._good = None, {}, True
            return self._records
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._seen:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                records = [KeyRecord(**r) for r in data["keys"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                if not serving:
                    raise MmpersonaError(f"the API keys file {self.path} is not readable ({e}); fix or remove "
                                         "it") from e
                if self._damaged != stamp:
                    self._damaged = stamp
                    logger.error("the API keys file %s is not readable (%s): %s until it is fixed", self.path, e,
                                 "serving the last good keys" if self._good else "every request is refused (503)")
                if not self._good:
                    raise KeysUnavailable("the server's API keys are unavailable; try again later") from None
                return self._records
            self._records = {r.id: r for r in records}
            self._seen, self._good, self._damaged = stamp, True, None
        return self._records

    def _save(self, records: dict[str, KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, "keys": [asdict(r) for r in records.values()]}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".api_keys-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._seen = None  # read back on the next lookup

    def create(self, user: str, name: str = "") -> tuple[KeyRecord, str]:
        """A new key for `user`; returns (record, key). The key itself is not kept: show it once."""
        record, key = _new_key(user, name)
        with self._lock:
            records = dict(self._load())
            records[record.id] = record
            self._save(records)
        return record, key

    def list(self, user: str | None = None) -> list[KeyRecord]:
        with self._lock:
            return [r for r in self._load().values() if user is None or r.user == user]

    def revoke(self, key_id: str) -> KeyRecord:
        with self._lock:
            records = dict(self._load())
            if key_id not in records:
                raise MmpersonaError(f"no API key with id {key_id!r} (see `mmpersona keys list`)")
            record = records.pop(key_id)
            self._save(records)
        return record

    def user_for(self, key: str) -> str | None:
        """The user a key belongs to, or None for a malformed, unknown or revoked key."""
        key_id = _key_id(key)
        if key_id is None:
            return None
        with self._lock:
            record = self._load(serving=True).get(key_id)
        return _owner(record, key)
