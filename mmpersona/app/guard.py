"""`SessionGuard`: Gradio's sessions, events and uploads kept to the logged-in user who made them."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

logger = logging.getLogger("mmpersona.app")

API = "/gradio_api"
_BODY_LIMIT = 16 * 1024 * 1024  # a request body the guard reads (uploads go to /upload, which it does not read)
# POST routes whose JSON body names a session and input data (file references among it)
_DATA_ROUTES = ("/queue/join", "/call/", "/run/", "/api/", "/stream/", "/component_server", "/cancel")


class _Owners:
    """A bounded map from an id (session hash, event id, upload path) to the users it belongs to."""

    def __init__(self, limit: int = 200_000):
        self.limit, self._map = limit, OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str, user: str) -> None:
        with self._lock:
            self._map.setdefault(key, set()).add(user)
            self._map.move_to_end(key)
            while len(self._map) > self.limit:
                self._map.popitem(last=False)

    def get(self, key: str) -> set[str] | None:
        with self._lock:
            return self._map.get(key)

    def claim(self, key: str, user: str) -> bool:
        """True if `key` is the user's (claiming it when nobody holds it yet), False if another user's."""
        with self._lock:
            holders = self._map.get(key)
            if holders is None:
                self._map[key] = {user}
                return True
            return user in holders


class SessionGuard:
    """ASGI middleware that ties Gradio's ids to the logged-in user who made them (multi-user mode).

    Gradio 6 binds a queued event's results to its session hash and event id, and serves an upload to anyone
    logged in who has its URL, whoever made them. This guard, in front of Gradio's routes, records who
    uploaded each file (`/upload`), who opened each session (`/queue/join`, `/queue/data`, and every other
    route that names one) and who started each event (`/call`, `/queue/join`); and it refuses with 403 another
    user's session (`/queue/data?session_hash=`, `/heartbeat`, `/cancel`, `/stream`), another user's event
    (`/call/<fn>/<event id>`), another user's upload by URL (`/file=`) and as an input (a file reference in a
    request's data), and any file in Gradio's upload folder whose uploader it does not know."""

    def __init__(self, app: Any):
        self.app = app
        self.sessions, self.events, self.uploads = _Owners(), _Owners(), _Owners()

    @staticmethod
    def _user(scope: dict) -> str | None:
        from http.cookies import CookieError, SimpleCookie

        gradio = scope.get("app")
        raw = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1")
        try:
            cookies = SimpleCookie(raw)
        except CookieError:
            return None
        cookie_id = getattr(gradio, "cookie_id", None)
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            if name in cookies:
                user = getattr(gradio, "tokens", {}).get(cookies[name].value)
                if user:
                    return user
        return None

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str) -> None:
        from starlette.responses import JSONResponse

        logger.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), message)
        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)

    def _upload_dir(self, scope: dict) -> Path | None:
        folder = getattr(scope.get("app"), "uploaded_file_dir", None)
        return Path(folder).resolve() if folder else None

    def _file_allowed(self, scope: dict, user: str, path: str) -> bool:
        """An upload is served to (or taken as input from) only the users who uploaded it; a file in the
        upload folder that nobody is known to have uploaded is served to nobody."""
        try:
            resolved = str(Path(path).resolve())
        except (OSError, ValueError):
            return False
        holders = self.uploads.get(resolved)
        if holders is not None:
            return user in holders
        folder = self._upload_dir(scope)
        return folder is None or not Path(resolved).is_relative_to(folder)

    def _files_in(self, value: Any, depth: int = 0):
        if depth > 64:
            return
        if isinstance(value, dict):
            if isinstance(value.get("path"), str):
                yield value["path"]
            for v in value.values():
                yield from self._files_in(v, depth + 1)
        elif isinstance(value, list):
            for v in value:
                yield from self._files_in(v, depth + 1)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(API):
            return await self.app(scope, receive, send)
        route, method = scope["path"][len(API):], scope["method"]
        guarded = route.startswith(("/file=", "/file/", "/queue/data", "/heartbeat/", "/stream/", "/call/")) or (
            method == "POST" and route.startswith(("/upload", *_DATA_ROUTES)))
        if not guarded or route.startswith("/upload_progress"):
            return await self.app(scope, receive, send)  # Gradio's own login check applies
        user = self._user(scope)
        if user is None:
            return await self._refuse(scope, receive, send, 401, "not logged in")
        if route.startswith(("/file=", "/file/")):
            if not self._file_allowed(scope, user, route[len("/file="):]):
                return await self._refuse(scope, receive, send, 403, "not your file")
            return await self.app(scope, receive, send)
        if route == "/queue/data" or (route.startswith(("/heartbeat/", "/stream/")) and method == "GET"):
            from urllib.parse import parse_qs

            session = (parse_qs(scope.get("query_string", b"").decode()).get("session_hash", [None])[0]
                       if route == "/queue/data" else route.split("/")[2])
            if session is not None and not self.sessions.claim(session, user):
                return await self._refuse(scope, receive, send, 403, "not your session")
            return await self.app(scope, receive, send)
        if method == "GET" and route.startswith("/call/"):
            event = route.rstrip("/").rsplit("/", 1)[-1]
            if user not in (self.events.get(event) or ()):
                return await self._refuse(scope, receive, send, 403, "not your event")
            return await self.app(scope, receive, send)
        if method == "POST" and route.startswith("/upload"):
            return await self.app(scope, receive, self._recording(send, user, self._record_uploads))
        if method == "POST" and route.startswith(_DATA_ROUTES):
            parts, size, more = [], 0, True
            while more:
                message = await receive()
                parts.append(message.get("body", b""))
                size += len(parts[-1])
                more = message.get("more_body", False)
                if size > _BODY_LIMIT:
                    return await self._refuse(scope, receive, send, 413, "request too large")
            body = b"".join(parts)
            try:  # the same parser FastAPI uses for these bodies, so both read the same session and files
                data = json.loads(body) if body else {}
            except (ValueError, RecursionError):
                return await self._refuse(scope, receive, send, 400, "the request body is not JSON")
            if isinstance(data, dict):
                session = data.get("session_hash")
                if isinstance(session, str) and not self.sessions.claim(session, user):
                    return await self._refuse(scope, receive, send, 403, "not your session")
                if route.startswith("/stream/"):
                    event = route.split("/")[2]
                    if user not in (self.events.get(event) or ()):
                        return await self._refuse(scope, receive, send, 403, "not your event")
            if any(not self._file_allowed(scope, user, f) for f in self._files_in(data)):
                return await self._refuse(scope, receive, send, 403, "an input file is not yours")
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, self._recording(send, user, self._record_event))
        return await self.app(scope, receive, send)

    def _recording(self, send, user: str, record):
        """`send`, recording what a small JSON response says (upload paths, an event id) before it goes out."""
        chunks: list[bytes] = []

        async def wrapped(message):
            if message["type"] == "http.response.body":
                if sum(map(len, chunks)) < 1 << 20:
                    chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    try:
                        record(json.loads(b"".join(chunks)), user)
                    except ValueError:
                        pass
            await send(message)

        return wrapped

    def _record_uploads(self, paths: Any, user: str) -> None:
        for path in paths if isinstance(paths, list) else []:
            if isinstance(path, str):
                self.uploads.add(str(Path(path).resolve()), user)

    def _record_event(self, response: Any, user: str) -> None:
        if isinstance(response, dict) and isinstance(response.get("event_id"), str):
            self.events.add(response["event_id"], user)
