"""API keys: each belongs to one user, and only its SHA-256 is stored.

    mmpersona keys create --user alice        # prints the key once
    mmpersona keys list
    mmpersona keys revoke KEY_ID

A key reads `mmp-<id>-<secret>`: the id finds the record, the whole key's hash is compared in constant time.
The secret is 32 random bytes, so a fast hash is enough (a password hash guards low-entropy secrets). Keys live
in one JSON file (`MMPERSONA_KEYS`, default `api_keys.json` in the data dir), written atomically with mode 0600;
a running server reads it again when it changes, so a key created or revoked takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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


class KeyStore:
    """The API keys file at `path` (None: `default_keys_path()`)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_keys_path()
        self._lock = threading.Lock()
        self._seen: tuple[float, int] | None = None
        self._records: dict[str, KeyRecord] = {}

    def _load(self) -> dict[str, KeyRecord]:
        """The records, read again only when the file changed (one stat per lookup)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._records = None, {}
            return self._records
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._seen:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                records = [KeyRecord(**r) for r in data["keys"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise MmpersonaError(f"the API keys file {self.path} is not readable ({e}); fix or remove it") from e
            self._records = {r.id: r for r in records}
            self._seen = stamp
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
        from concept_db.types import check_owner

        check_owner(user)
        with self._lock:
            records = dict(self._load())
            key_id = secrets.token_hex(6)
            key = f"{PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
            record = KeyRecord(key_id, user, _digest(key), name, round(time.time(), 3))
            records[key_id] = record
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
        parts = key.split("-", 2) if isinstance(key, str) else []
        if len(parts) != 3 or parts[0] != PREFIX:
            return None
        with self._lock:
            record = self._load().get(parts[1])
        if record is None or not hmac.compare_digest(record.sha256, _digest(key)):
            return None
        return record.user
