"""Logins for the app with several users: read from a file, checked in constant time, throttled per user name and
client address."""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections import OrderedDict
from contextvars import ContextVar
from pathlib import Path

logger = logging.getLogger("mmpersona.app")

# The address of the client whose login is being checked: set by the `SessionGuard` around Gradio's login route
# (Gradio hands its login check only the name and the password).
CLIENT: ContextVar[str | None] = ContextVar("mmpersona_login_client", default=None)


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
    """Gradio's login check (`check`), throttled so that a guesser slows only themselves.

    After `max_failures` wrong passwords for one user name from one client address within `window` seconds, that
    name is refused to that address (even with the right password) until the window has passed; after
    `max_client_failures` wrong passwords from one address, whatever the names, that address is refused. Another
    client, the user among them, still logs in. Every wrong password is answered after `delay` seconds (without
    holding the server), so each guess costs the guesser time. Passwords are compared in constant time.

    The address comes from the `SessionGuard` (`CLIENT`), which takes it behind a proxy only from the proxies
    it trusts; called without one, all attempts count as one unknown client.
    """

    def __init__(self, logins: dict[str, str], *, max_failures: int = 5, max_client_failures: int = 20,
                 window: float = 60.0, delay: float = 1.0, remembered: int = 10_000):
        self.logins, self.max_failures, self.window = dict(logins), max_failures, window
        self.max_client_failures, self.delay, self.remembered = max_client_failures, delay, remembered
        self._failures: OrderedDict[tuple[str, str | None], list[float]] = OrderedDict()
        self._client_failures: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, table: OrderedDict, key, now: float) -> list[float]:
        return [t for t in table.get(key, ()) if now - t < self.window]

    def _failed(self, table: OrderedDict, key, recent: list[float], now: float, keep: int) -> None:
        table[key] = [*recent, now][-keep:]
        table.move_to_end(key)
        while len(table) > self.remembered:  # bounded: forget who failed longest ago
            table.popitem(last=False)

    def __call__(self, username: str, password: str, client: str | None = None) -> bool:
        """Whether `password` is `username`'s, and the attempt allowed for `client` now (the failure counted)."""
        now = time.monotonic()
        with self._lock:
            recent = self._recent(self._failures, (username, client), now)
            by_client = self._recent(self._client_failures, client, now) if client is not None else []
            if len(recent) >= self.max_failures or len(by_client) >= self.max_client_failures:
                logger.warning("login for %r from %s refused: %d failed attempts for the name, %d from the address, "
                               "in %.0f s", username, client or "an unknown client", len(recent), len(by_client),
                               self.window)
                return False
            expected = self.logins.get(username)
            ok = expected is not None and hmac.compare_digest(password.encode(), expected.encode())
            if ok:
                self._failures.pop((username, client), None)
            else:
                self._failed(self._failures, (username, client), recent, now, self.max_failures)
                if client is not None:
                    self._failed(self._client_failures, client, by_client, now, self.max_client_failures)
            return ok

    async def check(self, username: str, password: str) -> bool:
        """Gradio's login check (`auth=`): the client's address from the `SessionGuard`; a refusal after `delay`."""
        ok = self(username, password, CLIENT.get())
        if not ok and self.delay > 0:
            await asyncio.sleep(self.delay)
        return ok
