"""`SessionGuard`: every route of Gradio classified (`ROUTES`), and Gradio's sessions, events and uploads kept to
the logged-in user who made them."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from .logins import CLIENT

logger = logging.getLogger("mmpersona.app")

_BODY_LIMIT = 16 * 1024 * 1024  # a request body the guard reads (uploads go to /upload, which it does not read)
PER_USER_IDS = 10_000  # ids of one kind remembered per user: only the user's own activity forgets their oldest
MAX_IDS = 250_000  # ids of one kind remembered in all: past it, a user who holds none is refused, nobody forgotten
UPLOAD_MB_PER_HOUR = 1024  # bytes one user may upload into Gradio's cache in an hour (MMPERSONA_QUOTA_UPLOAD_MB)

# What the guard does with a request, by the route it reaches:
OPEN = "open"  # passed on: Gradio serves it (its own login check where it has one) and it holds no user's data
LOGIN = "login"  # the login form: passed on with the client's address, for the login throttle (`Logins`)
OFF = "off"  # refused (404): the app uses none of it
FILE = "file"  # a file by path: an upload only to the users who uploaded it
UPLOAD = "upload"  # stores files: who uploaded each is recorded
UPLOAD_PROGRESS = "upload_progress"  # an upload's progress: its upload id is the first claimer's
SESSION = "session"  # names a session hash (path or query): the first user to name it holds it
EVENT = "event"  # names an event id (path): only the user who started the event
BODY = "body"  # a JSON body naming a session, input files and maybe an event: each must be the user's


@dataclass(frozen=True)
class Rule:
    """One route of Gradio (its path template as Gradio registers it, and its methods), what the guard does with
    it, and why that is safe with several users."""

    path: str
    methods: tuple[str, ...]
    kind: str
    why: str
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        from starlette.routing import compile_path

        object.__setattr__(self, "regex", compile_path(self.path)[0])


def _rules(paths: Iterable[str], methods: tuple[str, ...], kind: str, why: str) -> list[Rule]:
    return [Rule(p, methods, kind, why) for p in paths]


def _slash(path: str) -> tuple[str, str]:
    return path, path + "/"


_GET, _POST = ("GET",), ("POST",)
_STREAM = "/gradio_api/stream/{session_hash}/{run}/{component_id}"
# Every route of Gradio 6 (6.31) as the app launches it, and why each is safe. A request that reaches no route
# here is refused: a route that a new Gradio adds stays closed until it is classified (the test compares this
# table with the routes of the launched app). `deep_link=` is refused on every route (see /gradio_api/deep_link).
ROUTES: tuple[Rule, ...] = (
    # the page and what it loads
    Rule("/", ("GET", "HEAD"), OPEN, "the page: Gradio's login check; the app's layout and defaults, the same for "
                                     "every user (a deep link, which would carry a session's values, is refused)"),
    *_rules(_slash("/config"), _GET, OPEN, "the app's config: Gradio's login check; the same for every user (a deep "
                                           "link is refused)"),
    *_rules(["/svelte/{path:path}", "/static/{path:path}", "/assets/{path:path}"], _GET, OPEN,
            "Gradio's own frontend files, from its installed package"),
    *_rules(["/favicon.ico", "/theme.css", "/gradio_api/theme.css", "/robots.txt", "/manifest.json", "/pwa_icon",
             "/pwa_icon/{size}"], _GET, OPEN, "constants of the app (icon, theme, robots, web-app manifest)"),
    Rule("/openapi.json", ("GET", "HEAD"), OPEN, "FastAPI's schema of these routes: no data"),
    Rule("/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}", _GET, OPEN,
         "template files of installed components, from their packages"),
    *_rules(_slash("/gradio_api/app_id"), _GET, OPEN, "a constant of the app"),
    *_rules(_slash("/gradio_api/info") + ("/gradio_api/openapi.json",), _GET, OPEN,
            "the API's schema: Gradio's login check; the same for every user"),
    Rule("/gradio_api/startup-events", _GET, OPEN, "runs the app's start-up events, once (they hold no user data)"),
    Rule("/gradio_api/queue/status", _GET, OPEN,
         "the queue's length and expected wait, all users together: Gradio's login check; no one's data"),
    # logging in and out
    *_rules(_slash("/login"), _POST, LOGIN, "throttled per user name and client address (`Logins`)"),
    Rule("/logout", _GET, OPEN, "forgets the caller's own login token (all of the caller's own, with all_session)"),
    *_rules(_slash("/gradio_api/user"), _GET, OPEN, "the caller's own user name, from their own cookie"),
    *_rules(_slash("/gradio_api/token"), _GET, OPEN, "the caller's own login token, from their own cookie"),
    *_rules(_slash("/gradio_api/login_check"), _GET, OPEN, "whether the caller is logged in"),
    # what the app does not use: off
    Rule("/gradio_api/deep_link", _GET, OFF,
         "would copy any session's component values (another user's prompts, images and thumbnails) into a link "
         "that anyone logged in can open with ?deep_link="),
    *_rules(_slash("/gradio_api/runs"), _GET, OFF, "the run-history page"),
    Rule("/gradio_api/run-history/connect", _POST, OFF, "run history in a Hugging Face bucket, with a Hub token"),
    *_rules(["/gradio_api/run-history/buckets", "/gradio_api/run-history/records",
             "/gradio_api/run-history/records/{endpoint}/{record_id}/assets/{asset_id}"], _GET, OFF,
            "run history in a Hugging Face bucket, with a Hub token"),
    Rule("/gradio_api/dev/reload", _GET, OFF, "the reload mode of development"),
    Rule("/gradio_api/proxy={url_path:path}", ("GET", "HEAD"), OFF,
         "proxies Spaces loaded with gr.load: the app loads none"),
    *_rules(["/monitoring", "/monitoring/summary", "/monitoring/{key}"], _GET, OFF,
            "Gradio's analytics of every user's events"),
    Rule("/gradio_api/process_recording", _POST, OFF, "audio recordings: the app takes no audio"),
    *_rules(_slash("/gradio_api/vibe-edit") + _slash("/gradio_api/undo-vibe-edit")
            + _slash("/gradio_api/vibe-starter-queries"), _POST, OFF, "the vibe editor, which rewrites the app's code"),
    *_rules(_slash("/gradio_api/vibe-code"), ("GET", "POST"), OFF, "the vibe editor, which rewrites the app's code"),
    # files
    Rule("/gradio_api/file={path_or_url:path}", ("GET", "HEAD"), FILE,
         "an upload only to the users who uploaded it, and a file in the upload folder whose uploader is unknown "
         "to nobody; other paths by Gradio's allow-list (the app's outputs are inline, never files), URLs by "
         "Gradio's SSRF-safe fetcher"),
    Rule("/gradio_api/file/{path:path}", _GET, FILE, "the old spelling of /gradio_api/file="),
    Rule("/gradio_api/upload", _POST, UPLOAD, "records who uploaded each file it stores (and claims its upload id)"),
    Rule("/gradio_api/upload_progress", _GET, UPLOAD_PROGRESS,
         "an upload's file name and progress, to the user whose upload id it is"),
    *_rules(_slash("/gradio_api/reset"), _POST, OPEN, "a no-op in Gradio 6 (cancelling goes through /cancel)"),
    # sessions and events
    Rule("/gradio_api/queue/data", _GET, SESSION, "a session's results, to the user who holds the session"),
    Rule("/gradio_api/heartbeat/{session_hash}", _GET, SESSION,
         "keeps a session alive (and closes it when dropped), for the user who holds the session"),
    *_rules([f"{_STREAM}/playlist.m3u8", f"{_STREAM}/{{segment_id}}.{{ext}}", f"{_STREAM}/playlist-file"], _GET,
            SESSION, "a session's media stream, to the user who holds the session"),
    *_rules(["/gradio_api/call/{api_name}/{event_id}", "/gradio_api/call/v2/{api_name}/{event_id}"], _GET, EVENT,
            "an event's results, to the user who started the event"),
    Rule("/gradio_api/queue/join", _POST, BODY, "starts an event in the user's own session, on the user's own files"),
    Rule("/gradio_api/cancel", _POST, BODY, "cancels an event of the user's own session"),
    *_rules(_slash("/gradio_api/component_server"), _POST, BODY,
            "a component's server function, on the user's own session's state"),
    *_rules([*_slash("/gradio_api/call/{api_name}"), *_slash("/gradio_api/call/v2/{api_name}")], _POST, BODY,
            "queues an event (Gradio's queue and its concurrency limits) on the user's own files (and session, "
            "when it names one)"),
    *_rules([*_slash("/gradio_api/api/{api_name}"), *_slash("/gradio_api/run/{api_name}")], _POST, OFF,
            "runs an event at once, outside Gradio's queue and its concurrency limits, so one client could run any "
            "number of generations together and stall everyone; the page, gradio_client and the REST API "
            "(call/) queue theirs"),
    *_rules(["/gradio_api/stream/{event_id}", "/gradio_api/stream/{event_id}/close"], _POST, BODY,
            "streams input into (or closes) an event the user started"),
)


def classified_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route in `ROUTES`."""
    return {(method, rule.path) for rule in ROUTES for method in rule.methods}


