"""Many users at once: the fair model queue, cancellation of work whose client left (real sockets closed
mid-request), remote VLM requests sent concurrently, cost budgets and the decode budget."""

import asyncio
import base64
import io
import json
import socket
import threading
import time
import tracemalloc
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmpersona import ConceptDB
from mmpersona.cancel import Cancelled
from mmpersona.server import KeyStore, ModelWorker, QueueFull, ServeConfig, create_app
from mmpersona.server.scheduler import PixelBudget
from servers import in_thread

pytest.importorskip("uvicorn")

LIMITS = ServeConfig(max_tokens=512, default_max_tokens=8, max_n=2, default_steps=2, max_steps=8, max_side=1024,
                     max_image_steps=40, max_user_queue=2, queue_size=8)


def photo() -> Image.Image:
    img = Image.new("RGB", (64, 64), (235, 235, 225))
    ImageDraw.Draw(img).ellipse((10, 10, 54, 54), fill=(200, 40, 30))
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(max_tokens: int, stream: bool = False) -> dict:
    return {"model": "m", "max_tokens": max_tokens, "stream": stream, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(photo())}},
                                     {"type": "text", "text": "What is bo doing?"}]}]}


class StopAfter(threading.Event):
    """A stop event that reads as set from its `n`-th check on: stops work at a known step."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.checks = n, 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.n or super().is_set()


def wait_for(condition, timeout: float = 30, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def raw_request(url: str, path: str, key: str, body: dict) -> socket.socket:
    """A request sent over a plain socket, so that the test decides when the connection closes."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


# ------------------------------------------------------------------------------------------ the worker


def test_a_flooding_user_is_refused_while_another_is_served_first():
    worker = ModelWorker(queue_size=8, per_user=3)
    gate, ran = threading.Event(), []
    worker.submit(gate.wait, user="gate")
    wait_for(lambda: worker.busy)
    flood = [worker.submit(lambda i=i: ran.append(f"a{i}"), user="a") for i in range(3)]
    with pytest.raises(QueueFull, match="you have 3 model request"):
        worker.submit(lambda: ran.append("a3"), user="a")
    other = worker.submit(lambda: ran.append("b0"), user="b")  # the queue has room: another user is accepted
    gate.set()
    [f.result(5) for f in (*flood, other)]
    # b's job went before a's second, though it arrived after all of a's: a user with nothing running goes first
    assert ran == ["a0", "b0", "a1", "a2"]
    worker.close()


def test_background_work_that_gives_way_stops_for_a_request_and_starts_again_after():
    """`submit_idle(yields=True)` (a model's memory reading): a request queued while it runs sets its `stop`, so
    the request starts within a step instead of after the whole reading; the reading then starts again from the
    beginning and completes; after `IDLE_RETRIES` restarts it gives up (Cancelled), never blocking anyone."""
    from mmpersona.cancel import Cancelled

    worker = ModelWorker(queue_size=4)
    steps, starts = 200, []

    def reading(stop):  # a generation: one step every 5 ms, ending at its next step once `stop` is set
        starts.append(time.perf_counter())
        for _ in range(steps):
            if stop.is_set():
                raise Cancelled()
            time.sleep(0.005)
        return "read"

    later = worker.submit_idle(reading, user="alice", yields=True)
    deadline = time.monotonic() + 5
    while not starts:
        assert time.monotonic() < deadline, "the reading never started"
        time.sleep(0.005)
    time.sleep(0.05)
    asked = time.perf_counter()
    answer = worker.submit(lambda: time.perf_counter(), user="bob")
    began = answer.result(5)
    assert began - asked < 0.1  # not the reading's 1 s
    assert later.result(10) == "read" and len(starts) == 2 and worker.yielded == 1
    gives_up = worker.submit_idle(reading, user="alice", yields=True)
    expected = len(starts)
    for _ in range(ModelWorker.IDLE_RETRIES + 1):  # each start is stopped by a request
        expected += 1
        deadline = time.monotonic() + 5
        while len(starts) < expected:
            assert time.monotonic() < deadline, "the reading did not start again"
            time.sleep(0.005)
        worker.submit(lambda: None, user="bob").result(5)
    with pytest.raises(Cancelled):
        gives_up.result(10)
    plain = worker.submit_idle(lambda: "plain", user="carol")  # without `yields`: called with no argument
    assert plain.result(5) == "plain"
    parked = ModelWorker(queue_size=2)
    hold = threading.Event()
    parked.submit(lambda: hold.wait(5))
    while not parked.busy:
        time.sleep(0.01)
    pending = parked.submit_idle(reading, yields=True)
    hold.set()
    deadline = time.monotonic() + 5
    while not pending.running():
        assert time.monotonic() < deadline, "the reading never started"
        time.sleep(0.005)
    parked.submit(lambda: time.sleep(0.2))  # it gives way, and waits to start again when the worker closes
    time.sleep(0.05)
    parked.close()
    with pytest.raises(Cancelled):
        pending.result(5)
    worker.close()


