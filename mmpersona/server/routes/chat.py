"""Personalized chat in OpenAI's chat completions protocol (streamed as server-sent events on request)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from concept_db.types import NEW_CONVERSATION, content_hash

from ...cancel import Cancelled
from ...images import encoded_pixels, load_image
from ..config import ServeConfig
from ..dependencies import Server, server, user_of
from ..errors import ApiError, as_api_error, error_body
from ..media import data_url_bytes
from ..scheduler import Hold, Watch
from ..schemas import ChatMessage, ChatRequest
from ..worker import QueueFull, awaited

router = APIRouter(tags=["chat"])
log = logging.getLogger(__name__)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, user: str = Depends(user_of),
                           srv: Server = Depends(server)):
    """A personalized answer: your concepts retrieved for the photo and the question, then the model's
    reply (streamed as server-sent events with `stream: true`). The response's `mmpersona` field lists the
    concepts used."""
    talk = conversation(req.messages, srv.limits)
    options = sampling(req, srv.limits)
    if req.conversation is not None:  # before any model work: an unknown id or a full quota is refused first
        await run_in_threadpool(resume, talk, req.conversation, user, srv)
    common = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
    async with Watch(request) as watch:
        base = srv.chat.loaded()
        # answered in a batch with others (a seed: alone); a batch about to start waits for this one a little
        arrival = srv.worker.arriving() if base is not None and batchable(base, req) else None
        try:
            photo, hold = await decoded(talk.image, srv, watch)
            base = base or await srv.worker.run(srv.chat.get, user=user, stop=watch.stop)
            if base.vlm.remote is not None:
                return await remote_answer(req, talk, options, common, user, srv, watch, photo, hold)
            if batchable(base, req):
                return await batched_answer(req, talk, options, common, user, srv, watch, photo, base, arrival)
        finally:
            if arrival is not None:
                arrival.done()

        if not req.stream:
            answer = await srv.worker.run(lambda: chosen(srv, req)(photo, talk.question, user=user, history=talk.history,
                                                             system=talk.system, stop=watch.stop, **options),
                                          user=user, stop=watch.stop)
            return await completion(common, base, answer, Memo(srv, req, user, talk))

        def start():
            stream = chosen(srv, req).stream(photo, talk.question, user=user, history=talk.history, system=talk.system,
                                       stop=watch.stop, **options)
            return stream, iter(stream)

        stream, pieces = await srv.worker.stream(start, user=user, stop=watch.stop)
        watch.keep()  # the stream goes on after this returns; a client that leaves sets `stop`
        return sse(common, base, pieces, lambda: stream.result, watch, Memo(srv, req, user, talk))


def chosen(srv: Server, req: ChatRequest) -> Any:
    """The chat pipeline a request asks for: with `regions`, the variant that also retrieves per region."""
    return srv.chat.variant(regions=True, assign=True) if req.regions else srv.chat.get()


async def decoded(data: bytes | None, srv: Server, watch: Watch) -> tuple[Any, Hold | None]:
    """The photo decoded (and a bad one refused) before it takes a place in the model queue, within the server's
    pixel budget, held until the request ends (or the hold is released)."""
    if data is None:
        return None, None
    hold = await srv.decode.acquire(encoded_pixels(data))
    watch.on_end(hold.release)
    return await run_in_threadpool(load_image, data), hold


async def remote_answer(req: ChatRequest, talk: "Conversation", options: dict[str, Any], common: dict[str, Any],
                        user: str, srv: Server, watch: Watch, photo: Any, hold: Hold | None):
    """A remote VLM: retrieval and the prompt here (a local model job), generation on the VLM server, sent from
    the event loop with many others at once (`RemoteLane`)."""
    from mmpersona.models.remote import openai_messages

    srv.remote.admit()  # refused before any local work when the lane is full

    def local_part():
        pipe = chosen(srv, req)
        start = time.perf_counter()
        prompt, candidates, timings = pipe.prepare(photo, talk.question, user=user, history=talk.history,
                                                   system=talk.system)
        return pipe, prompt, candidates, timings, openai_messages(pipe.vlm._prepared(prompt.messages)), start

    pipe, prompt, candidates, timings, messages, start = await srv.worker.run(local_part, user=user, stop=watch.stop)
    if hold is not None:
        hold.release()  # the photo is in the messages now, at the model's input size
    kwargs = {k: v for k, v in options.items() if k != "max_new_tokens"}
    max_tokens, remote = options["max_new_tokens"], pipe.vlm.remote
    if not req.stream:
        async with srv.remote.slot():
            t = time.perf_counter()
            text = await watch.until_gone(remote.acomplete(messages, max_tokens, **kwargs))
        return await completion(common, pipe, pipe.answer(prompt, candidates, timings, text, started=t, start=start),
                                Memo(srv, req, user, talk))

    got: dict[str, Any] = {}

    async def pieces():
        async with srv.remote.slot():
            t, text = time.perf_counter(), []
            async for piece in remote.astream(messages, max_tokens, **kwargs):
                text.append(piece)
                yield piece
        got["answer"] = pipe.answer(prompt, candidates, timings, "".join(text), started=t, start=start)

    watch.keep()
    return sse(common, pipe, pieces(), lambda: got["answer"], watch, Memo(srv, req, user, talk))


@dataclass
class ChatItem:
    """One request's part in a batch: what to prepare, and where its answer's pieces go."""

    pipe: Callable[[], Any]
    photo: Any
    talk: "Conversation"
    user: str
    max_tokens: int
    stop: Any
    on_text: Callable[[str], None] | None = None
    prepared: Future | None = None  # set once its prompt is built (or failed): a stream starts then


def answer_batch(items: list[ChatItem], sampling: dict[str, Any]) -> list[Any]:
    """The answers of `items` (a `VLMAnswer`, or the exception of one that failed): each prepared alone (its user's
    retrieval and prompt), then one batched generation for all (`LoadedVLM.generate_batch`)."""
    results: list[Any] = [None] * len(items)
    ready = []
    for i, item in enumerate(items):
        try:
            pipe, start = item.pipe(), time.perf_counter()
            prompt, candidates, timings = pipe.prepare(item.photo, item.talk.question, user=item.user,
                                                       history=item.talk.history, system=item.talk.system)
            ready.append((i, pipe, prompt, candidates, timings, start))
            if item.prepared is not None:
                item.prepared.set_result(None)
        except Exception as e:  # noqa: BLE001 - this request's error; the others go on
            results[i] = e
            if item.prepared is not None:
                item.prepared.set_exception(e)
    if ready:
        t = time.perf_counter()
        texts = ready[0][1].vlm.generate_batch([r[2].messages for r in ready],
                                               max_new_tokens=[items[r[0]].max_tokens for r in ready],
                                               stops=[items[r[0]].stop for r in ready],
                                               on_text=[items[r[0]].on_text for r in ready], **sampling)
        for (i, pipe, prompt, candidates, timings, start), text in zip(ready, texts, strict=True):
            results[i] = text if isinstance(text, BaseException) else \
                pipe.answer(prompt, candidates, timings, text, started=t, start=start)
    return results


def batchable(base: Any, req: ChatRequest) -> bool:
    """A local VLM answering from retrieval (learned tokens change the model per user), and no seed."""
    return base.vlm.remote is None and base.mode == "retrieval" and req.seed is None


async def batched_answer(req: ChatRequest, talk: "Conversation", options: dict[str, Any], common: dict[str, Any],
                         user: str, srv: Server, watch: Watch, photo: Any, base: Any, arrival: Any = None):
    """A local VLM's answer in one batched generation with the other requests waiting for the same sampling
    (`--max-batch`, `--batch-window-ms`); streamed per request."""
    rest = {k: v for k, v in options.items() if k != "max_new_tokens"}
    key = ("chat", tuple(sorted(rest.items())))
    item = ChatItem(partial(chosen, srv, req), photo, talk, user, options["max_new_tokens"], watch.stop)
    run = partial(answer_batch, sampling=rest)
    if not req.stream:
        answer = await srv.worker.run_batched(key, item, run, user=user, stop=watch.stop, arrival=arrival)
        return await completion(common, base, answer, Memo(srv, req, user, talk))
    loop, pieces_in = asyncio.get_running_loop(), asyncio.Queue()
    item.on_text = lambda piece: loop.call_soon_threadsafe(pieces_in.put_nowait, piece)
    item.prepared = Future()

    def settled(f: Future) -> None:  # a job dropped before it ran never prepared
        if not item.prepared.done():
            try:
                item.prepared.set_exception(Cancelled() if f.cancelled() else f.exception() or Cancelled())
            except InvalidStateError:  # prepared meanwhile
                pass
        loop.call_soon_threadsafe(pieces_in.put_nowait, _END)

    future = srv.worker.submit_batched(key, item, run, user=user, stop=watch.stop, arrival=arrival)
    future.add_done_callback(settled)
    # its errors before the response starts: an HTTP status, as for a request answered alone
    await awaited(item.prepared, watch.stop, job=future)
    got: dict[str, Any] = {}

    async def pieces():
        while (piece := await pieces_in.get()) is not _END:
            yield piece
        got["answer"] = future.result()

    watch.keep()
    return sse(common, base, pieces(), lambda: got["answer"], watch, Memo(srv, req, user, talk))


_END = object()


@dataclass
class Memo:
    """What a turn leaves once it is answered: the exchange kept in its conversation (`conversation` in the
    request), and what it proposes to remember (`pipelines.memory`) from the user's question."""

    srv: Server
    req: ChatRequest
    user: str
    talk: "Conversation"

    @property
    def question(self) -> str:
        return self.talk.question

    async def after(self, answer: Any) -> dict[str, Any]:
        """The `mmpersona` field of the answer, once the turn is kept and its proposals are stored."""
        kept = await self.keep(answer)
        out = personal(answer, await self.propose(answer), kept)
        out["proposed_concepts"] = await self.new_concepts(answer, kept)
        return out

    async def new_concepts(self, answer: Any, kept: str | None) -> list[dict[str, Any]]:
        """Concepts the user introduced ("this is my friend Anna", `pipelines.introductions`), each with its
        region of the photo: the free face the answer's retrieval found, else the whole photo (no model runs for
        it here). `image` is the photo's content hash when the turn was kept (confirm with
        `POST /v1/concepts/proposed`), else null (send the photo along)."""
        from pipelines.introductions import introductions, propose_concepts

        talk, pipe = self.talk, self.srv.chat.loaded()
        if not self.req.remember or talk.image is None or pipe is None or not introductions(talk.question):
            return []

        def read() -> list[dict[str, Any]]:
            photo = load_image(talk.image)
            found = propose_concepts(self.srv.db, chosen(self.srv, self.req).retriever, self.user, talk.question,
                                     photo, answer.retrieved, detect=False)
            image = content_hash(talk.image) if kept else None
            return [{**p.to_dict(), "image": image} for p in found]

        try:  # the photo is decoded again (the answer's copy may be released): within the server's pixel budget
            hold = await self.srv.decode.acquire(encoded_pixels(talk.image))
            try:
                return await run_in_threadpool(read)
            finally:
                hold.release()
        except Exception as e:  # noqa: BLE001 - proposals are never worth an answer
            log.info("no concept proposals for this turn: %s", e)
            return []

    async def keep(self, answer: Any) -> str | None:
        """The exchange appended to its kept conversation (started first for 'new'); returns the conversation's id
        (None: not kept). The quota was checked before the answer; one that filled meanwhile costs the turn, never
        the answer."""
        talk = self.talk
        if talk.kept is None:
            return None
        store = self.srv.db.store

        def write() -> str:
            cid = store.start_conversation(self.user).id if talk.kept == NEW_CONVERSATION else talk.kept
            store.add_turn(self.user, cid, talk.question, answer.answer, image=talk.image)
            return cid

        try:
            return await run_in_threadpool(write)
        except Exception as e:  # noqa: BLE001 - keeping the turn is never worth the answer
            log.warning("the turn was not kept in conversation %s: %s", talk.kept, e)
            return None

    async def propose(self, answer: Any) -> list[dict[str, Any]]:
        """The proposals stored for the user (none with `remember: false`). With the rule extractor (the tiny
        models) they are read here, in milliseconds, and returned; with the chat model itself (`VLMExtractor`) the
        reading is a model job of its own, queued after this response is complete, and its proposals are listed
        by `GET /v1/memory?status=proposed`. A full memory quota, a full queue or a bad proposal costs the
        proposals, never the answer. The model's reading starts only when no request waits for the model
        (`ModelWorker.submit_idle`), gives way to a request that arrives while it runs (stopped at its next token
        and started again later), and is skipped when the model has no time for it."""
        if not self.req.remember:
            return []
        from pipelines.memory import RuleExtractor, propose

        pipe = self.srv.chat.loaded()
        extractor = pipe.memory_extractor() if pipe is not None else RuleExtractor()
        concepts = [r.concept for r in answer.retrieved]
        if isinstance(extractor, RuleExtractor):
            job = partial(propose, self.srv.db, self.user, self.question, concepts, extractor=extractor,
                          source="chat")
            return [e.to_dict() for e in await self._guarded(run_in_threadpool(job))]
        if pipe.vlm.remote is not None:
            work = self._remote_reading(pipe, extractor, concepts)
        else:
            def reading(stop):  # gives way: a request that arrives stops it at its next token (and it starts again)
                return propose(self.srv.db, self.user, self.question, concepts,
                               extractor=pipe.memory_extractor(stop=stop), source="chat")

            try:  # at the lowest priority: it never takes a request's place nor delays one that waits
                work = asyncio.wrap_future(self.srv.worker.submit_idle(reading, user=self.user, yields=True))
            except QueueFull as e:
                log.info("no memory proposals for this turn: %s", e)
                return []
        task = asyncio.create_task(self._guarded(work))
        _LATER.add(task)
        task.add_done_callback(_LATER.discard)
        return []

    async def _remote_reading(self, pipe: Any, extractor: Any, concepts: list[Any]) -> list[Any]:
        """The remote VLM reads the turn: sent from the event loop like an answer, only when the VLM server has
        a free slot (none waits, none is kept waiting), then validated and stored."""
        from mmpersona.models.remote import openai_messages
        from pipelines.memory import store_proposals

        lane = self.srv.remote
        if lane.in_flight + lane.waiting >= lane.concurrency:
            log.info("no memory proposals for this turn: the VLM server is busy")
            return []
        asked = await run_in_threadpool(extractor.request, self.srv.db, self.user, self.question, concepts)
        if asked is None:
            return []
        messages, handles = asked
        async with lane.slot():
            text = await pipe.vlm.remote.acomplete(openai_messages(pipe.vlm._prepared(messages)),
                                                   extractor.max_new_tokens)
        return await run_in_threadpool(store_proposals, self.srv.db, self.user, extractor.parse(text, handles),
                                       source="chat")

    @staticmethod
    async def _guarded(work: Any) -> list[Any]:
        try:
            return await work
        except Exception as e:  # noqa: BLE001 - proposals are never worth an answer
            log.info("no memory proposals for this turn: %s", e)
            return []


