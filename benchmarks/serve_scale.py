"""How `mmpersona serve` holds up with many users at once: its scheduler against one-at-a-time, in the same run.

    python benchmarks/serve_scale.py [--delay 1.0] [--max-tokens 16] [--local-max-tokens 128]
                                     [--victim-requests 20] [--only remote]

On the tiny preset (CPU), each client its own user (one key, one concept). Two servers, each `mmpersona serve` in
its own process on 127.0.0.1:

1. In front of a stand-in OpenAI-compatible VLM server (started here) that answers every request after a fixed
   `--delay` and serves any number at once, as vLLM, SGLang and TGI do:
   `remote_speedup_8` / `remote_speedup_32`: the time of 8 (32) chat requests one after another over the time of
   the same requests sent at once (targets >= 6 and >= 20). `remote_max_in_flight`: the most requests the stand-in
   saw at once.
2. With the tiny local VLM (`tiny:qwen2.5-vl`):
   `local_batch_speedup_8`: the same with 8 requests of `--local-max-tokens` each (128: an answer's length; the
   tiny VLM as built writes every token it may), answered in batches (target >= 3).
   `abandoned_work_s`: 8 requests of 512 tokens whose clients disconnect right after sending: the model seconds
   spent after they left, until the server's worker is idle again (target <= 1); `full_request_s` is what one
   such request costs when its client waits for it.
   `victim_p95_ratio`: one user's chat p95 while another user floods the server (8 clients sending back to back,
   each 429 retried after its Retry-After, as the openai client does), over the same user's p95 alone
   (target <= 3).
   `decode_peak_mb`: the server's peak resident memory over idle while 40 users each send a 130 KB 16-bit
   8192x8192 PNG at once (target <= 2048).

Final JSON line: the fields above, with the timings they come from.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(img, **save) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


STAND_IN = r"""
import asyncio, json, sys, time
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

delay, port = float(sys.argv[1]), int(sys.argv[2])
state = {"in_flight": 0, "most": 0, "seen": 0}

async def chat(request):
    body = await request.json()
    state["in_flight"] += 1
    state["seen"] += 1
    state["most"] = max(state["most"], state["in_flight"])
    try:
        await asyncio.sleep(delay)
    finally:
        state["in_flight"] -= 1
    common = {"id": "x", "created": 0, "model": body["model"]}
    if body.get("stream"):
        def events():
            for piece in ("a ", "dog"):
                chunk = {**common, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({**common, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "a dog"}, "finish_reason": "stop"}]})

async def stats(request):
    out = dict(state)
    if request.query_params.get("reset"):
        state["most"] = state["seen"] = 0
    return JSONResponse(out)

app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/stats", stats)])
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", backlog=512)
"""


def stand_in(delay: float) -> str:
    """An OpenAI-compatible chat server in its own process that answers every request after `delay` seconds, any
    number at once (as vLLM, SGLang and TGI take many); `GET /stats` says how many it had at once."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN, str(delay), str(port)])
    atexit.register(proc.kill)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/stats", timeout=1)
            return url
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("the stand-in VLM server did not come up")
            time.sleep(0.1)