def test_background_work_runs_only_when_no_request_waits_and_never_takes_a_requests_place():
    """`submit_idle` (memory readings after a response): not counted in the queue, started only when nothing
    else waits, bounded per user and in all; closing drops what has not started."""
    worker = ModelWorker(queue_size=2)
    gate, order = threading.Event(), []

    def job(name, wait=False):
        def run():
            order.append(name)
            if wait:
                gate.wait(5)
            return name
        return run

    running = worker.submit(job("request-1", wait=True), user="alice")
    while not worker.busy:
        time.sleep(0.01)
    later = [worker.submit_idle(job("idle-a"), user="alice"), worker.submit_idle(job("idle-b"), user="bob")]
    with pytest.raises(QueueFull):  # the lane holds `queue_size` jobs in all
        worker.submit_idle(job("idle-c"), user="carol")
    waiting = [worker.submit(job("request-2"), user="bob"), worker.submit(job("request-3"), user="carol")]
    assert worker.waiting == 2  # the background jobs take no request's place
    gate.set()
    assert [f.result(5) for f in [running, *waiting, *later]] == ["request-1", "request-2", "request-3", "idle-a",
                                                                   "idle-b"]
    assert order == ["request-1", "request-2", "request-3", "idle-a", "idle-b"]
    one = ModelWorker(queue_size=8)
    block = threading.Event()
    one.submit(lambda: block.wait(5))
    while not one.busy:
        time.sleep(0.01)
    mine = [one.submit_idle(job(f"mine-{i}"), user="mallory") for i in range(ModelWorker.IDLE_PER_USER)]
    with pytest.raises(QueueFull):
        one.submit_idle(job("one too many"), user="mallory")
    block.set()
    assert [f.result(5) for f in mine] == ["mine-0", "mine-1"]
    worker.close()
    one.close()
    stopped, release = ModelWorker(queue_size=1), threading.Event()
    stopped.submit(lambda: release.wait(5))
    while not stopped.busy:
        time.sleep(0.01)
    pending = stopped.submit_idle(job("never"))
    closing = threading.Thread(target=stopped.close)
    closing.start()
    while not stopped._closed:
        time.sleep(0.01)
    release.set()
    closing.join(5)
    assert pending.cancelled() and "never" not in order


def test_a_job_whose_caller_left_is_dropped_before_it_starts():
    worker = ModelWorker(queue_size=4)
    gate, ran = threading.Event(), []
    worker.submit(gate.wait)
    wait_for(lambda: worker.busy)
    stop = threading.Event()
    gone = worker.submit(lambda: ran.append("gone"), user="a", stop=stop)
    kept = worker.submit(lambda: ran.append("kept"), user="b", stop=threading.Event())
    stop.set()
    gate.set()
    with pytest.raises(Cancelled):
        gone.result(5)
    kept.result(5)
    assert ran == ["kept"] and worker.dropped == 1

    async def cancelled_while_waiting():
        gate.clear()
        worker.submit(gate.wait)
        wait_for(lambda: worker.busy)
        stop = threading.Event()
        task = asyncio.ensure_future(worker.run(lambda: ran.append("never"), stop=stop))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return stop

    stop = asyncio.run(cancelled_while_waiting())
    gate.set()
    wait_for(lambda: not worker.busy and worker.waiting == 0)
    assert stop.is_set() and ran == ["kept"] and worker.dropped == 2
    worker.close()


def test_the_pixel_budget_makes_requests_wait_for_room():
    async def scenario():
        budget = PixelBudget(100)
        first = await budget.acquire(80)
        waiting = asyncio.ensure_future(budget.acquire(50))
        await asyncio.sleep(0.05)
        assert not waiting.done() and budget.used == 80
        first.release()
        first.release()  # once only
        second = await asyncio.wait_for(waiting, 1)
        assert budget.used == 50
        huge = asyncio.ensure_future(budget.acquire(10**9))  # larger than the budget: waits until alone
        await asyncio.sleep(0.05)
        assert not huge.done()
        second.release()
        (await asyncio.wait_for(huge, 1)).release()
        assert budget.used == 0

    asyncio.run(scenario())


