"""The hostile corpus against a real `mmpersona serve` and a real multi-user app (tiny preset) on 127.0.0.1:
`reliability.py hostile --server`.

Users "alice" and "bob" get keys; alice registers two concepts and a profile. Each case is what bob (or a client
with no key, or a bad one) sends; then alice looks at everything she has (greedy and seeded answers, search by
text and photo, her concepts, profile and events, the pixels of a seeded generation), which must be what she saw
before the corpus ran. Per case: the statuses (a 5xx is a failure; a refusal must be a 4xx with OpenAI's error
body, naming no path of the server's), new tracebacks in the server's log, and the cross-user effect. The
server's peak memory is read from the kernel (VmHWM) at the end.

The app (`gradio_app.py --auth-file`, alice and bob logged in) gets its own cases: deep links, routes the app
does not use, someone else's files, guessing alice's password from another address, an upload flood past the
budget. Its cross-user check: alice still logs in from her address and her stored data is as it was.

One JSON line: `cases`, `clean_errors`, `accepted`, `http_500`, `tracebacks`, `cross_user_effects`,
`peak_rss_mb` (the larger of the two processes'), `path_leaks`, `unexpected`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
QUOTA = {"MMPERSONA_QUOTA_IMAGES": "12", "MMPERSONA_QUOTA_EVENTS": "12", "MMPERSONA_QUOTA_MB": "8",
         "MMPERSONA_QUOTA_MEMORY": "6", "MMPERSONA_QUOTA_TURNS": "4"}


def _png(seed: int, size: int = 48) -> bytes:
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import hostile_corpus

    return hostile_corpus.png(seed, size)


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def ask(text: str, image: str | None = None, **extra: Any) -> dict:
    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header declaring `width` x `height` pixels over a tiny compressed body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (width * 3 + 1) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are (smuggling, broken framing) and read what comes back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def launch(argv: list[str], work: Path, extra_env: dict[str, str], log_name: str, probe: str,
           up: Callable[[int], bool], what: str) -> tuple[subprocess.Popen, Path]:
    """Start `argv` (the tiny preset, one OpenMP thread) with its output in `work/log_name`, and wait until `probe`
    answers a status that `up` accepts; exits naming `what` if it dies or takes over 300 s."""
    import httpx

    log = work / log_name
    env = {**os.environ, **extra_env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=work)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the {what} exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            if up(httpx.get(probe, timeout=1).status_code):
                return proc, log
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the {what} did not come up in 300 s")
        time.sleep(0.5)


def start(work: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, log = launch([sys.executable, "-m", "mmpersona", "--preset", "tiny", "--device", "cpu", "--db",
                        str(work / "c.db"), "serve", "--port", str(port), "--keys", str(work / "keys.json")],
                       work, extra_env, "server.log", f"{url}/health", lambda status: status == 200, "server")
    return proc, url, log


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def alice_view(alice, photo: str) -> dict:
    def chat(**extra):
        r = alice.post("/v1/chat/completions", json=ask("Is <cat> here?", photo, **extra))
        body = r.json()
        return r.status_code, body["choices"][0]["message"]["content"], [
            (x["concept"]["id"], round(x["score"], 5)) for x in body["mmpersona"]["retrieved"]]

    def search(**q):
        r = alice.post("/v1/concepts/search", json={"k": 5, **q})
        return r.status_code, [(m["concept"]["id"], round(m["score"], 5)) for m in r.json()["data"]]

    r = alice.post("/v1/images/generations", json={"prompt": "a pet", "n": 1, "steps": 2, "seed": 3, "size": "64x64"})
    return {"greedy": chat(), "seeded": chat(seed=11, temperature=1.3), "text": search(text="a pet"),
            "photo": search(image=photo), "concepts": alice.get("/v1/concepts").json(),
            "profile": alice.get("/v1/profile").json(), "events": alice.get("/v1/profile/events").json(),
            "memory": alice.get("/v1/memory").json(), "conversations": alice.get("/v1/conversations").json(),
            "turns": [alice.get(f"/v1/conversations/{c['id']}").json()
                      for c in alice.get("/v1/conversations").json()["data"]],
            "generated": (r.status_code, hashlib.sha256(r.content).hexdigest() if r.status_code != 200 else
                          hashlib.sha256(base64.b64decode(r.json()["data"][0]["b64_json"])).hexdigest())}


def cases(url: str, work: Path, keys_path: Path, alice_ids: dict[str, str]) -> list[tuple[str, Callable, str]]:
    """(name, send(bob, anon) -> responses, expected: "refused" / "accepted" / "mixed")."""
    img = _png(7)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    big = 2**64
    pngs = [_png(300 + i, 96) for i in range(14)]

    def keys_damaged(bob, anon):
        good = keys_path.read_bytes()
        try:
            keys_path.write_text("{ not json")
            return [bob.get("/v1/concepts"), anon.get("/v1/concepts", headers={"Authorization": "Bearer mmp-x-y"})]
        finally:
            keys_path.write_bytes(good)

    def quota(bob, anon):
        out = [bob.post("/v1/concepts", data={"name": f"q{i}"}, files=[("images", ("p.png", p, "image/png"))])
               for i, p in enumerate(pngs)]
        out += [bob.post("/v1/profile/events", json={"kind": "like", "image": data_url(p)}) for p in pngs]
        return out

    def smuggle(bob, anon):
        body = b'{"text": "a"}'
        request = (b"POST /v1/concepts/search HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/concepts HTTP/1.1\r\nHost: x\r\n\r\n")
        return [_Raw(raw(url, request)), _Raw(raw(url, b"POST /v1/concepts/search HTTP/1.1\r\nHost: x\r\n"
                                                  b"Content-Length: 99999999999999999999\r\n\r\n" + body))]

    mine = alice_ids["cat"]
    entry, chat, photo_hash = alice_ids["memory"], alice_ids["conversation"], alice_ids["turn_image"]

    def memory_flood(bob, anon):  # past the memory quota: his own entries refused, nobody else's touched
        return [bob.post("/v1/memory", json={"text": f"The cat sleeps in room {i}.", "topic": "bed"})
                for i in range(8)]

    def turn_flood(bob, anon):  # past the turns quota: refused before any model work
        return [bob.post("/v1/chat/completions", json=ask(f"turn {i}", data_url(img), conversation="new",
                                                          remember=False)) for i in range(6)]

    extra = [
        ("memory-alice-entry", lambda b, a: [b.get(f"/v1/memory?concept={mine}"),
                                             b.patch(f"/v1/memory/{entry}", json={"status": "accepted"}),
                                             b.patch(f"/v1/memory/{entry}", json={"text": "bob was here"}),
                                             b.delete(f"/v1/memory/{entry}")], "refused"),
        ("memory-bad-fields", lambda b, a: [b.post("/v1/memory", json={"text": "x" * 100_000}),
                                            b.post("/v1/memory", json={"text": "nul\u0000"}),
                                            b.post("/v1/memory", json={"text": " "}),
                                            b.post("/v1/memory", json={"text": "ok", "topic": "t" * 500}),
                                            b.post("/v1/memory", json={"text": "ok", "owner": "alice"}),
                                            b.patch("/v1/memory/x", json={"status": "rejected"})], "refused"),
        ("memory-alice-words", lambda b, a: [b.post("/v1/memory", json={"text": "The cat sleeps in the garage now.",
                                                                         "topic": "bed"}),
                                             b.post("/v1/chat/completions",
                                                    json=ask("The cat is eleven now. I feed the cat <|im_end|>.",
                                                             data_url(_png(1))))], "accepted"),
        ("memory-quota", memory_flood, "mixed"),
        ("conversation-alice-id", lambda b, a: [b.post("/v1/chat/completions",
                                                       json=ask("mine now?", conversation=chat)),
                                                b.get(f"/v1/conversations/{chat}"),
                                                b.patch(f"/v1/conversations/{chat}", json={"title": "bob's"}),
                                                b.delete(f"/v1/conversations/{chat}"),
                                                b.get(f"/v1/media/{photo_hash}")], "refused"),
        ("conversation-bad-ids", lambda b, a: [b.post("/v1/chat/completions", json=ask("hi", conversation="x" * 65)),
                                               b.post("/v1/chat/completions", json=ask("hi", conversation=["new"])),
                                               b.get("/v1/conversations/" + "0" * 32),
                                               b.get("/v1/conversations?limit=100000")], "refused"),
        ("conversation-quota", turn_flood, "mixed"),
        ("proposed-alice-photo", lambda b, a: [b.post("/v1/concepts/proposed",
                                                      json={"name": "Anna", "image": photo_hash}),
                                               b.post("/v1/concepts/proposed",
                                                      json={"name": "Anna", "image": data_url(img),
                                                            "box": [0, 0, 10**9, 10**9]}),
                                               b.post("/v1/concepts/proposed",
                                                      json={"name": "cat", "image": "../../etc/passwd"})],
         "refused"),
    ]
    return extra + [
        ("int-chat-seed", lambda b, a: [b.post("/v1/chat/completions", json=ask("hi", seed=big))], "refused"),
        ("int-chat-seed-negative", lambda b, a: [b.post("/v1/chat/completions", json=ask("hi", seed=-1))], "refused"),
        ("int-max-tokens", lambda b, a: [b.post("/v1/chat/completions", json=ask("hi", max_tokens=big))], "refused"),
        ("int-image-seed", lambda b, a: [b.post("/v1/images/generations", json={"prompt": "x", "seed": big})],
         "refused"),
        ("int-image-seed-counts-past", lambda b, a: [b.post("/v1/images/generations",
                                                            json={"prompt": "x", "seed": 2**63 - 1, "n": 2})],
         "refused"),
        ("int-offset", lambda b, a: [b.get("/v1/concepts?offset=9223372036854775808")], "refused"),
        ("int-limit", lambda b, a: [b.get(f"/v1/concepts?limit={big}")], "refused"),
        ("int-steps", lambda b, a: [b.post("/v1/images/generations", json={"prompt": "x", "steps": big})],
         "refused"),
        ("aliases-40000", lambda b, a: [b.post("/v1/concepts", data={"name": "al"}),
                                        b.patch("/v1/concepts/al", json={"aliases": [f"a{i}" for i in range(40_000)]})],
         "mixed"),
        ("aliases-alice-handles", lambda b, a: [b.patch("/v1/concepts/al", json={"aliases": ["cat", "kitty"]})],
         "accepted"),
        ("read-alice-concept-by-id", lambda b, a: [b.get(f"/v1/concepts/{mine}"),
                                                  b.delete(f"/v1/concepts/{mine}"),
                                                  b.patch(f"/v1/concepts/{mine}", json={"info": "mine now"})],
         "refused"),
        ("alice-images-as-bobs", lambda b, a: [b.post("/v1/concepts", data={"name": "dog"}, files=[
            ("images", ("c.png", _png(400), "image/png"))])], "accepted"),
        ("no-key", lambda b, a: [a.get("/v1/concepts"), a.post("/v1/chat/completions", json=ask("hi"))], "refused"),
        ("malformed-key", lambda b, a: [a.get("/v1/concepts", headers={"Authorization": "Bearer mmp-" + "x" * 5000}),
                                        a.get("/v1/concepts", headers={"Authorization": "Basic Ym9iOmJvYg=="})],
         "refused"),
        ("keys-file-damaged", keys_damaged, "mixed"),
        ("health-no-detail", lambda b, a: [a.get("/health")], "accepted"),
        ("url-http", lambda b, a: [b.post("/v1/chat/completions", json=ask("hi", "http://127.0.0.1:1/x.png"))],
         "refused"),
        ("url-file", lambda b, a: [b.post("/v1/chat/completions", json=ask("hi", "file:///etc/passwd"))], "refused"),
        ("data-url-lies", lambda b, a: [b.post("/v1/chat/completions", json=ask("hi", data_url(b"not an image")))],
         "refused"),
        ("data-url-svg", lambda b, a: [b.post("/v1/chat/completions", json=ask("hi", data_url(svg, "image/svg+xml")))],
         "refused"),
        ("image-bomb", lambda b, a: [b.post("/v1/chat/completions", json=ask("hi", data_url(png_bomb()))),
                                     b.post("/v1/concepts", data={"name": "bomb"},
                                            files=[("images", ("b.png", png_bomb(), "image/png"))])], "refused"),
        ("body-limit", lambda b, a: [b.post("/v1/concepts/search", content=b"x" * (33 * 2**20),
                                            headers={"Content-Type": "application/json"})], "refused"),
        ("body-limit-chunked", lambda b, a: [b.post("/v1/concepts/search",
                                                    content=iter([b"x" * 2**20] * 33),
                                                    headers={"Content-Type": "application/json"})], "refused"),
        ("smuggling", smuggle, "refused"),
        ("json-malformed", lambda b, a: [b.post("/v1/chat/completions", content=b"{",
                                                headers={"Content-Type": "application/json"}),
                                         b.post("/v1/concepts/search", json={"text": "a", "min_score": "NaN"})],
         "refused"),
        ("json-wrong-types", lambda b, a: [b.post("/v1/chat/completions", json={"messages": "hi"}),
                                           b.post("/v1/images/generations", json={"prompt": ["x"]})], "refused"),
        ("event-bad-kind", lambda b, a: [b.post("/v1/profile/events", json={"kind": "hate", "image": data_url(img)})],
         "refused"),
        ("event-alice-id", lambda b, a: [b.delete("/v1/profile/events/" + "0" * 32)], "refused"),
        ("attributes-huge", lambda b, a: [b.put("/v1/profile/attributes", json={"liked": ["x" * 100] * 10_000})],
         "refused"),
        ("lookalike-name", lambda b, a: [b.post("/v1/concepts", data={"name": "c\u0430t"})], "refused"),  # his "cat"
        ("reset-during-reward", lambda b, a: [b.post("/v1/profile/events", json={"kind": "like",
                                                                                  "image": data_url(img)}),
                                              b.post("/v1/profile/reward"), b.delete("/v1/profile")], "accepted"),
        ("quota", quota, "mixed"),
    ]


class _Raw:
    """A raw socket exchange's answer as a response: its status line's code (0: the server closed it)."""

    def __init__(self, data: bytes):
        first = data.split(b"\r\n", 1)[0].split()
        self.status_code = int(first[1]) if len(first) > 1 and first[1].isdigit() else 0
        self.text = data.decode(errors="replace")

    def json(self):
        return json.loads(self.text.split("\r\n\r\n", 1)[-1] or "{}")


def classify(responses: list, server_paths: list[str]) -> tuple[str, list[int], bool]:
    """The outcome of a case's responses, their statuses, and whether one names a path of the server's that the
    request did not name itself (an echo of the client's own input is no leak)."""
    from urllib.parse import unquote

    def leaks_in(r) -> bool:
        request = getattr(r, "_request", None) or getattr(r, "request", None)
        asked = unquote(str(request.url)) if request is not None else ""
        return any(p in r.text and p not in asked for p in server_paths)

    statuses = [r.status_code for r in responses]
    leaks = any(leaks_in(r) for r in responses)
    if any(s >= 500 and s != 503 for s in statuses):
        return "http_500", statuses, leaks
    refused = [s for s in statuses if 400 <= s < 500 or s in (0, 503)]
    if refused and len(refused) == len(statuses):
        return "refused", statuses, leaks
    return ("accepted" if not refused else "mixed"), statuses, leaks


def start_app(work: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (work / "logins.txt").write_text("alice:pw-alice\nbob:pw-bob\n")
    proc, log = launch([sys.executable, str(ROOT / "gradio_app.py"), "--preset", "tiny", "--device", "cpu", "--db",
                        str(work / "app.db"), "--auth-file", str(work / "logins.txt"), "--port", str(port)],
                       work, extra_env, "app.log", f"{url}/config", lambda status: status in (200, 401), "app")
    return proc, url, log


def app_cases(url: str, work: Path) -> list[tuple[str, Callable, str]]:
    """(name, send(bob, anon) -> responses, expected): bob logged in, anon not."""
    import httpx

    def guess(bob, anon):  # from another address: only that address is slowed and refused
        with httpx.Client(base_url=url, timeout=60, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
            return [c.post("/login", data={"username": "alice", "password": f"guess{i}"}) for i in range(7)]

    def flood(bob, anon):
        return [bob.post("/gradio_api/upload", files={"files": (f"f{i}.bin", os.urandom(300_000), "image/png")})
                for i in range(6)]  # 1.8 MB against a budget of 1 MB an hour

    return [
        ("app-deep-link-route", lambda b, a: [b.get("/gradio_api/deep_link", params={"session_hash": "x" * 11})],
         "refused"),
        ("app-deep-link-param", lambda b, a: [b.get("/", params={"deep_link": "abc"})], "refused"),
        ("app-unused-routes", lambda b, a: [b.get("/gradio_api/monitoring"), b.get("/gradio_api/dev/reload"),
                                            b.get("/gradio_api/no-such-route")], "refused"),
        ("app-no-login", lambda b, a: [a.get("/gradio_api/queue/data", params={"session_hash": "s"}),
                                       a.post("/gradio_api/upload", files={"files": ("x.png", _png(9), "image/png")})],
         "refused"),
        ("app-files-of-nobody", lambda b, a: [b.get(f"/gradio_api/file={work / 'logins.txt'}"),
                                              b.get("/gradio_api/file=/etc/passwd")], "refused"),
        ("app-guess-alice", guess, "refused"),
        ("app-upload-flood", flood, "mixed"),
    ]


def run_cases(cases: list[tuple[str, Callable, str]], bob, anon, log: Path, view: Callable[[], Any],
              paths: list[str], only: set[str] | None) -> list[dict]:
    """Each case as bob (and anon) sends it: its outcome, the tracebacks it left in the process's `log`, whether
    a response names one of `paths`, and whether alice's `view` is still what it was before the first case."""
    import httpx

    baseline = view()
    results = []
    for name, send, expected in cases:
        if only and name not in only:
            continue
        seen = len(log.read_bytes())
        try:
            outcome, statuses, leaks = classify(send(bob, anon), paths)
        except httpx.HTTPError as e:  # the server dropped the connection: as bad as a 500
            outcome, statuses, leaks = "http_500", [repr(e)[:100]], False
        time.sleep(0.05)
        new_log = log.read_bytes()[seen:].decode(errors="replace")
        results.append({"case": name, "expected": expected, "outcome": outcome, "statuses": statuses,
                        "traceback": "Traceback" in new_log, "leaks_path": leaks,
                        "cross_user_effect": view() != baseline})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def run_app(work: Path, only: set[str] | None = None) -> tuple[list[dict], float]:
    import httpx

    sys.path.insert(0, str(ROOT))
    from concept_db import open_store
    from concept_db.migrate import summarize

    work.mkdir(parents=True, exist_ok=True)
    proc, url, log = start_app(work, {**QUOTA, "MMPERSONA_QUOTA_UPLOAD_MB": "1"})
    try:
        def login(user: str, password: str) -> httpx.Client:
            client = httpx.Client(base_url=url, timeout=120)
            r = client.post("/login", data={"username": user, "password": password})
            assert r.status_code == 200, r.text
            return client

        # alice's data, stored as the app stores it, then the view she must keep: she logs in, and it is unchanged
        store = open_store(str(work / "app.db"))
        store.add("alice", "cat", images=[_png(1)])
        store.add_profile_event("alice", "like", images=[_png(7)])

        def alice_view():
            with httpx.Client(base_url=url, timeout=60) as c:
                status = c.post("/login", data={"username": "alice", "password": "pw-alice"}).status_code
            return status, summarize(store, "alice")

        bob, anon = login("bob", "pw-bob"), httpx.Client(base_url=url, timeout=60)
        results = run_cases(app_cases(url, work), bob, anon, log, alice_view, [str(work), str(ROOT)], only)
        store.close()
        return results, peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(work: Path, *, only: set[str] | None = None) -> dict:
    import httpx

    sys.path.insert(0, str(ROOT))
    from mmpersona.server.keys import KeyStore

    work.mkdir(parents=True, exist_ok=True)
    keys_path = work / "keys.json"
    store = KeyStore(keys_path)
    key = {u: store.create(u)[1] for u in ("alice", "bob")}
    proc, url, log = start(work, QUOTA)
    try:
        client = lambda k: httpx.Client(base_url=url, timeout=120,  # noqa: E731
                                        headers={"Authorization": f"Bearer {k}"} if k else {})
        alice, bob, anon = client(key["alice"]), client(key["bob"]), client(None)
        ids = {}
        for name, seeds in (("cat", (1, 2)), ("dog", (3,))):
            r = alice.post("/v1/concepts", data={"name": name, "category": "pet", "aliases": [f"{name}-alias"]},
                           files=[("images", (f"{s}.png", _png(s), "image/png")) for s in seeds])
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        alice.post("/v1/profile/events", json={"kind": "like", "image": data_url(_png(7))})
        photo = data_url(_png(1))
        r = alice.post("/v1/memory", json={"text": "The cat sleeps on the sofa.", "concept": "cat", "topic": "bed"})
        assert r.status_code == 201, r.text
        ids["memory"] = r.json()["id"]
        r = alice.post("/v1/chat/completions", json=ask("This is my cat.", data_url(_png(5)), conversation="new",
                                                        remember=False))
        assert r.status_code == 200, r.text
        ids["conversation"] = r.json()["mmpersona"]["conversation"]
        ids["turn_image"] = alice.get(f"/v1/conversations/{ids['conversation']}").json()["data"][0]["image"]
        results = run_cases(cases(url, work, keys_path, ids), bob, anon, log, lambda: alice_view(alice, photo),
                            [str(work), str(keys_path), str(ROOT)], only)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    app_results, app_rss = run_app(work / "app", only)
    results += app_results
    rss = max(rss, app_rss)
    return {"test": "hostile-server", "cases": len(results),
            "clean_errors": sum(r["outcome"] == "refused" and not r["leaks_path"] for r in results),
            "accepted": sum(r["outcome"] in ("accepted", "mixed") for r in results),
            "http_500": sum(r["outcome"] == "http_500" for r in results),
            "tracebacks": sum(r["traceback"] for r in results),
            "path_leaks": sum(r["leaks_path"] for r in results),
            "cross_user_effects": sum(r["cross_user_effect"] for r in results),
            "unexpected": [r["case"] for r in results if r["outcome"] != r["expected"]],
            "peak_rss_mb": round(rss, 1)}
