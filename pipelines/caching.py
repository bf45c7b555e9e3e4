"""Caches that serve one user only: what one user computed is never found by another, so no request's timing
tells a user what another has sent or stored."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class UserCache:
    """Values cached per user: an entry serves only the user it was computed for, so no user's timings tell
    what another user has. Bounded: `per_user` entries a user (their least recently used dropped first) and
    `users` users (the least recently active user's entries dropped first). Thread-safe."""

    def __init__(self, per_user: int = 128, users: int = 64):
        if per_user < 1 or users < 1:
            raise ValueError(f"`per_user` and `users` must be at least 1, got {per_user} and {users}")
        self.per_user, self.max_users = per_user, users
        self._users: OrderedDict[str, OrderedDict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, user: str, key: str) -> Any:
        """The user's entry for `key`, or None."""
        with self._lock:
            entries = self._users.get(user)
            if entries is None or key not in entries:
                return None
            self._users.move_to_end(user)
            entries.move_to_end(key)
            return entries[key]

    def put(self, user: str, key: str, value: Any) -> None:
        with self._lock:
            entries = self._users.setdefault(user, OrderedDict())
            self._users.move_to_end(user)
            entries[key] = value
            entries.move_to_end(key)
            while len(entries) > self.per_user:
                entries.popitem(last=False)
            while len(self._users) > self.max_users:
                self._users.popitem(last=False)

    def users(self) -> list[str]:
        """The users with entries, least recently active first."""
        with self._lock:
            return list(self._users)

    def size(self, user: str) -> int:
        with self._lock:
            return len(self._users.get(user, ()))

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._users.values())