def test_16_bit_photos_convert_without_a_float64_copy_of_the_image():
    from mmpersona.images import load_image

    arr = (np.arange(3072 * 3072, dtype=np.uint32) % 65536).astype(np.uint16).reshape(3072, 3072)
    img = Image.fromarray(arr)
    tracemalloc.start()
    out = load_image(img)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the 16-bit pixels (2 bytes) and the 8-bit result (1): a float64 copy alone would be 8
    assert peak < 4 * arr.size, f"{peak / arr.size:.1f} bytes per pixel"
    expected = np.round(arr.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(out)[..., 0], expected)


def test_batchable_jobs_run_together_and_each_gets_its_own_result():
    worker = ModelWorker(queue_size=8, max_batch=3)
    gate, calls = threading.Event(), []
    worker.submit(gate.wait)
    wait_for(lambda: worker.busy)

    def run(items):
        calls.append(list(items))
        return [ValueError(i) if i == "bad" else i.upper() for i in items]

    futures = {i: worker.submit_batched("k", i, run, user=u) for i, u in
               (("a", "alice"), ("b", "bob"), ("bad", "carol"), ("d", "dave"))}
    other = worker.submit_batched("other", "x", run, user="erin")
    gate.set()
    assert [futures[i].result(5) for i in ("a", "b", "d")] == ["A", "B", "D"] and other.result(5) == "X"
    with pytest.raises(ValueError):
        futures["bad"].result(5)
    assert calls == [["a", "b", "bad"], ["d"], ["x"]]  # up to max_batch of one key; other keys apart
    assert worker.batches == 1
    worker.close()


def test_a_batch_waits_a_little_for_requests_on_their_way():
    worker = ModelWorker(queue_size=8, max_batch=4)
    calls, started = [], []

    def run(items):
        calls.append(list(items))
        started.append(time.monotonic())
        return items

    gate = threading.Event()
    worker.submit(gate.wait)
    wait_for(lambda: worker.busy)
    coming, never = worker.arriving(), worker.arriving()
    first = worker.submit_batched("k", "a", run, user="alice")
    gate.set()
    time.sleep(0.01)  # the batch of "a" could start: it waits for what is on its way
    second = worker.submit_batched("k", "b", run, user="bob", arrival=coming)
    assert (first.result(5), second.result(5)) == ("a", "b") and calls == [["a", "b"]]
    t = time.monotonic()
    worker.submit_batched("k", "c", run, user="carol").result(5)  # `never` never comes: the batch goes anyway
    assert started[-1] - t < 1.0
    never.done()
    never.done()  # once only
    assert worker._arriving == 0
    worker.close()