def serve(tmp: Path, vlm: str, *extra: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    log = (tmp / f"server-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmpersona", "--preset", "tiny", "--device", "cpu", "--db", str(tmp / "c.db"),
         "--model", f"vlm={vlm}", "serve", "--port", str(port), "--keys", str(tmp / "keys.json"), "--no-images",
         "--health-detail",
         *extra], stdout=log, stderr=subprocess.STDOUT)
    atexit.register(proc.kill)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {Path(log.name).read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit("the server did not come up within 300 s")
        time.sleep(0.2)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=1.0, help="the stand-in VLM server's answer time, seconds")
    parser.add_argument("--max-tokens", type=int, default=16, help="per chat request (local batching, the victim)")
    parser.add_argument("--local-max-tokens", type=int, default=128,
                        help="per request, for local batching (the tiny VLM writes every one of them)")
    parser.add_argument("--victim-requests", type=int, default=20)
    parser.add_argument("--only", choices=["remote"], default=None, help="only the remote part")
    args = parser.parse_args()

    import httpx
    import numpy as np
    from PIL import Image, ImageDraw

    from mmpersona import ConceptDB
    from mmpersona.models.tiny import ensure_tiny
    from mmpersona.server import KeyStore

    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-scale-bench-"))
    photo = Image.new("RGB", (96, 96), (235, 235, 225))
    ImageDraw.Draw(photo).ellipse((20, 20, 76, 76), fill=(200, 30, 30))
    users = [f"user{i:02d}" for i in range(40)]
    keys = KeyStore(tmp / "keys.json")
    key = {u: keys.create(u)[1] for u in [*users, "victim", "flood"]}
    with ConceptDB(tmp / "c.db", preset="tiny", device="cpu") as db:
        for u in [*users, "victim", "flood"]:
            db.add(u, "<bo>", [photo], category="dog", info=f"{u}'s Shiba Inu, three years old.")
    small = data_url(photo)
    big = data_url(Image.fromarray(np.zeros((8192, 8192), dtype=np.uint16)))  # 16-bit greyscale

    def body(image: str, max_tokens: int, stream: bool = False) -> dict:
        return {"model": "m", "max_tokens": max_tokens, "stream": stream, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "What is <bo> doing?"}]}]}

    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=128, max_keepalive_connections=128))

    def ask(url: str, user: str, payload: dict, timeout: float = 600) -> httpx.Response:
        """One request, over the shared connection pool (as an application's backend sends them)."""
        return http.post(f"{url}/v1/chat/completions", json=payload, timeout=timeout,
                         headers={"Authorization": f"Bearer {key[user]}"})

    def sequential_and_at_once(url: str, n: int, max_tokens: int, stream_every: int = 2) -> tuple[float, float]:
        """Seconds for n requests (of n users) one after another, and the same sent at once."""
        payloads = [body(small, max_tokens, stream=i % stream_every == 1) for i in range(n)]
        t = time.perf_counter()
        for i in range(n):
            ask(url, users[i], payloads[i]).raise_for_status()
        one_by_one = time.perf_counter() - t
        with ThreadPoolExecutor(n) as pool:
            t = time.perf_counter()
            for r in list(pool.map(lambda i: ask(url, users[i], payloads[i]), range(n))):
                r.raise_for_status()
            at_once = time.perf_counter() - t
        return one_by_one, at_once

    out: dict = {}
    # ---------------------------------------------------------------- 1. a remote VLM server behind the API
    backend = stand_in(args.delay)
    model_dir = ensure_tiny("qwen2.5-vl")
    remote, url = serve(tmp, f"openai:{backend}/v1#{model_dir}", "--queue-size", "64",
                        "--max-remote-concurrency", "32")
    sequential_and_at_once(url, 32, args.max_tokens)  # warm-up: every connection of the pool opened
    httpx.get(f"{backend}/stats", params={"reset": 1})
    for n in (8, 32):
        one_by_one, at_once = sequential_and_at_once(url, n, args.max_tokens)
        out[f"remote_speedup_{n}"] = round(one_by_one / at_once, 2)
        out[f"remote_{n}_sequential_s"], out[f"remote_{n}_at_once_s"] = round(one_by_one, 2), round(at_once, 2)
    out["remote_max_in_flight"] = httpx.get(f"{backend}/stats").json()["most"]
    remote.kill()
    if args.only == "remote":
        print(json.dumps(out))
        return

    # ---------------------------------------------------------------- 2. the tiny local VLM
    local, url = serve(tmp, "tiny:qwen2.5-vl", "--queue-size", "64", "--max-user-queue", "4")
    sequential_and_at_once(url, 2, args.max_tokens)  # warm-up
    one_by_one, at_once = sequential_and_at_once(url, 8, args.local_max_tokens)
    out["local_batch_speedup_8"] = round(one_by_one / at_once, 2)
    out["local_8_sequential_s"], out["local_8_at_once_s"] = round(one_by_one, 2), round(at_once, 2)

    def idle() -> None:
        while True:
            q = httpx.get(f"{url}/health").json()["queue"]
            if not q["busy"] and q["waiting"] == 0:
                return
            time.sleep(0.02)

    # abandoned work: what one full 512-token request costs, then 8 whose clients leave at once
    t = time.perf_counter()
    ask(url, users[0], body(small, 512)).raise_for_status()
    out["full_request_s"] = round(time.perf_counter() - t, 2)
    idle()

    def leave(i: int) -> None:
        try:
            ask(url, users[i], body(small, 512, stream=i % 2 == 1), timeout=0.3)
        except httpx.TimeoutException:
            pass  # the client gives up: its connection is closed

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(leave, range(8)))
    t = time.perf_counter()
    idle()
    out["abandoned_work_s"] = round(time.perf_counter() - t, 2)

    # the victim's latency alone, then while another user floods
    def victim_latencies() -> list[float]:
        took = []
        for _ in range(args.victim_requests):
            t = time.perf_counter()
            ask(url, "victim", body(small, args.max_tokens)).raise_for_status()
            took.append(time.perf_counter() - t)
        return took

    def p95(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=20, method="inclusive")[-1]

    alone = victim_latencies()
    flooding = threading.Event()
    flood_counts = {"ok": 0, "429": 0}

    def flood() -> None:
        """Requests back to back; a 429 is retried after its Retry-After, as the openai client does."""
        while not flooding.is_set():
            r = ask(url, "flood", body(small, args.max_tokens))
            said = "ok" if r.status_code == 200 else str(r.status_code)
            flood_counts[said] = flood_counts.get(said, 0) + 1
            if r.status_code == 429:
                flooding.wait(float(r.headers.get("Retry-After", 1)))

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    for f in flooders:
        f.start()
    time.sleep(1.0)
    crowded = victim_latencies()
    flooding.set()
    for f in flooders:
        f.join()
    idle()
    out["victim_p95_ratio"] = round(p95(crowded) / p95(alone), 2)
    out["victim_p95_alone_s"], out["victim_p95_flooded_s"] = round(p95(alone), 3), round(p95(crowded), 3)
    out["flood_answers"] = flood_counts

    # decode memory: 40 users at once, each with a 130 KB 16-bit 8192x8192 PNG
    time.sleep(1.0)
    base = rss_mb(local.pid)
    peak = base
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(local.pid))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(40) as pool:
        codes = [r.status_code for r in pool.map(lambda i: ask(url, users[i], body(big, 1)), range(40))]
    done.set()
    watcher.join()
    out["decode_peak_mb"] = round(peak - base, 1)
    out["decode_idle_mb"], out["decode_answers"] = round(base, 1), {str(c): codes.count(c) for c in set(codes)}
    local.kill()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