_LATER: set[asyncio.Task] = set()  # memory readings queued after their response (kept until they finish)


async def completion(common: dict[str, Any], pipe: Any, answer: Any, memo: Memo | None = None) -> JSONResponse:
    # a plain JSON body already: returned as is, not walked again by FastAPI's encoder
    extra = await memo.after(answer) if memo is not None else personal(answer)
    return JSONResponse({**common, "object": "chat.completion", "model": pipe.vlm.spec.id,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                                      "finish_reason": "stop"}],
                         "usage": None, "mmpersona": extra})


def sse(common: dict[str, Any], pipe: Any, pieces: AsyncIterator[str], result: Callable[[], Any],
        watch: Watch, memo: Memo | None = None) -> StreamingResponse:
    """The answer as server-sent events: OpenAI's chunks, then the `mmpersona` field and `[DONE]`. A client that
    leaves sets the request's `stop`, which ends the generation."""
    head = {**common, "object": "chat.completion.chunk", "model": pipe.vlm.spec.id}

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        body = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece in pieces:
                    if piece:
                        yield chunk({"content": piece})
            except Exception as e:  # noqa: BLE001 - the status is sent: the error goes in the stream
                err = as_api_error(e)
                yield f"data: {json.dumps(error_body(err.message, err.type, err.code))}\n\n"
                return
            answer = result()  # every piece is out: keeping the turn and proposing never delay the answer
            yield chunk({}, "stop", mmpersona=await memo.after(answer) if memo is not None else personal(answer))
            yield "data: [DONE]\n\n"
        finally:
            watch.stop.set()  # ended, or closed because the client left: the work stops

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _parts(message: ChatMessage, index: int) -> tuple[str, list[Any]]:
    """(text, image URLs) of one message."""
    content = message.content
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for part in content:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            images.append(ref.get("url") if isinstance(ref, dict) else ref)
        else:
            raise ApiError(400, f"messages[{index}]: content part type {kind!r} is not supported (text, image_url)")
    return "\n".join(texts), images


