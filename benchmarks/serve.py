"""What the HTTP API adds to a personalized answer, and how it holds up under concurrent clients.

    python benchmarks/serve.py [--runs 20] [--clients 8] [--requests 5] [--max-tokens 32] [--vlm tiny:qwen2.5-vl]

On the tiny preset (CPU): one user with one concept, a question about a photo. The API server (`create_app`
under uvicorn, on 127.0.0.1, in this process) answers through the official `openai` client; the baseline is the
same pipeline called directly with the same photo, question and token budget (greedy: the same work). Direct
and API calls alternate, medians over `--runs`. Then `--clients` threads each send `--requests` chat requests
at once (every other one streamed), queued by the model worker; their latencies give p50 / p95.
Final JSON line: api_overhead_ratio (API median / direct median; target <= 1.10), p50_ms, p95_ms, errors
(target 0), with direct_ms, api_ms, clients and requests.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
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
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vlm", default="tiny:qwen2.5-vl")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()

    import socket

    import openai
    import uvicorn
    from PIL import Image, ImageDraw

    from mmpersona import ConceptDB
    from mmpersona.server import KeyStore, ServeConfig, create_app
    from pipelines import PersonalizedVLMPipeline

    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-serve-bench-"))
    db = ConceptDB(tmp / "c.db", preset=args.preset, device="cpu")
    photo = Image.new("RGB", (96, 96), (235, 235, 225))
    ImageDraw.Draw(photo).ellipse((20, 20, 76, 76), fill=(200, 30, 30))
    db.add("alice", "<bo>", [photo], category="dog", info="Alice's Shiba Inu, three years old, loves the park.")
    keys = KeyStore(tmp / "keys.json")
    _, key = keys.create("alice")
    pipe = PersonalizedVLMPipeline(db, vlm=args.vlm, preset=args.preset, device="cpu", max_new_tokens=args.max_tokens)
    app = create_app(db, keys, vlm=pipe, config=ServeConfig(queue_size=max(8, args.clients),
                                                            max_tokens=max(512, args.max_tokens)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    question = "What is <bo> doing in this photo?"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)

    def direct() -> str:
        return pipe(photo, question, user="alice", max_new_tokens=args.max_tokens).answer

    def api(stream: bool = False) -> str:
        if stream:
            chunks = client.chat.completions.create(model="mmpersona", messages=messages, max_tokens=args.max_tokens,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks).strip()
        reply = client.chat.completions.create(model="mmpersona", messages=messages, max_tokens=args.max_tokens)
        return reply.choices[0].message.content

    assert api() == direct(), "the API and the pipeline answer differently"  # also the warm-up
    timed: dict[str, list[float]] = {"direct": [], "api": []}
    for _ in range(args.runs):
        for name, fn in (("api", api), ("direct", direct)):
            t = time.perf_counter()
            fn()
            timed[name].append((time.perf_counter() - t) * 1000)
    direct_ms, api_ms = statistics.median(timed["direct"]), statistics.median(timed["api"])

    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def one_client(i: int) -> None:
        nonlocal errors
        for j in range(args.requests):
            t = time.perf_counter()
            try:
                api(stream=(i + j) % 2 == 1)
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
    server.should_exit = True

    print(f"direct pipeline call: {direct_ms:.1f} ms; through the API: {api_ms:.1f} ms "
          f"(ratio {api_ms / direct_ms:.3f}; target <= 1.10)")
    print(f"{args.clients} concurrent clients x {args.requests} requests in {wall:.1f} s: p50 {p50:.1f} ms, "
          f"p95 {p95:.1f} ms, {errors} error(s)")
    print(json.dumps({"api_overhead_ratio": round(api_ms / direct_ms, 4), "p50_ms": round(p50, 1),
                      "p95_ms": round(p95, 1), "errors": errors, "direct_ms": round(direct_ms, 2),
                      "api_ms": round(api_ms, 2), "clients": args.clients, "requests": len(latencies)}))


if __name__ == "__main__":
    main()