def app_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path template) of every route of a Starlette/FastAPI app, included routers flattened (a mount as
    `ANY`, a websocket route as `WEBSOCKET`)."""
    out = set()
    for route in app.routes:
        # FastAPI's newer included routers are one route each; older ones were flattened into app.routes already
        inner = list(route.effective_route_contexts()) if hasattr(route, "effective_route_contexts") else [route]
        for r in inner:
            original = getattr(r, "original_route", r)
            if hasattr(original, "routes") and not hasattr(original, "methods"):  # a Mount
                out.add(("ANY", r.path + "/{path:path}"))
                continue
            methods = getattr(original, "methods", None) or ("WEBSOCKET",)
            out.update((method, r.path) for method in methods)
    return out


class UploadBudget:
    """Bytes each user uploaded into Gradio's cache within the last `window` seconds (the cache keeps a file about
    that long), at most `limit` each: Gradio stores what `/upload` receives on disk, and without a bound one user
    could fill it. A request is refused when its Content-Length would go past the budget, and counted as its body
    arrives (a chunked upload past the budget is refused from the next one on: at most one upload over)."""

    def __init__(self, limit: int, window: float):
        self.limit, self.window = limit, window
        self._spent: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def spent(self, user: str) -> int:
        with self._lock:
            return self._expire(user)

    def _expire(self, user: str) -> int:
        entries = self._spent.get(user)
        if not entries:
            return 0
        old = time.monotonic() - self.window
        while entries and entries[0][0] < old:
            entries.popleft()
        if not entries:
            del self._spent[user]
            return 0
        return sum(n for _, n in entries)

    def admits(self, user: str, declared: int) -> bool:
        with self._lock:
            return self._expire(user) + declared <= self.limit

    def add(self, user: str, n: int) -> None:
        if n > 0:
            with self._lock:
                self._spent.setdefault(user, deque()).append((time.monotonic(), n))


def upload_limit() -> int:
    """`UPLOAD_MB_PER_HOUR`, or `MMPERSONA_QUOTA_UPLOAD_MB` (0: no limit) in bytes."""
    text = os.environ.get("MMPERSONA_QUOTA_UPLOAD_MB", "").strip()
    try:
        mb = float(text) if text else UPLOAD_MB_PER_HOUR
    except ValueError:
        raise ValueError(f"MMPERSONA_QUOTA_UPLOAD_MB must be a number (0: no limit), got {text!r}") from None
    return int(mb * 2**20) if mb > 0 else 2**62


class OwnersFull(Exception):
    """The guard remembers as many ids as it may, and this user holds none whose forgetting would make room."""


class _Owners:
    """Who holds each id of one kind (session hash, event id, upload path, upload id).

    Each user's ids are an LRU of their own, at most `per_user`: a user's oldest id is forgotten only by that
    user's own activity, never by another's. In all at most `limit` ids: past that, a user adds one by forgetting
    their own oldest, and a user holding none is refused (`OwnersFull`) rather than served by forgetting another's.
    """

    def __init__(self, per_user: int, limit: int):
        if per_user < 1 or limit < 1:
            raise ValueError(f"per_user and limit must be at least 1, got {per_user} and {limit}")
        self.per_user, self.limit = per_user, limit
        self._holders: dict[str, set[str]] = {}
        self._mine: dict[str, OrderedDict[str, None]] = {}
        self._size = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def _add(self, key: str, user: str) -> None:
        mine = self._mine.get(user)
        if mine is not None and key in mine:
            mine.move_to_end(key)
            return
        if mine and (len(mine) >= self.per_user or self._size >= self.limit):
            self._forget(user, mine.popitem(last=False)[0])
        elif self._size >= self.limit:
            raise OwnersFull(f"{self._size} ids held, the limit")
        self._mine.setdefault(user, OrderedDict())[key] = None
        self._holders.setdefault(key, set()).add(user)
        self._size += 1

    def _forget(self, user: str, key: str) -> None:
        holders = self._holders[key]
        holders.discard(user)
        if not holders:
            del self._holders[key]
        self._size -= 1

    def add(self, key: str, user: str) -> None:
        with self._lock:
            self._add(key, user)

    def admits(self, user: str) -> bool:
        """Whether an id of `user` can be added now (they hold some to forget, or there is room)."""
        with self._lock:
            return bool(self._mine.get(user)) or self._size < self.limit

    def get(self, key: str) -> frozenset[str] | None:
        with self._lock:
            holders = self._holders.get(key)
            return frozenset(holders) if holders is not None else None

    def held_by(self, key: str, user: str) -> bool:
        """Whether `user` holds `key` (used: it becomes their most recent)."""
        with self._lock:
            if user not in self._holders.get(key, ()):
                return False
            self._mine[user].move_to_end(key)
            return True

    def claim(self, key: str, user: str) -> bool:
        """True if `key` is the user's (claiming it when nobody holds it yet), False if another user's."""
        with self._lock:
            holders = self._holders.get(key)
            if holders is not None and user not in holders:
                return False
            self._add(key, user)
            return True


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a socket peer or an X-Forwarded-For hop (`1.2.3.4`, `1.2.3.4:5`, `[::1]:5`), else None."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_proxies(proxies: Iterable[str] | str | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Trusted proxies from addresses or networks (`10.0.0.5`, `10.0.0.0/8`, `::1`), a list or a comma-separated
    string; a wrong one raises ValueError naming it."""
    if isinstance(proxies, str):
        proxies = proxies.split(",")
    out = []
    for p in proxies or ():
        if p.strip():
            try:
                out.append(ipaddress.ip_network(p.strip(), strict=False))
            except ValueError as e:
                raise ValueError(f"a trusted proxy must be an IP address or network, got {p.strip()!r}") from e
    return tuple(out)


