"""The app with several users against hostile users, round three: deep links and every other Gradio route, login
lock-outs, taste pairs answered twice, and a flood of ids that would evict another user's records."""

import asyncio
import json
import threading
import time

import pytest
from PIL import Image

from servers import free_port

gr = pytest.importorskip("gradio", reason="the app extra is not installed")
httpx = pytest.importorskip("httpx")

PROXY = "127.0.0.5"  # the one trusted reverse proxy of the test server
DELAY = 0.1  # the test server's answer delay after a wrong password


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_cache):
    import gradio_app
    from mmpersona.app.logins import Logins

    demo = gradio_app.build_app("tiny", tmp_path_factory.mktemp("hostile") / "app.db", multi_user=True, device="cpu")
    port = free_port()
    gradio_app.launch(demo, logins=Logins({"alice": "pw-a", "bob": "pw-b"}, delay=DELAY), trusted_proxies=[PROXY],
                      server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", demo
    demo.close()


def http(url: str, source: str = "127.0.0.1") -> httpx.Client:
    """A client whose connections come from `source` (any 127.x address reaches the server on 127.0.0.1)."""
    return httpx.Client(base_url=url, timeout=60, transport=httpx.HTTPTransport(local_address=source))


def login(url: str, user: str, password: str, source: str = "127.0.0.1", **headers) -> httpx.Response:
    with http(url, source) as client:
        return client.post("/login", data={"username": user, "password": password}, headers=headers)


def logged_in(url: str, user: str, password: str) -> httpx.Client:
    client = http(url)
    assert client.post("/login", data={"username": user, "password": password}).status_code == 200
    return client


def fn_index(client: httpx.Client, api_name: str) -> int:
    return next(d["id"] for d in client.get("/config").json()["dependencies"] if d.get("api_name") == api_name)


def run_in_session(client: httpx.Client, api_name: str, data: list, session: str) -> None:
    """An event in a session of the caller's, as the page runs it (queue/join), waited for to completion."""
    joined = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index(client, api_name),
                                                         "session_hash": session})
    assert joined.status_code == 200, joined.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if "process_completed" in line:
                assert '"success":true' in line.replace(" ", ""), line
                return
    pytest.fail("the event never completed")


# ---------------------------------------------------------------------------------------------- 7: routes


def test_deep_links_carry_no_session_to_anyone(server):
    """Bob, holding alice's session hash, asked Gradio for a deep link of her session and opened it: the page
    carried her values. Deep links are off: the route and the parameter are refused, to him and to her."""
    url, _ = server
    alice, bob = logged_in(url, "alice", "pw-a"), logged_in(url, "bob", "pw-b")
    secret = "alice-secret-attribute"
    run_in_session(alice, "save_attributes", [secret, "blue cast"], "alice-deep-link")
    made = bob.get("/gradio_api/deep_link", params={"session_hash": "alice-deep-link"})
    link = made.json() if made.status_code == 200 else "x"
    opened = [bob.get("/", params={"deep_link": link}), bob.get("/config", params={"deep_link": link})]
    for response in (*opened, made):  # the page as bob opens it first: it carried her values
        assert secret not in response.text
        assert response.status_code == 404 and "off" in response.json()["error"]
    assert alice.get("/gradio_api/deep_link", params={"session_hash": "alice-deep-link"}).status_code == 404
    # without a deep link the page and its config are served as before, and hold nobody's values
    for path in ("/", "/config"):
        page = bob.get(path, params={"deep_link": ""})
        assert page.status_code == 200 and secret not in page.text


def test_every_gradio_route_is_classified(server):
    """The guard's table names every route of the launched app, no more and no fewer: a route that a new Gradio
    adds fails this test until it is classified, and meanwhile the guard refuses it."""
    from mmpersona.app.guard import OFF, ROUTES, SessionGuard, app_routes, classified_routes

    url, demo = server
    actual, table = app_routes(demo.server_app), classified_routes()
    assert actual - table == set(), f"Gradio routes the SessionGuard has not classified: {sorted(actual - table)}"
    assert table - actual == set(), f"classified routes Gradio no longer has: {sorted(table - actual)}"
    assert all(rule.why for rule in ROUTES)
    # an unclassified route is refused by the guard, before Gradio sees it; an OFF route likewise
    alice = logged_in(url, "alice", "pw-a")
    assert SessionGuard.route("GET", "/gradio_api/a-new-route") == (None, {})
    refused = alice.get("/gradio_api/a-new-route")
    assert refused.status_code == 404 and refused.json() == {"error": "no such route in this app"}
    for rule in ROUTES:
        if rule.kind == OFF and "{" not in rule.path and "GET" in rule.methods:
            off = alice.get(rule.path)
            assert off.status_code == 404 and off.json()["error"] == f"{rule.path} is off in this app"
    # the routes the page needs still answer
    assert alice.get("/config").status_code == 200 and alice.get("/gradio_api/info").status_code == 200