def talkative(vlm) -> None:
    """The tiny VLM's language norms drawn at random: as built it answers only newlines, and equal answers would
    prove nothing."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in vlm.model.named_parameters():
            if name.endswith("norm.weight") and "visual" not in name and "vision" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 2)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "llava"])
def test_a_batched_answer_is_the_answer_alone(family, tiny_cache):
    """Greedy: each conversation's answer in a batch (left padding, its own length) is its answer alone, streamed
    pieces included; one stopped midway leaves the others as they were."""
    from mmpersona.models import load_vlm

    def img(color, size):
        out = Image.new("RGB", size, (230, 230, 220))
        ImageDraw.Draw(out).ellipse((5, 5, size[0] - 5, size[1] - 5), fill=color)
        return out

    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": img((200, 30, 30), (64, 64))},
                                      {"type": "text", "text": "What is this?"}]}],
        [{"role": "system", "content": [{"type": "text", "text": "You are kind; this system text is long."}]},
         {"role": "user", "content": [{"type": "image", "image": img((30, 30, 200), (96, 64))},
                                      {"type": "image", "image": img((30, 200, 30), (48, 80))},
                                      {"type": "text", "text": "Compare these two photos of my dog please"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    ]
    vlm = load_vlm(f"tiny:{family}", preset="tiny", device="cpu", dtype="float32")
    talkative(vlm)
    budgets = [12, 5, 9]
    alone = [vlm.generate(c, max_new_tokens=m) for c, m in zip(conversations, budgets, strict=True)]
    assert all(len(a) >= 3 for a in alone)
    pieces = [[], [], []]
    batched = vlm.generate_batch(conversations, max_new_tokens=budgets, on_text=[p.append for p in pieces])
    assert batched == alone and ["".join(p).strip() for p in pieces] == alone
    stopped = vlm.generate_batch(conversations, max_new_tokens=budgets, stops=[None, StopAfter(2), None])
    assert isinstance(stopped[1], Cancelled) and [stopped[0], stopped[2]] == [alone[0], alone[2]]


# ------------------------------------------------------------------------------------------ the pipelines


def test_a_stop_event_ends_local_generation_and_denoising_at_the_next_step(tmp_path, tiny_embedder, talkative_qwen):
    from mmpersona.models import load_vlm
    from pipelines import PersonalizedT2IPipeline, PersonalizedVLMPipeline

    db = ConceptDB(tmp_path / "c.db", embedder=tiny_embedder)
    db.add("alice", "bo", [photo()], category="dog")
    vlm = PersonalizedVLMPipeline(db, vlm=load_vlm(talkative_qwen, device="cpu", dtype="float32"))
    forwards = []
    vlm.vlm.model.register_forward_hook(lambda *a: forwards.append(1))
    vlm(photo(), "What is bo doing?", user="alice", max_new_tokens=40, min_new_tokens=40, stop=threading.Event())
    assert len(forwards) == 40  # one forward per token
    for call in (vlm, lambda *a, **k: "".join(vlm.stream(*a, **k))):
        forwards.clear()
        with pytest.raises(Cancelled):  # the first check is before generation, then one per token
            call(photo(), "What is bo doing?", user="alice", max_new_tokens=40, min_new_tokens=40,
                 stop=StopAfter(4))
        assert len(forwards) == 3

    # a stream closed early (its reader left) stops its generation and waits for the generating thread
    forwards.clear()
    stream = iter(vlm.stream(photo(), "What is bo doing?", user="alice", max_new_tokens=40, min_new_tokens=40))
    next(stream)
    stream.close()
    seen = len(forwards)  # the generating thread has ended: nothing runs on
    time.sleep(0.3)
    assert seen == len(forwards) < 40

    t2i = PersonalizedT2IPipeline(db, preset="tiny", device="cpu", strategies=[])
    steps = []
    t2i.diffusers.unet.register_forward_hook(lambda *a: steps.append(1))
    t2i("a dog", user="alice", steps=6, stop=threading.Event())
    assert len(steps) >= 6  # one UNet call per step (the scheduler may add one)
    steps.clear()
    with pytest.raises(Cancelled):
        t2i("a dog", user="alice", steps=6, stop=StopAfter(3))  # before the batch, after steps 1 and 2
    assert len(steps) == 2


# ------------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_embedder, talkative_qwen):
    from mmpersona.models import load_vlm
    from pipelines import PersonalizedT2IPipeline, PersonalizedVLMPipeline

    root = tmp_path_factory.mktemp("scale")
    db = ConceptDB(root / "c.db", embedder=tiny_embedder)
    keys = KeyStore(root / "keys.json")
    key = {user: keys.create(user)[1] for user in ("alice", "bob")}
    db.add("alice", "bo", [photo()], category="dog")
    vlm = PersonalizedVLMPipeline(db, vlm=load_vlm(talkative_qwen, device="cpu", dtype="float32"))
    t2i = PersonalizedT2IPipeline(db, preset="tiny", device="cpu", strategies=["attributes", "rerank"])
    app = create_app(db, keys, vlm=vlm, t2i=t2i, config=LIMITS)
    with in_thread(app) as url:
        yield SimpleNamespace(url=url, key=key, app=app, worker=app.state.worker, vlm=vlm,
                              http=lambda user: httpx.Client(base_url=url, timeout=120,
                                                             headers={"Authorization": f"Bearer {key[user]}"}))


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_stops_its_generation(api, stream):
    worker = api.worker
    stopped, done = worker.stopped, worker.done
    sock = raw_request(api.url, "/v1/chat/completions", api.key["alice"], chat_body(512, stream=stream))
    wait_for(lambda: worker.busy, what="the generation to start")
    if stream:
        assert b"200 OK" in sock.recv(4096)  # the first chunk has arrived
    sock.close()
    wait_for(lambda: not worker.busy, timeout=20, what="the generation to stop")
    assert worker.stopped == stopped + 1 and worker.done == done + 1


def test_requests_waiting_together_are_answered_in_one_batch_as_each_alone(api):
    worker, pipe = api.worker, api.app.state.chat.get()
    alone = {u: pipe(photo(), "What is bo doing?", user=u, max_new_tokens=m).answer
             for u, m in (("alice", 8), ("bob", 5))}
    assert all(alone.values())
    gate = threading.Event()
    worker.submit(gate.wait)
    wait_for(lambda: worker.busy)
    batches, replies = worker.batches, {}

    def ask(name, user, max_tokens, stream):
        with api.http(user) as client:
            r = client.post("/v1/chat/completions", json=chat_body(max_tokens, stream=stream))
            assert r.status_code == 200, r.text
            if stream:
                chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: {")]
                replies[name] = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).strip()
            else:
                replies[name] = r.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=args) for args in
               (("alice", "alice", 8, False), ("bob", "bob", 5, False), ("alice-stream", "alice", 8, True))]
    [t.start() for t in threads]
    wait_for(lambda: worker.waiting == 3, what="the three requests to queue")
    gate.set()
    [t.join(60) for t in threads]
    assert worker.batches == batches + 1  # the three in one generation
    assert replies == {"alice": alone["alice"], "bob": alone["bob"], "alice-stream": alone["alice"]}


def test_searches_waiting_together_are_embedded_in_one_call_with_each_users_own_results(api):
    worker, db = api.worker, api.app.state.server.db
    queries = [("alice", {"text": "a red dog"}), ("bob", {"text": "a red dog"}), ("alice", {"text": "a cat"}),
               ("alice", {"image": data_url(photo())}), ("bob", {"image": data_url(photo())})]
    alone = [(db.search_text(u, q["text"]) if "text" in q else db.search_image(u, photo())) for u, q in queries]
    assert alone[0] and not alone[1]  # bob has no concepts: never alice's
    gate = threading.Event()
    worker.submit(gate.wait)
    wait_for(lambda: worker.busy)
    batches, replies = worker.batches, [None] * len(queries)

    def ask(i):
        user, query = queries[i]
        with api.http(user) as client:
            replies[i] = client.post("/v1/concepts/search", json=query)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]  # the texts first (per-user bound)
    [t.start() for t in threads]
    wait_for(lambda: worker.waiting == 3, what="the searches to queue")
    gate.set()
    [t.join(60) for t in threads]
    gate.clear()
    worker.submit(gate.wait)
    wait_for(lambda: worker.busy)
    threads = [threading.Thread(target=ask, args=(i,)) for i in (3, 4)]
    [t.start() for t in threads]
    wait_for(lambda: worker.waiting == 2, what="the image searches to queue")
    gate.set()
    [t.join(60) for t in threads]
    assert worker.batches == batches + 2
    for reply, expected in zip(replies, alone, strict=True):
        assert reply.status_code == 200, reply.text
        got = reply.json()["data"]
        assert [m["concept"]["id"] for m in got] == [m.concept.id for m in expected]
        assert [m["score"] for m in got] == pytest.approx([m.score for m in expected], abs=1e-5)


def test_a_queued_request_whose_client_left_never_runs(api):
    worker = api.worker
    gate = threading.Event()
    worker.submit(gate.wait)
    wait_for(lambda: worker.busy)
    dropped, done = worker.dropped, worker.done
    sock = raw_request(api.url, "/v1/chat/completions", api.key["alice"], chat_body(512))
    wait_for(lambda: worker.waiting == 1, what="the request to queue")
    sock.close()
    time.sleep(0.3)  # the server notices the closed connection
    gate.set()
    wait_for(lambda: not worker.busy and worker.waiting == 0)
    assert worker.dropped == dropped + 1 and worker.done == done + 1  # the gate ran, the chat did not


def test_one_user_over_their_bound_gets_429_while_another_is_served(api):
    worker = api.worker
    gate = threading.Event()
    worker.submit(gate.wait)
    wait_for(lambda: worker.busy)
    held = [worker.submit(lambda: None, user="alice") for _ in range(LIMITS.max_user_queue)]
    try:
        with api.http("alice") as alice:
            r = alice.post("/v1/concepts/search", json={"text": "a dog"})
            assert r.status_code == 429 and "you have 2 model request" in r.json()["error"]["message"]
            assert int(r.headers["Retry-After"]) >= 1
        with api.http("bob") as bob:
            reply = {}
            t = threading.Thread(target=lambda: reply.update(r=bob.post("/v1/concepts/search",
                                                                        json={"text": "a dog"})))
            t.start()
            wait_for(lambda: worker.waiting == LIMITS.max_user_queue + 1, what="bob's request to queue")
            gate.set()
            t.join(30)
            assert reply["r"].status_code == 200
    finally:
        gate.set()
    [h.result(10) for h in held]


def test_generation_over_the_cost_budget_is_refused_before_it_queues(api):
    done = api.worker.done
    with api.http("alice") as alice:
        r = alice.post("/v1/images/generations", json={"prompt": "a dog", "size": "256x256", "steps": 1})
        assert r.status_code == 400 and "sides up to 128" in r.json()["error"]["message"]  # tiny: 64 native
        # 2 images x 4 reranking candidates x 8 steps = 64 image-steps at 64x64, over the budget of 40
        r = alice.post("/v1/images/generations", json={"prompt": "a dog", "n": 2, "steps": 8, "size": "64x64"})
        assert r.status_code == 400 and "64 image-steps" in r.json()["error"]["message"]
        assert api.worker.done == done  # refused before they queued
        # 1 image x 4 candidates x 1 step x (128x128 / 64x64) = 16 image-steps: within
        r = alice.post("/v1/images/generations", json={"prompt": "a dog", "steps": 1, "size": "128x128"})
        assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------ a remote VLM


class StandIn:
    """An OpenAI-compatible server answering every request after `delay` s, any number at once; it records how
    many it had at once and whether a client left before its answer."""

    def __init__(self, delay: float, memory_reply: str | None = None):
        self.delay, self.in_flight, self.most, self.abandoned = delay, 0, 0, 0
        self.memory_reply, self.readings = memory_reply, 0  # the answer to a memory reading (`VLMExtractor`)

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def chat(request):
            body = await request.json()
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            try:
                end = time.monotonic() + self.delay
                while time.monotonic() < end:
                    if await request.is_disconnected():
                        self.abandoned += 1
                        return JSONResponse({})
                    await asyncio.sleep(0.02)
            finally:
                self.in_flight -= 1
            reading = self.memory_reply is not None and "personal memory" in json.dumps(body["messages"][0])
            self.readings += reading
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                     "role": "assistant", "content": self.memory_reply if reading else "a dog"}}]})

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_remote_vlm_requests_go_out_at_once_and_stop_when_the_client_leaves(tmp_path, tiny_embedder, tiny_cache):
    from mmpersona.models import load_vlm
    from mmpersona.models.tiny import tiny_path
    from pipelines import PersonalizedVLMPipeline

    stand_in = StandIn(delay=1.0)
    users = [f"u{i}" for i in range(6)]
    db = ConceptDB(tmp_path / "c.db", embedder=tiny_embedder)
    keys = KeyStore(tmp_path / "keys.json")
    key = {u: keys.create(u)[1] for u in users}
    with in_thread(stand_in.app()) as backend:
        remote = PersonalizedVLMPipeline(db, vlm=load_vlm(f"openai:{backend}/v1#{tiny_path('qwen2.5-vl')}"))
        with in_thread(create_app(db, keys, vlm=remote, config=LIMITS)) as url:
            def ask(user):
                return httpx.post(f"{url}/v1/chat/completions", json=chat_body(8), timeout=60,
                                  headers={"Authorization": f"Bearer {key[user]}"})

            ask(users[0]).raise_for_status()  # warm
            results = [None] * len(users)
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(users[i])))
                       for i in range(len(users))]
            t = time.perf_counter()
            [th.start() for th in threads]
            [th.join(60) for th in threads]
            took = time.perf_counter() - t
            assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "a dog"
                       for r in results)
            assert stand_in.most == len(users) and took < 3.0, (stand_in.most, took)  # one at a time: 6 s

            sock = raw_request(url, "/v1/chat/completions", key[users[0]], chat_body(8))
            wait_for(lambda: stand_in.in_flight == 1, what="the remote request")
            sock.close()
            wait_for(lambda: stand_in.abandoned == 1, timeout=5, what="the remote request to be closed")


def test_a_remote_vlm_reads_a_turn_for_memory_after_the_response(tmp_path, tiny_embedder, tiny_cache):
    """With a VLM server behind it, the memory reading goes there too, from the event loop once the response is
    out (never through the local model worker); questions alone are not read at all."""
    from mmpersona.models import load_vlm
    from mmpersona.models.tiny import tiny_path
    from pipelines import PersonalizedVLMPipeline

    said = '[{"about": "<bo>", "kind": "state", "topic": "bed", "text": "Bo sleeps on the balcony now."}]'
    stand_in = StandIn(delay=0.0, memory_reply=said)
    db = ConceptDB(tmp_path / "c.db", embedder=tiny_embedder)
    db.add("alice", "bo", [photo()], category="dog")
    keys = KeyStore(tmp_path / "keys.json")
    key = keys.create("alice")[1]
    with in_thread(stand_in.app()) as backend:
        remote = PersonalizedVLMPipeline(db, vlm=load_vlm(f"openai:{backend}/v1#{tiny_path('qwen2.5-vl')}"))
        app = create_app(db, keys, vlm=remote, config=LIMITS)
        with in_thread(app) as url:
            def ask(text):
                body = chat_body(8)
                body["messages"][0]["content"][1]["text"] = text
                r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                               headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200 and r.json()["mmpersona"]["proposed"] == [], r.text
                return r

            ask("What is <bo> doing?")
            ask("Bo sleeps on the balcony now. Is <bo> here?")
            wait_for(lambda: db.store.memory("alice", status="proposed"), what="the proposal")
            assert [e.text for e in db.store.memory("alice")] == ["Bo sleeps on the balcony now."]
            assert stand_in.readings == 1  # the question alone was not read


# ------------------------------------------------------------------------------------------ replicas


@pytest.mark.pg
def test_two_replicas_over_one_postgresql_share_keys_and_concepts(pg_url, tiny_embedder, tmp_path):
    from mmpersona.server import DatabaseKeyStore, open_keys

    assert isinstance(open_keys(str(tmp_path / "c.db")), KeyStore)  # SQLite: the keys file
    assert isinstance(open_keys(pg_url, tmp_path / "keys.json"), KeyStore)  # a file named is the file
    dbs = [ConceptDB(pg_url, embedder=tiny_embedder) for _ in range(2)]  # two processes' connections
    keys = [open_keys(pg_url, store=db.store) for db in dbs]
    assert all(isinstance(k, DatabaseKeyStore) for k in keys)
    _, alice = keys[0].create("alice")  # through one replica's store
    _, bob = open_keys(pg_url).create("bob")  # as `mmpersona --db postgresql://... keys create` does

    def call(url, key, method="GET", path="/v1/concepts", **kw):
        return httpx.request(method, f"{url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw)

    with in_thread(create_app(dbs[0], keys[0])) as a, in_thread(create_app(dbs[1], keys[1])) as b:
        assert {call(url, key).status_code for url in (a, b) for key in (alice, bob)} == {200}
        buf = io.BytesIO()
        photo().save(buf, format="PNG")
        r = call(a, alice, "POST", data={"name": "bo", "category": "dog"},
                 files=[("images", ("bo.png", buf.getvalue(), "image/png"))])
        assert r.status_code == 201, r.text
        assert [c["name"] for c in call(b, alice).json()["data"]] == ["bo"]  # written through a, read through b
        assert call(b, bob).json()["data"] == []
        keys[1].revoke(keys[1].list("alice")[0].id)  # revoked through b: refused by a from the next request on
        assert call(a, alice).status_code == 401 and call(a, bob).status_code == 200
    for db in dbs:
        db.close()


def test_the_apps_model_events_wait_in_their_models_queue(tiny_cache):
    """Chat and generation each have a queue of one in Gradio: one user's generation does not hold a thread that
    chat needs, and a waiting event of a user who left is dropped by Gradio, not run."""
    from mmpersona.app import build_app

    demo = build_app("tiny")
    fns = {fn.api_name: fn for fn in demo.fns.values()}
    assert (fns["chat"].concurrency_id, fns["chat"].concurrency_limit) == ("vlm", 1)
    stop = [d for d in demo.get_config_file()["dependencies"] if d["cancels"]]
    assert [d["cancels"] for d in stop] == [[fns["chat"]._id]]  # the Stop button cancels the answer
    assert {(fns[n].concurrency_id, fns[n].concurrency_limit) for n in
            ("generate", "taste_pair", "taste_choose_a", "taste_choose_b", "taste_skip")} == {("t2i", 1)}
