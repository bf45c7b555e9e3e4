"""What the HTTP API adds to a personalized answer, and how it holds up under concurrent clients.

    python benchmarks/serve.py [--runs 40] [--clients 8] [--requests 5] [--max-tokens 32] [--vlm tiny:qwen2.5-vl]

On the tiny preset (CPU): one user with one concept, a question about a photo. The API server (`mmpersona
serve`, in its own process, on 127.0.0.1) against the baseline, the same pipeline called directly with the same
photo, question and token budget (greedy: the same work). `--runs` rounds of three calls in a shuffled order:
direct, the API (the request the openai client sends, over httpx: the API's own cost) and the official `openai`
client (which adds its own request and response handling); each ratio is the median of the rounds' ratios.
Then `--clients` threads each send `--requests` chat requests at once through the openai client (every other
one streamed), queued by the model worker; their latencies give p50 / p95.
Final JSON line: api_overhead_ratio (API / direct; target <= 1.10), p50_ms, p95_ms, errors (target 0), with
direct_ms, api_ms, openai_client_ratio, openai_ms, clients and requests.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import io
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="rounds of a direct, an API and an openai client call")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vlm", default="tiny:qwen2.5-vl")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()

    import socket
    import subprocess

    import httpx
    import openai
    from PIL import Image, ImageDraw

    from mmpersona import ConceptDB
    from mmpersona.server import KeyStore
    from pipelines import PersonalizedVLMPipeline

    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-serve-bench-"))
    db = ConceptDB(tmp / "c.db", preset=args.preset, device="cpu")
    photo = Image.new("RGB", (96, 96), (235, 235, 225))
    ImageDraw.Draw(photo).ellipse((20, 20, 76, 76), fill=(200, 30, 30))
    db.add("alice", "<bo>", [photo], category="dog", info="Alice's Shiba Inu, three years old, loves the park.")
    keys = KeyStore(tmp / "keys.json")
    _, key = keys.create("alice")
    pipe = PersonalizedVLMPipeline(db, vlm=args.vlm, preset=args.preset, device="cpu", max_new_tokens=args.max_tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the server in its own process, as it is deployed: torch's threads in one process would compete with the
    # baseline's own (two OpenMP thread teams on the same cores), which is not the API's cost
    log = (tmp / "server.log").open("wb")  # a file, not a pipe nobody reads while the server runs
    server = subprocess.Popen(
        [sys.executable, "-m", "mmpersona", "--preset", args.preset, "--device", "cpu", "--db", str(tmp / "c.db"),
         "--model", f"vlm={args.vlm}", "serve", "--port", str(port), "--keys", str(tmp / "keys.json"),
         "--no-images", "--queue-size", str(max(8, args.clients)), "--max-user-queue", str(max(4, args.clients)),
         "--max-tokens", str(max(512, args.max_tokens))],
        stdout=log, stderr=subprocess.STDOUT)
    atexit.register(server.kill)  # also when a check below fails
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited: {(tmp / 'server.log').read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit("the server did not come up within 300 s")
        time.sleep(0.2)

    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    question = "What is <bo> doing in this photo?"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {key}"})
    body = json.dumps({"model": "mmpersona", "messages": messages, "max_tokens": args.max_tokens})

    def direct() -> str:
        return pipe(photo, question, user="alice", max_new_tokens=args.max_tokens).answer

    def api() -> str:
        """The API's own cost: the request as the openai client sends it, over plain HTTP."""
        reply = http.post("/chat/completions", content=body, headers={"Content-Type": "application/json"})
        reply.raise_for_status()
        return reply.json()["choices"][0]["message"]["content"]

    def openai_client(stream: bool = False) -> str:
        if stream:
            chunks = client.chat.completions.create(model="mmpersona", messages=messages, max_tokens=args.max_tokens,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks).strip()
        reply = client.chat.completions.create(model="mmpersona", messages=messages, max_tokens=args.max_tokens)
        return reply.choices[0].message.content

    calls = {"api": api, "direct": direct, "openai": openai_client}
    for _ in range(3):  # the warm-up, and the check that all three do the same work
        answers = {name: fn() for name, fn in calls.items()}
        assert len(set(answers.values())) == 1, f"the API and the pipeline answer differently: {answers}"
    timed: dict[str, list[float]] = {name: [] for name in calls}
    order = random.Random(0)
    for _ in range(args.runs):
        # rounds of one call each, in a shuffled order: none always runs first, or always after the same other
        for name in order.sample(list(calls), len(calls)):
            t = time.perf_counter()
            calls[name]()
            timed[name].append((time.perf_counter() - t) * 1000)
    direct_ms, api_ms, openai_ms = (statistics.median(timed[name]) for name in ("direct", "api", "openai"))

    def ratio(name: str) -> float:
        """The median of the rounds' ratios: a slow moment of the machine lands in one round and cancels."""
        return statistics.median(a / d for a, d in zip(timed[name], timed["direct"], strict=True))

    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def one_client(i: int) -> None:
        nonlocal errors
        for j in range(args.requests):
            t = time.perf_counter()
            try:
                openai_client(stream=(i + j) % 2 == 1)
                ok = True
            except Exception as e:  # noqa: BLE001 - counted, and shown
                print(f"client {i} request {j}: {type(e).__name__}: {e}", file=sys.stderr)
                ok = False
            with lock:
                latencies.append((time.perf_counter() - t) * 1000)
                errors += not ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one_client, range(args.clients)))
    wall = time.perf_counter() - t0
    latencies.sort()
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    server.terminate()
    server.wait(timeout=30)

    print(f"direct pipeline call: {direct_ms:.1f} ms; through the API: {api_ms:.1f} ms (the median of the "
          f"{args.runs} rounds' ratios {ratio('api'):.3f}; target <= 1.10); with the openai client: {openai_ms:.1f} "
          f"ms (ratio {ratio('openai'):.3f})")
    print(f"{args.clients} concurrent clients x {args.requests} requests in {wall:.1f} s: p50 {p50:.1f} ms, "
          f"p95 {p95:.1f} ms, {errors} error(s)")
    print(json.dumps({"api_overhead_ratio": round(ratio("api"), 4), "p50_ms": round(p50, 1),
                      "p95_ms": round(p95, 1), "errors": errors, "direct_ms": round(direct_ms, 2),
                      "api_ms": round(api_ms, 2), "openai_client_ratio": round(ratio("openai"), 4),
                      "openai_ms": round(openai_ms, 2), "clients": args.clients, "requests": len(latencies)}))


if __name__ == "__main__":
    main()