class SessionGuard:
    """ASGI middleware in front of every route of Gradio (multi-user mode).

    Each request is matched to its route in `ROUTES` and treated by its kind: a route the table does not hold is
    refused (404), as are the routes the app does not use (deep links among them: a deep link copies a session's
    values into a link) and a `deep_link=` parameter anywhere. Gradio 6 binds a queued event's results to its
    session hash and event id, and serves an upload to anyone logged in who has its URL, whoever made them. This
    guard records who uploaded each file (`/upload`), who opened each session (the first user to name it) and who
    started each event (`/call`, `/queue/join`); and it refuses with 403 another user's session (`/queue/data`,
    `/heartbeat`, `/cancel`, `/stream`, `/component_server`), another user's event (`/call/<fn>/<event id>`, an
    event id in a body), another user's upload by URL (`/file=`) and as an input (a file reference in a request's
    data), and any file in Gradio's upload folder whose uploader it does not know. Its records are bounded per user
    (`_Owners`). The login form gets the client's address (`client_address`) for the login throttle.

    Args:
        trusted_proxies: proxies whose X-Forwarded-For is believed (addresses or networks); from any other peer
            the socket's address is the client's.
        per_user, limit: ids of each kind remembered per user, and in all.
        upload_bytes: bytes one user may upload within Gradio's cache time (default `upload_limit()`).
    """

    def __init__(self, app: Any, *, trusted_proxies: Iterable[str] | str | None = None, per_user: int | None = None,
                 limit: int | None = None, upload_bytes: int | None = None):
        self.app = app
        self.trusted = parse_proxies(trusted_proxies)
        per_user = PER_USER_IDS if per_user is None else per_user
        limit = MAX_IDS if limit is None else limit
        self.sessions, self.events, self.uploads, self.upload_ids = (_Owners(per_user, limit) for _ in range(4))
        from .config import CACHE_SECONDS

        self.upload_budget = UploadBudget(upload_limit() if upload_bytes is None else upload_bytes, CACHE_SECONDS)
        self._checked = False

    # ------------------------------------------------------------------ who is asking

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

    def _trusts(self, address) -> bool:
        return address is not None and any(address in net for net in self.trusted)

    def client_address(self, scope: dict) -> str | None:
        """The client's address: the socket peer's, or, when the peer is a trusted proxy, the last address in
        X-Forwarded-For that is not a trusted proxy itself (each proxy appends the address it was reached from;
        the hops left of the first untrusted one are whatever the client wrote)."""
        peer = (scope.get("client") or (None,))[0]
        address = _ip(peer) if peer else None
        if not self._trusts(address):
            return str(address) if address is not None else peer
        hops = [h for v in (v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for")
                for h in v.split(",") if h.strip()]
        for hop in reversed(hops):
            ip = _ip(hop)
            if not self._trusts(ip):
                return str(ip) if ip is not None else hop.strip()
        return str(address)  # every hop a trusted proxy: the peer stands for the client

    # ------------------------------------------------------------------ the table

    @staticmethod
    def route(method: str, path: str) -> tuple[Rule | None, dict[str, str]]:
        """The rule of the route a request reaches, and the route's path parameters; (None, {}) for none. Where
        several templates match, they must agree on the kind (else none: refused)."""
        found = [(rule, m) for rule in ROUTES if method in rule.methods and (m := rule.regex.match(path))]
        if not found or len({rule.kind for rule, _ in found}) > 1:
            return None, {}
        rule, m = found[0]
        return rule, m.groupdict()

    def _check_routes(self, app: Any) -> None:
        self._checked = True
        try:
            unknown = app_routes(app) - classified_routes()
        except Exception:  # noqa: BLE001 - only a warning is at stake; requests are refused anyway
            logger.warning("could not list the app's routes to check them against the SessionGuard's table")
            return
        for method, path in sorted(unknown):
            logger.warning("Gradio route %s %s is not classified by the SessionGuard: refused", method, path)

    # ------------------------------------------------------------------ the requests

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str) -> None:
        from starlette.responses import JSONResponse

        logger.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), message)
        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            if not self._checked and scope.get("app") is not None:
                self._check_routes(scope["app"])
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # Gradio 6 has no websocket route
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # the path Starlette routes by
            path = path[len(root):] or "/"
        rule, params = self.route(method, path)
        if rule is None:
            return await self._refuse(scope, receive, send, 404, "no such route in this app")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if any(query.get("deep_link", [])):
            return await self._refuse(scope, receive, send, 404, "deep links are off in this app")
        if rule.kind == OFF:
            return await self._refuse(scope, receive, send, 404, f"{rule.path} is off in this app")
        if rule.kind == OPEN:
            return await self.app(scope, receive, send)
        if rule.kind == LOGIN:
            token = CLIENT.set(self.client_address(scope))
            try:
                return await self.app(scope, receive, send)
            finally:
                CLIENT.reset(token)
        user = self._user(scope)
        if user is None:
            return await self._refuse(scope, receive, send, 401, "not logged in")
        try:
            return await self._guarded(rule, params, query, user, scope, receive, send)
        except OwnersFull:
            return await self._refuse(scope, receive, send, 503, "the app is tracking as many sessions, events and "
                                      "uploads as it may: try again later")

    async def _guarded(self, rule: Rule, params: dict, query: dict, user: str, scope, receive, send):
        if rule.kind == FILE:
            if not self._file_allowed(scope, user, params.get("path_or_url", params.get("path", ""))):
                return await self._refuse(scope, receive, send, 403, "not your file")
            return await self.app(scope, receive, send)
        if rule.kind in (UPLOAD, UPLOAD_PROGRESS):
            upload_id = query.get("upload_id", [None])[0]
            if upload_id and not self.upload_ids.claim(upload_id, user):
                return await self._refuse(scope, receive, send, 403, "not your upload")
            if rule.kind == UPLOAD_PROGRESS:
                return await self.app(scope, receive, send)
            if not self.uploads.admits(user):
                raise OwnersFull("uploads")
            length = dict(scope.get("headers") or []).get(b"content-length", b"0")
            declared = int(length) if length.isdigit() else 0
            if not self.upload_budget.admits(user, declared):
                spent, most = self.upload_budget.spent(user), self.upload_budget.limit
                return await self._refuse(scope, receive, send, 413,
                                          f"you uploaded {spent / 2**20:.1f} MB in the last hour, and this would go "
                                          f"past the {most / 2**20:.1f} MB an hour allowed: try again later")
            return await self.app(scope, self._counted(receive, user),
                                  self._recording(send, user, self._record_uploads))
        session = params.get("session_hash") or query.get("session_hash", [None])[0]
        if session is not None and not self.sessions.claim(session, user):
            return await self._refuse(scope, receive, send, 403, "not your session")
        event = params.get("event_id")
        if event is not None and not self.events.held_by(event, user):
            return await self._refuse(scope, receive, send, 403, "not your event")
        if rule.kind != BODY:
            return await self.app(scope, receive, send)
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
            event = data.get("event_id")
            if isinstance(event, str) and event and not self.events.held_by(event, user):
                return await self._refuse(scope, receive, send, 403, "not your event")
        if any(not self._file_allowed(scope, user, f) for f in self._files_in(data)):
            return await self._refuse(scope, receive, send, 403, "an input file is not yours")
        if not self.events.admits(user):
            raise OwnersFull("events")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, self._recording(send, user, self._record_event))

    # ------------------------------------------------------------------ files

    def _upload_dir(self, scope: dict) -> Path | None:
        folder = getattr(scope.get("app"), "uploaded_file_dir", None)
        return Path(folder).resolve() if folder else None

    def _file_allowed(self, scope: dict, user: str, path: str) -> bool:
        """An upload is served to (or taken as input from) only the users who uploaded it; a file in the upload
        folder that nobody is known to have uploaded is served to nobody."""
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

    # ------------------------------------------------------------------ recording what responses say

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
                    except OwnersFull:  # full since admitted: the response goes out, unrecorded (refused later)
                        logger.warning("the SessionGuard is full: a response to %r is not recorded", user)
            await send(message)

        return wrapped

    def _counted(self, receive: Any, user: str) -> Any:
        """`receive`, adding each body chunk's bytes to the user's upload budget as it arrives."""

        async def counting():
            message = await receive()
            if message.get("type") == "http.request":
                self.upload_budget.add(user, len(message.get("body", b"")))
            return message

        return counting

    def _record_uploads(self, paths: Any, user: str) -> None:
        for path in paths if isinstance(paths, list) else []:
            if isinstance(path, str):
                self.uploads.add(str(Path(path).resolve()), user)

    def _record_event(self, response: Any, user: str) -> None:
        if isinstance(response, dict) and isinstance(response.get("event_id"), str):
            self.events.add(response["event_id"], user)
