"""Logins for the app with several users: read from a file, checked in constant time, throttled."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from pathlib import Path

logger = logging.getLogger("mmpersona.app")


def read_logins(path: str | Path) -> dict[str, str]:
    """Logins from a file of `user:password` lines (blank lines and `#` comments skipped)."""
    logins = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read the login file {str(path)!r} ({e})") from e
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise SystemExit(f"error: {path}:{number}: expected user:password")
        logins[user.strip()] = password
    if not logins:
        raise SystemExit(f"error: the login file {str(path)!r} holds no logins")
    return logins


class Logins:
    """Gradio's login check, with throttling: after `max_failures` wrong passwords for one user name within
    `window` seconds, that name is refused (even with the right password) until the window has passed.
    Passwords are compared in constant time."""

    def __init__(self, logins: dict[str, str], *, max_failures: int = 5, window: float = 60.0):
        self.logins, self.max_failures, self.window = dict(logins), max_failures, window
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(username, []) if now - t < self.window]
            if len(recent) >= self.max_failures:
                self._failures[username] = recent
                logger.warning("login for %r refused: %d failed attempts in %.0f s", username, len(recent),
                               self.window)
                return False
            expected = self.logins.get(username)
            ok = expected is not None and hmac.compare_digest(password.encode(), expected.encode())
            if ok:
                self._failures.pop(username, None)
            else:
                self._failures[username] = [*recent, now][-self.max_failures:]
                if len(self._failures) > 10_000:  # bounded: forget the oldest names
                    self._failures.pop(next(iter(self._failures)))
            return ok