@dataclass
class Conversation:
    question: str
    image: bytes | None
    history: list[dict[str, Any]]
    system: str | None
    kept: str | None = None  # the kept conversation this turn goes to (NEW_CONVERSATION: one started for it)


def resume(talk: Conversation, conversation_id: str, user: str, srv: Server) -> None:
    """Continue a kept conversation (`conversation` in the request): its last turns before the request's messages,
    within the limits on history, and its last photo when the request sends none; the quota checked for the turn
    to be kept. Unknown ids (another user's included) are a 404 before any model work. At most `RESUMED_TURNS`
    kept turns, as a continued `ChatSession` has."""
    from pipelines.vlm import RESUMED_TURNS, resumed_history

    store, limits = srv.db.store, srv.limits
    kept_image = None
    if conversation_id != NEW_CONVERSATION:
        chat = store.conversation(user, conversation_id)
        room = min(RESUMED_TURNS, (limits.max_history - len(talk.history)) // 2)
        turns = store.turns(user, chat.id, last=room) if room > 0 else []
        budget = limits.max_history_chars - sum(len(p["text"]) for m in talk.history for p in m["content"])
        talk.history[:0] = resumed_history(turns, budget)
        last = turns[-1:] or (store.turns(user, chat.id, last=1) if chat.turns else [])
        last_image = last[0].image if last else None
        if talk.image is None and last_image is not None:
            talk.image = kept_image = store.image_bytes(user, last_image)
        elif talk.image is not None and last_image is not None and content_hash(talk.image) == last_image:
            kept_image = talk.image
    talk.kept = conversation_id
    store.check_quota(user, conversations=int(conversation_id == NEW_CONVERSATION), turns=1,
                      size=len(talk.image) if talk.image is not None and talk.image is not kept_image else 0)


def conversation(messages: list[ChatMessage], limits: ServeConfig) -> Conversation:
    """The question (the last message, the user's), the photo (the latest image sent: a conversation stays
    about its image until another is sent), the earlier turns as text and the client's system text."""
    *earlier, last = messages
    if last.role != "user":
        raise ApiError(400, f"the last message must be the user's, got role {last.role!r}")
    if len(earlier) > limits.max_history:
        raise ApiError(400, f"the conversation has {len(earlier)} earlier messages, over the limit of "
                            f"{limits.max_history}: send the most recent ones")
    systems, history, images, total = [], [], [], 0
    for i, m in enumerate(messages):
        text, urls = _parts(m, i)
        if m.role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}]: role {m.role!r} is not supported (system, user, assistant)")
        if urls and m.role != "user":
            raise ApiError(400, f"messages[{i}]: only the user's messages may carry images")
        if len(text) > limits.max_message_chars:
            raise ApiError(400, f"messages[{i}] is {len(text)} characters, over the limit of "
                                f"{limits.max_message_chars}")
        images += urls
        if m is last:
            break
        total += len(text)
        if m.role in ("system", "developer"):
            systems.append(text)
        elif text.strip():
            history.append({"role": m.role, "content": [{"type": "text", "text": text}]})
    if total > limits.max_history_chars:
        raise ApiError(400, f"the earlier messages are {total} characters, over the limit of "
                            f"{limits.max_history_chars}")
    if len(images) > limits.max_images:
        raise ApiError(400, f"the conversation has {len(images)} images, over the limit of {limits.max_images}")
    question, _ = _parts(last, len(messages) - 1)
    if not question.strip():
        raise ApiError(400, "the last message has no text: ask a question")
    image = data_url_bytes(images[-1], f"messages image {len(images)}") if images else None
    return Conversation(question, image, history, "\n".join(s for s in systems if s.strip()) or None)


def sampling(req: ChatRequest, limits: ServeConfig) -> dict[str, Any]:
    """Generation options in the pipeline's (transformers') terms."""
    asked = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    if asked > limits.max_tokens:
        raise ApiError(400, f"max_tokens {asked} is over the limit of {limits.max_tokens}")
    out: dict[str, Any] = {"max_new_tokens": asked}
    if req.seed is not None:  # else fresh entropy: no request's draws follow from another's (sampling.own_draws)
        out["seed"] = req.seed
    if req.temperature:
        out.update(do_sample=True, temperature=req.temperature)
        if req.top_p is not None:
            out["top_p"] = req.top_p
    return out


def personal(answer: Any, proposed: list[dict[str, Any]] | None = None, kept: str | None = None) -> dict[str, Any]:
    """The `mmpersona` field of a chat response: what personalization did (the concepts and memory entries used),
    what the turn proposes to remember and the conversation it was kept in (None: not kept)."""
    return {"retrieved": [r.to_dict() for r in answer.retrieved], "abstained": answer.abstained,
            "memory": [e.to_dict() for e in answer.memory], "proposed": proposed or [], "conversation": kept,
            "timings": {k: round(v, 3) for k, v in answer.timings.items()}}