# ---------------------------------------------------------------------------------------------- 8: logins


def test_a_guesser_locks_out_only_themselves(server):
    """Five wrong passwords for alice from another client used to refuse her own right password for a minute.
    Now the refusal is per name and client address: the guesser is slowed (each wrong answer after a delay,
    then refused), alice logs in from her own address, however often the guessing repeats."""
    url, _ = server
    for _ in range(2):  # the guessing repeats: still nobody but the guesser is refused
        for _ in range(5):
            started = time.monotonic()
            assert login(url, "alice", "guess", source="127.0.0.3").status_code == 400
            assert time.monotonic() - started >= DELAY  # each wrong guess costs the guesser the delay
        assert login(url, "alice", "pw-a", source="127.0.0.2").status_code == 200  # alice, elsewhere
    assert login(url, "alice", "pw-a", source="127.0.0.3").status_code == 400  # the guesser: refused for now


def test_the_client_behind_a_proxy_is_taken_from_trusted_proxies_only(server):
    url, _ = server
    # through the trusted proxy, the client is the last address the proxy did not add itself
    for _ in range(5):
        login(url, "bob", "guess", source=PROXY, **{"X-Forwarded-For": "198.51.100.7, 203.0.113.9"})
    assert login(url, "bob", "pw-b", source=PROXY, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 400
    # the address the guesser wrote on the left is not theirs to spend: its owner behind the proxy logs in
    assert login(url, "bob", "pw-b", source=PROXY, **{"X-Forwarded-For": "198.51.100.7"}).status_code == 200
    # from any other peer X-Forwarded-For is the client's own writing: not believed
    for _ in range(5):
        login(url, "bob", "guess", source="127.0.0.4", **{"X-Forwarded-For": "198.51.100.8"})
    assert login(url, "bob", "pw-b", source=PROXY, **{"X-Forwarded-For": "198.51.100.8"}).status_code == 200
    assert login(url, "bob", "pw-b", source="127.0.0.4").status_code == 400  # the guesser, whatever it writes


def test_logins_count_per_name_and_client():
    from mmpersona.app.logins import Logins

    logins = Logins({"alice": "pw-a", "bob": "pw-b"}, max_failures=3, max_client_failures=5, window=60, delay=0)
    for _ in range(3):
        assert not logins("alice", "guess", "10.0.0.9")
    assert not logins("alice", "pw-a", "10.0.0.9")  # the guesser's address, for that name
    assert logins("alice", "pw-a", "10.0.0.1")  # alice from her own
    assert logins("bob", "pw-b", "10.0.0.9")  # another name from the guesser's address, until...
    for name in ("carol", "dave"):  # ...it guesses more names: 5 failures from one address in all
        assert not logins(name, "guess", "10.0.0.9")
    assert not logins("bob", "pw-b", "10.0.0.9")
    assert logins("bob", "pw-b", "10.0.0.2")
    logins.window = 0  # the window has passed
    assert logins("alice", "pw-a", "10.0.0.9")


def test_client_address_believes_x_forwarded_for_only_from_trusted_proxies():
    from mmpersona.app.guard import SessionGuard, parse_proxies

    guard = SessionGuard(None, trusted_proxies="10.0.0.0/8, ::1")

    def client(peer, *forwarded):
        return guard.client_address({"client": (peer, 5000),
                                     "headers": [(b"x-forwarded-for", f.encode()) for f in forwarded]})

    assert client("203.0.113.1", "198.51.100.1") == "203.0.113.1"  # not a proxy: its writing is ignored
    assert client("10.1.2.3", "198.51.100.1") == "198.51.100.1"
    assert client("10.1.2.3", "6.6.6.6, 198.51.100.1, 10.9.9.9") == "198.51.100.1"  # past the proxies' hops
    assert client("10.1.2.3", "6.6.6.6", "198.51.100.1:4711") == "198.51.100.1"  # two headers, a port
    assert client("::1", "[2001:db8::1]:80") == "2001:db8::1"
    assert client("10.1.2.3") == "10.1.2.3" and client("10.1.2.3", "10.0.0.1") == "10.1.2.3"
    with pytest.raises(ValueError, match="'proxy.example'"):
        parse_proxies("10.0.0.1, proxy.example")


def test_launch_refuses_a_wrong_trusted_proxy_before_starting(monkeypatch, capsys, tmp_path):
    import sys

    import gradio_app

    (tmp_path / "logins.txt").write_text("alice:pw\n")
    monkeypatch.setattr(sys, "argv", ["gradio_app.py", "--auth-file", str(tmp_path / "logins.txt"),
                                      "--trusted-proxies", "10.0.0.1,nonsense"])
    monkeypatch.setattr(gradio_app, "build_app", lambda *a, **k: pytest.fail("started"))
    with pytest.raises(SystemExit) as e:
        gradio_app.main()
    assert e.value.code == 2 and "'nonsense'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 9: pairs


class _Pipe:
    """The text-to-image pipeline's shape, two flat images per call: the pair logic without a model. With a
    `gate`, a call waits for it (at most 10 s, then the gate stays open): the next pair is not ready until the
    test says so."""

    def __init__(self):
        self.calls, self.gate = 0, None

    def __call__(self, prompt, **kwargs):
        if self.gate is not None and not self.gate.wait(10):
            self.gate.set()
        self.calls += 1
        images = [Image.new("RGB", (16, 16), (self.calls % 256, i * 100, 50)) for i in range(kwargs["n"])]
        return type("Result", (), {"images": images})()


def test_a_pair_is_answered_once_however_fast_the_clicks(tmp_path):
    import gradio_app
    from mmpersona.app.state import Refused

    app = gradio_app.App("tiny", tmp_path / "a.db", "cpu")
    app._t2i_pipe = _Pipe()
    pair = app.taste_pair("alice", "", 0, "random")
    start, results = threading.Barrier(10), []

    def click(which):
        start.wait()
        try:
            results.append(app.taste_choose("alice", pair, which, ""))
        except Refused as e:
            results.append(e)

    threads = [threading.Thread(target=click, args=("A" if i % 2 else "B",)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = app.db.store.profile_events("alice", "pair")
    assert len(stored) == 1 and sum(isinstance(r, str) for r in results) == 1
    assert all("answered already" in str(r) for r in results if isinstance(r, Refused))
    with pytest.raises(Refused, match="answered already"):  # a skip of an answered pair too
        app.answer_pair("alice", pair)
    with pytest.raises(Refused):  # the pair is alice's: another user cannot answer it either
        app.taste_choose("bob", app.taste_pair("alice", "", 1, "random"), "A", "")
    assert app.db.store.profile_events("bob", "pair") == []
    app.db.close()


def test_a_second_answer_through_gradio_is_refused_without_a_traceback(server, capfd):
    """Ten clicks on one pair at the same moment, A and B, through Gradio's queue as the page sends them (one
    session, each with the id of the pair the page showed): one choice stored, nine clear refusals, no traceback
    in the server's output. The queue runs them one after another, so each later click finds the next pair in
    the session: it is refused because its user never saw that pair."""
    import json

    url, demo = server
    app = demo.mmpersona_app
    pipe = _Pipe()
    real, app._t2i_pipe = app._t2i_pipe, pipe
    try:
        alice = logged_in(url, "alice", "pw-a")
        run_in_session(alice, "taste_pair", ["", None, "random"], "alice-taste")
        shown = next(iter(app._open_pairs["alice"]))  # the id the page now shows (and sends with each click)
        capfd.readouterr()
        before = len(app.db.store.profile_events("alice", "pair"))
        answers: dict[str, dict] = {}
        for name in ["taste_choose_a", "taste_choose_b"] * 5:
            joined = alice.post("/gradio_api/queue/join", json={
                "data": ["", None, shown, "", None, "random"], "fn_index": fn_index(alice, name), "session_hash": "alice-taste"})
            assert joined.status_code == 200, joined.text
        # Gradio closes a session's stream whenever none of its events is pending: when the clicks are answered
        # faster than they are sent, the rest arrive on a stream opened again (the session keeps its messages)
        deadline = time.monotonic() + 120
        while len(answers) < 10:
            assert time.monotonic() < deadline, answers
            with alice.stream("GET", "/gradio_api/queue/data", params={"session_hash": "alice-taste"}) as stream:
                for line in stream.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    message = json.loads(line.removeprefix("data:"))
                    if message.get("msg") == "process_completed":
                        answers[message["event_id"]] = message
                        if len(answers) == 10:
                            break
        pairs = app.db.store.profile_events("alice", "pair")
        assert len(pairs) == before + 1 and sum(a["success"] for a in answers.values()) == 1, answers
        refused = [a for a in answers.values() if not a["success"]]
        assert len(refused) == 9 and all("answered already" in json.dumps(a["output"]) for a in refused), refused
        assert "Traceback" not in "".join(capfd.readouterr())
    finally:
        app._t2i_pipe = real


def test_events_outside_gradios_queue_are_off(server):
    """/run and /api ran an event at once, outside the queue's concurrency limits: one client could run any
    number of generations together. They are off; the queued REST API (call/) runs the same functions."""
    url, _ = server
    alice = logged_in(url, "alice", "pw-a")
    for route in ("/gradio_api/run/taste_pair", "/gradio_api/api/taste_pair"):
        r = alice.post(route, json={"data": ["", None, "random"], "session_hash": "alice-run"})
        assert r.status_code == 404, (route, r.text)


# ---------------------------------------------------------------------------------------------- 10: floods


class _Gradio:
    """What the guard reads of Gradio's app: its login tokens and its upload folder."""

    cookie_id = "test"

    def __init__(self, folder):
        self.uploaded_file_dir = str(folder)
        self.tokens = {f"token-{u}": u for u in ("alice", "bob", "carol", "dave")}


async def _downstream(scope, receive, send):
    """Gradio's side: an upload answers its stored path (named by a header), an event its id, the rest 200."""
    from starlette.responses import JSONResponse

    headers = dict(scope["headers"])
    if scope["path"].endswith("/upload"):
        while (await receive()).get("more_body"):  # Gradio reads the whole upload (to disk)
            pass
        body = [headers[b"x-path"].decode()]
    elif scope["path"].endswith("/queue/join"):
        body = {"event_id": headers[b"x-event"].decode()}
    else:
        body = {"ok": True}
    await JSONResponse(body)(scope, receive, send)


def test_a_flood_of_ids_evicts_only_the_flooders_own(tmp_path):
    """At ~230 uploads a second one client used to evict everyone's records (200,000 in all) within 15 minutes;
    then alice's own uploads and results were refused to her. Records are now bounded per user: bob's flood
    forgets only bob's oldest, and a user who holds none when the guard is full is refused, clearly."""
    from mmpersona.app.guard import SessionGuard

    folder = tmp_path / "uploads"
    folder.mkdir()
    guard = SessionGuard(_downstream, per_user=50, limit=100)
    gradio = _Gradio(folder)

    async def call(user, method, path, query="", body=b"", **headers):
        scope = {"type": "http", "method": method, "path": path, "root_path": "", "app": gradio,
                 "query_string": query.encode(), "client": ("127.0.0.1", 1),
                 "headers": [(b"cookie", f"access-token-test=token-{user}".encode()),
                             *((k.replace("_", "-").encode(), v.encode()) for k, v in headers.items())]}
        sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await guard(scope, receive, send)
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    async def upload(user, name):
        return await call(user, "POST", "/gradio_api/upload", x_path=str(folder / name))

    async def join(user, session, event):
        body = json.dumps({"data": [], "fn_index": 0, "session_hash": session}).encode()
        return await call(user, "POST", "/gradio_api/queue/join", body=body, x_event=event)

    async def alice_holds_hers():
        return [await call("alice", "GET", f"/gradio_api/file={folder / 'alice.png'}"),
                await call("alice", "GET", "/gradio_api/queue/data", query="session_hash=alice-s"),
                await call("alice", "GET", "/gradio_api/call/chat/alice-event")]

    async def scenario():
        assert await upload("alice", "alice.png") == 200 and await join("alice", "alice-s", "alice-event") == 200
        for i in range(1_000):  # bob floods uploads, sessions and events
            assert await upload("bob", f"bob-{i}.png") == 200
            assert await join("bob", f"bob-s{i}", f"bob-e{i}") == 200
        assert await alice_holds_hers() == [200, 200, 200]
        assert await call("bob", "GET", "/gradio_api/queue/data", query="session_hash=alice-s") == 403
        assert await call("bob", "GET", f"/gradio_api/file={folder / 'alice.png'}") == 403
        # bob's flood forgot bob's own oldest: his first upload is nobody's now, so it is served to nobody
        assert await call("bob", "GET", f"/gradio_api/file={folder / 'bob-0.png'}") == 403
        assert await call("bob", "GET", f"/gradio_api/file={folder / 'bob-999.png'}") == 200
        assert len(guard.uploads) == len(guard.sessions) == len(guard.events) == 51  # alice's 1, bob's 50
        # carol fills the rest: past the limit, she forgets her own; dave, holding nothing, is refused
        for i in range(200):
            assert await upload("carol", f"carol-{i}.png") == 200
        assert len(guard.uploads) == 100
        assert await upload("dave", "dave.png") == 503
        assert await call("carol", "GET", f"/gradio_api/file={folder / 'carol-199.png'}") == 200
        assert await alice_holds_hers() == [200, 200, 200]

    asyncio.run(scenario())


def test_owner_records_refuse_rather_than_evict_another_user():
    from mmpersona.app.guard import OwnersFull, _Owners

    owners = _Owners(per_user=3, limit=4)
    owners.add("a1", "alice")
    for i in range(10):
        owners.add(f"b{i}", "bob")
    assert owners.get("a1") == {"alice"} and owners.get("b0") is None and owners.get("b9") == {"bob"}
    with pytest.raises(OwnersFull):
        owners.add("c1", "carol")
    assert not owners.admits("carol") and owners.admits("alice")
    assert owners.claim("a1", "alice") and not owners.claim("a1", "bob") and not owners.claim("b9", "alice")
    with pytest.raises(ValueError, match="at least 1"):
        _Owners(per_user=0, limit=10)



def test_uploads_into_gradios_cache_are_bounded_per_user(tmp_path, monkeypatch):
    """Gradio stores every upload on disk for an hour, and one user could upload without end (64 MB a file): each
    user may upload at most a budget of bytes an hour, refused with a clear 413 past it, and another user's
    uploads go on."""
    from mmpersona.app.guard import SessionGuard, upload_limit

    folder = tmp_path / "uploads"
    folder.mkdir()
    guard = SessionGuard(_downstream, upload_bytes=1_000)
    gradio = _Gradio(folder)

    async def upload(user, name, size, declared=True):
        headers = [(b"cookie", f"access-token-test=token-{user}".encode()), (b"x-path", str(folder / name).encode())]
        if declared:
            headers.append((b"content-length", str(size).encode()))
        scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload", "root_path": "", "app": gradio,
                 "query_string": b"", "client": ("127.0.0.1", 1), "headers": headers}
        messages = [{"type": "http.request", "body": b"x" * size, "more_body": False}]
        sent = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await guard(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, body.decode()

    async def scenario():
        assert (await upload("bob", "b1", 400))[0] == 200
        assert (await upload("bob", "b2", 400, declared=False))[0] == 200  # chunked: counted as it arrives
        status, text = await upload("bob", "b3", 400)
        assert status == 413 and "an hour" in text
        assert (await upload("bob", "b4", 300, declared=False))[0] == 200  # undeclared: over once it has arrived
        assert guard.upload_budget.spent("bob") == 1_100
        assert (await upload("bob", "b5", 1, declared=False))[0] == 413  # from the next one on, refused
        assert (await upload("alice", "a1", 900))[0] == 200  # her own budget

    asyncio.run(scenario())
    monkeypatch.setenv("MMPERSONA_QUOTA_UPLOAD_MB", "2")
    assert upload_limit() == 2 * 2**20
    monkeypatch.setenv("MMPERSONA_QUOTA_UPLOAD_MB", "0")
    assert upload_limit() > 2**60
