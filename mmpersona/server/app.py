"""The HTTP API (`mmpersona serve`): concepts, personalized chat and generation, preference events, per user.

Every route under `/v1` needs an API key (`Authorization: Bearer <key>`), and the key's user is the only user
a request can read or change. Chat speaks OpenAI's chat completions protocol (streaming by server-sent
events), so any OpenAI client is a client; generation takes the shape of `/v1/images/generations`. Model work
(embedding, retrieval, generation) runs in one worker thread from a bounded queue (`worker.ModelWorker`): a full
queue is a 429 with Retry-After. Every failure is a JSON body `{"error": {"message", "type", "code"}}`, as
OpenAI's API sends.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import MmpersonaError
from ..images import load_image
from .worker import ModelWorker, QueueFull

if TYPE_CHECKING:
    from mmpersona.conceptdb import ConceptDB
    from pipelines.t2i import PersonalizedT2IPipeline
    from pipelines.vlm import PersonalizedVLMPipeline

    from .keys import KeyStore

logger = logging.getLogger("mmpersona.server")


@dataclass(frozen=True)
class ServeConfig:
    """What one request may ask of the shared models and the server; over a limit is a clear 4xx."""

    max_body_bytes: int = 32 * 2**20
    max_images: int = 4  # images in one chat request (the latest is the photo asked about)
    max_upload_images: int = 16  # images in one concept upload
    max_history: int = 32  # earlier messages in one chat request
    max_message_chars: int = 8_000
    max_history_chars: int = 32_000
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_n: int = 4
    default_steps: int = 30
    max_steps: int = 50
    max_side: int = 1024
    max_prompt_chars: int = 2_000
    max_list: int = 500
    queue_size: int = 8

    def __post_init__(self):
        from dataclasses import fields

        low = [f.name for f in fields(self) if getattr(self, f.name) < 1]
        if low:
            raise MmpersonaError(f"server limit {low[0]} must be at least 1, got {getattr(self, low[0])}")
        for default, limit in (("default_max_tokens", "max_tokens"), ("default_steps", "max_steps")):
            if getattr(self, default) > getattr(self, limit):
                raise MmpersonaError(f"{default} ({getattr(self, default)}) is over {limit} ({getattr(self, limit)})")


class ApiError(Exception):
    """An error with its HTTP status and OpenAI-style type and code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str = "invalid_request",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type, code, headers


def error_body(message: str, type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": None}}


def as_api_error(exc: BaseException) -> ApiError:
    """Our exceptions as HTTP errors: the message is the library's own (written for the user)."""
    from concept_db.types import ConceptNotFound, DuplicateConceptError

    from ..errors import ModelUnavailableError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "server_busy", "queue_full", {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ConceptNotFound):
        return ApiError(404, str(exc.args[0]) if exc.args else "not found", "not_found_error", "not_found")
    if isinstance(exc, DuplicateConceptError):
        return ApiError(409, str(exc), "conflict_error", "conflict")
    if isinstance(exc, ModelUnavailableError):
        return ApiError(503, str(exc), "server_error", "model_unavailable")
    if isinstance(exc, MmpersonaError):
        return ApiError(400, str(exc), "invalid_request_error", "invalid_request")
    ref = uuid.uuid4().hex[:12]
    logger.error("internal error %s", ref, exc_info=exc)
    return ApiError(500, f"internal server error (logged as {ref})", "server_error", "internal_error")


def error_response(exc: BaseException) -> JSONResponse:
    e = as_api_error(exc)
    return JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status, headers=e.headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before it is read further (by
    its Content-Length, or as it arrives when it is sent in chunks)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _too_big(self.limit)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(too_big)(scope, receive, send)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig
            return message

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooBig:
            if not started:
                await error_response(too_big)(scope, receive, send)


class _TooBig(Exception):
    pass


def _too_big(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the limit of {limit} bytes", "invalid_request_error",
                    "request_too_large")


# ------------------------------------------------------------------------------------------ requests


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat completions request; fields it has that a personalized answer cannot honour are refused."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field("mmpersona", description="Ignored: the server serves one chat model (see /v1/models).")
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="Absent or 0: greedy decoding.")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="One answer per request.")
    regions: bool = Field(False, description="mmpersona: also retrieve per detected region of the photo.")


class ImageRequest(BaseModel):
    """The shape of OpenAI's `/v1/images/generations`, plus mmpersona's own fields."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(..., min_length=1)
    model: str | None = Field(None, description="Ignored: the server serves one image model.")
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's).")
    response_format: Literal["b64_json", "url"] = "b64_json"
    strategies: list[str] | None = Field(None, description="mmpersona: the personalization strategies "
                                                           "(default: the server's).")
    steps: int | None = Field(None, ge=1, description="mmpersona: denoising steps (default: the server's).")
    seed: int = 0
    guidance_scale: float = Field(7.5, ge=0, le=50)


class ConceptPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    category: str | None = None
    info: str | None = None
    aliases: list[str] | None = None
    attributes: dict[str, Any] | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="A data URL (data:image/png;base64,...).")
    k: int = Field(5, ge=1, le=50)
    category: str | None = None
    min_score: float | None = None


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["like", "dislike", "pair", "prompt"]
    image: str | None = Field(None, description="like / dislike: the image, a data URL.")
    comment: str = ""
    prompt: str = Field("", description="pair / prompt: the prompt.")
    chosen: str | None = Field(None, description="pair: the preferred image, a data URL.")
    rejected: str | None = Field(None, description="pair: the other image, a data URL.")


class AttributesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    liked: list[str] | None = None
    disliked: list[str] | None = None


# ------------------------------------------------------------------------------------------ conversions

_DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.I)


def data_url_bytes(url: Any, what: str = "image") -> bytes:
    """The bytes of a base64 data URL. The server fetches no URL (that would let a client make it reach any host
    it can reach)."""
    if not isinstance(url, str):
        raise ApiError(400, f"{what} must be a data URL string (data:image/png;base64,...)")
    m = _DATA_URL.match(url)
    if m is None:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise ApiError(400, f"{what} must be a base64 data URL (data:image/png;base64,...), got {shown!r}: the "
                            "server does not fetch URLs")
    try:
        return base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{what} is not valid base64 ({e})") from None


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
    if req.temperature:
        out.update(do_sample=True, temperature=req.temperature)
        if req.top_p is not None:
            out["top_p"] = req.top_p
    return out


def parse_size(size: str | None, limits: ServeConfig) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if m is None:
        raise ApiError(400, f"size must be WIDTHxHEIGHT (e.g. 512x512), got {size!r}")
    w, h = int(m[1]), int(m[2])
    if not (8 <= w <= limits.max_side and 8 <= h <= limits.max_side) or w % 8 or h % 8:
        raise ApiError(400, f"size {size}: each side must be a multiple of 8 between 8 and {limits.max_side}")
    return w, h


def png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------ the models


class Served:
    """One pipeline the server serves: given, or built (in the model worker) on first use by `make`."""

    def __init__(self, what: str, value: Any):
        self.what = what
        self._value = None if callable(value) and not hasattr(value, "db") else value
        self._make: Callable[[], Any] | None = value if self._value is None else None
        self._variants: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return "loaded" if self._value is not None else "not served" if self._make is None else "not loaded"

    def get(self) -> Any:
        with self._lock:
            if self._value is None:
                if self._make is None:
                    raise ApiError(503, f"this server serves no {self.what} model", "server_error",
                                   "not_served")
                self._value = self._make()
            return self._value

    def variant(self, **options: Any) -> Any:
        """The pipeline with `options` changed (built once), for the VLM's `regions`."""
        base = self.get()
        if not options:
            return base
        key = tuple(sorted(options.items()))
        with self._lock:
            if key not in self._variants:
                self._variants[key] = base.variant(**options)
            return self._variants[key]


def preload_models(app: FastAPI) -> None:
    """Build the app's models now (else on first use), on the model worker's thread: a model that cannot be had
    fails here, with its error.

    On the worker's thread, where every model job runs, so that one thread owns all of torch's work: torch
    computing on two threads starts two OpenMP thread teams, which oversubscribe the cores (on 2 cores, the tiny
    VLM's answers on the worker took about a quarter longer once the main thread had computed too).
    """
    for served in (app.state.chat, app.state.images):
        if served.state == "not loaded":
            app.state.worker.submit(served.get).result()


def _chat_pipeline(pipe: "PersonalizedVLMPipeline") -> "PersonalizedVLMPipeline":
    """The server's own copy: a key's user who has no concepts yet is answered, not refused."""
    out = pipe.variant()
    out.require_concepts = False
    return out


# ------------------------------------------------------------------------------------------ the app


def create_app(db: "ConceptDB", keys: "KeyStore", *, vlm: "PersonalizedVLMPipeline | Callable | None" = None,
               t2i: "PersonalizedT2IPipeline | Callable | None" = None, config: ServeConfig | None = None,
               worker: ModelWorker | None = None) -> FastAPI:
    """The API over `db`, with users' keys in `keys`.

    `vlm` / `t2i`: the chat and generation pipelines (on `db`), or functions that build them (called in the
    model worker on first use), or None for a server without that part.
    """
    limits = config or ServeConfig()
    worker = worker or ModelWorker(limits.queue_size)
    chat_model = Served("chat", (lambda: _chat_pipeline(vlm())) if callable(vlm) and not hasattr(vlm, "db")
                        else _chat_pipeline(vlm) if vlm is not None else None)
    image_model = Served("image", t2i)
    bearer = HTTPBearer(auto_error=False, description="An API key from `mmpersona keys create --user NAME`.")

    app = FastAPI(title="mmpersona", version=__version__,
                  description="Personalized chat (OpenAI-compatible) and generation, your concepts and your "
                              "preference profile. Every /v1 route takes `Authorization: Bearer <API key>`; the "
                              "key's user is the only user a request reaches.")
    app.state.worker, app.state.limits, app.state.chat, app.state.images = worker, limits, chat_model, image_model
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    async def on_error(request: Request, exc: Exception):
        return error_response(exc)

    # ours are answered where they are raised; anything else is a 500 (logged, with a reference)
    for kind in (ApiError, MmpersonaError, QueueFull, Exception):
        app.add_exception_handler(kind, on_error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, _TooBig):  # the body limit, met while FastAPI parsed the body
            return error_response(_too_big(limits.max_body_bytes))
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(exc.detail), kind, None), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request"), status_code=400)

    async def user_of(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        # async: a dict lookup and one stat, not worth a threadpool hop on every request
        if credentials is None:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>` (create a key with "
                                "`mmpersona keys create --user NAME`)", "authentication_error", "missing_api_key")
        user = keys.user_for(credentials.credentials)
        if user is None:
            raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
        return user

    async def model_job(fn: Callable[[], Any]) -> Any:
        return await worker.run(fn)

    # -------------------------------------------------------------- service

    @app.get("/health", tags=["service"])
    def health() -> dict[str, Any]:
        """Liveness and load: the models' state and the worker queue (no key needed, nothing personal)."""
        return {"status": "ok", "version": __version__,
                "models": {"chat": chat_model.state, "images": image_model.state},
                "queue": {"waiting": worker.waiting, "size": worker.queue_size, "busy": worker.busy}}

    @app.get("/v1/models", tags=["service"])
    def models(user: str = Depends(user_of)) -> dict[str, Any]:
        data = []
        for served, kind in ((chat_model, "chat"), (image_model, "images")):
            if served.state == "loaded":
                pipe = served.get()
                spec = (pipe.vlm if kind == "chat" else pipe.t2i).spec
                data.append({"id": spec.id, "object": "model", "created": 0, "owned_by": "mmpersona",
                             "mmpersona": {"kind": kind}})
            elif served.state == "not loaded":
                data.append({"id": f"mmpersona-{kind}", "object": "model", "created": 0, "owned_by": "mmpersona",
                             "mmpersona": {"kind": kind, "state": "not loaded"}})
        return {"object": "list", "data": data}

    # -------------------------------------------------------------- chat

    @app.post("/v1/chat/completions", tags=["chat"])
    async def chat_completions(req: ChatRequest, user: str = Depends(user_of)):
        """A personalized answer: your concepts retrieved for the photo and the question, then the model's
        reply (streamed as server-sent events with `stream: true`). The response's `mmpersona` field lists the
        concepts used."""
        talk = conversation(req.messages, limits)
        options = sampling(req, limits)
        seed = req.seed
        # the photo is decoded (and a bad one refused) here, before it takes a place in the model queue
        photo = await run_in_threadpool(load_image, talk.image) if talk.image is not None else None

        def pipeline():
            pipe = chat_model.variant(regions=True, assign=True) if req.regions else chat_model.get()
            if seed is not None:
                _seed(pipe, seed, options)
            return pipe

        common = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        if not req.stream:
            answer = await model_job(lambda: pipeline()(photo, talk.question, user=user, history=talk.history,
                                                        system=talk.system, **options))
            # a plain JSON body already: returned as is, not walked again by FastAPI's encoder
            return JSONResponse({**common, "object": "chat.completion", "model": chat_model.get().vlm.spec.id,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                                              "finish_reason": "stop"}],
                                 "usage": None, "mmpersona": personal(answer)})

        def start():
            stream = pipeline().stream(photo, talk.question, user=user, history=talk.history,
                                       system=talk.system, **options)
            return stream, iter(stream)

        stream, pieces = await worker.stream(start)
        head = {**common, "object": "chat.completion.chunk", "model": stream.pipe.vlm.spec.id}

        async def events():
            def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
                body = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
                return f"data: {json.dumps(body)}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece in pieces:
                    if piece:
                        yield chunk({"content": piece})
            except Exception as e:  # noqa: BLE001 - the status is sent: the error goes in the stream
                err = as_api_error(e)
                yield f"data: {json.dumps(error_body(err.message, err.type, err.code))}\n\n"
                return
            yield chunk({}, "stop", mmpersona=personal(stream.result))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------------- generation

    @app.post("/v1/images/generations", tags=["images"])
    async def images_generations(req: ImageRequest, user: str = Depends(user_of)):
        """Personalized images for `prompt` (the `strategies` use your profile), as base64 PNG; the
        `mmpersona` field has each image's metadata and personal reward score."""
        if req.response_format == "url":
            raise ApiError(400, "response_format 'url' is not offered: images are returned inline as b64_json")
        if req.n > limits.max_n:
            raise ApiError(400, f"n {req.n} is over the limit of {limits.max_n}")
        steps = req.steps or limits.default_steps
        if steps > limits.max_steps:
            raise ApiError(400, f"steps {steps} is over the limit of {limits.max_steps}")
        if len(req.prompt) > limits.max_prompt_chars:
            raise ApiError(400, f"the prompt is {len(req.prompt)} characters, over the limit of "
                                f"{limits.max_prompt_chars}")
        width, height = parse_size(req.size, limits)

        def job():
            return image_model.get()(req.prompt, user=user, n=req.n, steps=steps, seed=req.seed,
                                     guidance_scale=req.guidance_scale, strategies=req.strategies, width=width,
                                     height=height)

        result = await model_job(job)
        encoded = await run_in_threadpool(lambda: [png_b64(img) for img in result.images])
        return {"created": int(time.time()),
                "data": [{"b64_json": data, "revised_prompt": meta["final_prompt"]}
                         for data, meta in zip(encoded, result.metadata, strict=True)],
                "mmpersona": {"metadata": result.metadata, "scores": result.scores}}

    # -------------------------------------------------------------- concepts

    async def read_uploads(files: list[UploadFile]) -> list[bytes]:
        if len(files) > limits.max_upload_images:
            raise ApiError(400, f"{len(files)} images at once is over the limit of {limits.max_upload_images}")
        return [await f.read() for f in files]

    @app.get("/v1/concepts", tags=["concepts"])
    def concepts_list(category: str | None = None, limit: int = Query(100, ge=1), offset: int = Query(0, ge=0),
                      user: str = Depends(user_of)) -> dict[str, Any]:
        if limit > limits.max_list:
            raise ApiError(400, f"limit {limit} is over the limit of {limits.max_list}")
        found = db.list(user, category=category, limit=limit, offset=offset)
        return {"object": "list", "data": [c.to_dict() for c in found]}

    @app.post("/v1/concepts", tags=["concepts"], status_code=201)
    async def concepts_create(name: str = Form(..., description="The concept's name, e.g. bo or <bo>."),
                              category: str = Form(""), info: str = Form(""), aliases: list[str] = Form([]),
                              images: list[UploadFile] = File([], description="Reference photos."),
                              user: str = Depends(user_of)) -> dict[str, Any]:
        """Register a concept with its reference photos (multipart form); nothing is stored if one is bad."""
        datas = await read_uploads(images)
        concept = await model_job(lambda: db.add(user, name, datas, category=category, info=info, aliases=aliases))
        return concept.to_dict()

    @app.get("/v1/concepts/{ref}", tags=["concepts"])
    def concepts_show(ref: str, user: str = Depends(user_of)) -> dict[str, Any]:
        """One concept by name (`<bo>` or `bo`), alias or id."""
        return db.resolve(user, ref).to_dict()

    @app.patch("/v1/concepts/{ref}", tags=["concepts"])
    def concepts_edit(ref: str, patch: ConceptPatch, user: str = Depends(user_of)) -> dict[str, Any]:
        fields = {k: v for k, v in patch.model_dump().items() if v is not None}
        return db.update(user, ref, **fields).to_dict()

    @app.delete("/v1/concepts/{ref}", tags=["concepts"])
    def concepts_delete(ref: str, user: str = Depends(user_of)) -> dict[str, Any]:
        concept = db.delete(user, ref)
        return {"id": concept.id, "object": "concept", "deleted": True}

    @app.post("/v1/concepts/{ref}/images", tags=["concepts"])
    async def concepts_add_images(ref: str, images: list[UploadFile] = File(...),
                                  user: str = Depends(user_of)) -> dict[str, Any]:
        datas = await read_uploads(images)
        return (await model_job(lambda: db.add_images(user, ref, datas))).to_dict()

    @app.delete("/v1/concepts/{ref}/images/{image_hash}", tags=["concepts"])
    def concepts_remove_image(ref: str, image_hash: str, user: str = Depends(user_of)) -> dict[str, Any]:
        return db.remove_image(user, ref, image_hash).to_dict()

    @app.post("/v1/concepts/search", tags=["concepts"])
    async def concepts_search(req: SearchRequest, user: str = Depends(user_of)) -> dict[str, Any]:
        """Your concepts most like a photo (`image`, a data URL) or a description (`text`)."""
        if (req.text is None) == (req.image is None):
            raise ApiError(400, "send exactly one of `text` and `image`")
        options = {"k": req.k, "category": req.category, "min_score": req.min_score}
        if req.text is not None:
            if not req.text.strip() or len(req.text) > limits.max_message_chars:
                raise ApiError(400, f"`text` must be 1 to {limits.max_message_chars} characters")
            found = await model_job(lambda: db.search_text(user, req.text, **options))
        else:
            photo = await run_in_threadpool(load_image, data_url_bytes(req.image))
            found = await model_job(lambda: db.search_image(user, photo, **options))
        return {"object": "list", "data": [m.to_dict() for m in found]}

    @app.get("/v1/media/{image_hash}", tags=["concepts"], response_class=Response)
    def media(image_hash: str, user: str = Depends(user_of)) -> Response:
        """One of your stored images (a concept's or the profile's) by content hash."""
        data = db.store.image_bytes(user, image_hash)
        return Response(data, media_type=_media_type(data), headers={"Cache-Control": "private, max-age=86400"})

    # -------------------------------------------------------------- preference profile

    def profile(user: str):
        from mmpersona.preferences import PreferenceProfile

        return PreferenceProfile(db, user)

    @app.get("/v1/profile", tags=["profile"])
    def profile_show(user: str = Depends(user_of)) -> dict[str, Any]:
        """Counts, attributes and the reward model's state."""
        return profile(user).summary()

    @app.get("/v1/profile/events", tags=["profile"])
    def profile_events(kind: Literal["like", "dislike", "pair", "prompt"] | None = None,
                       user: str = Depends(user_of)) -> dict[str, Any]:
        return {"object": "list", "data": [e.to_dict() for e in profile(user).events(kind)]}

    @app.post("/v1/profile/events", tags=["profile"], status_code=201)
    def profile_record(event: EventRequest, user: str = Depends(user_of)) -> dict[str, Any]:
        """Record a like or dislike (`image`, optional `comment`), a pairwise choice (`prompt`, `chosen`,
        `rejected`) or a prompt."""
        p = profile(user)
        if event.kind in ("like", "dislike"):
            if event.image is None:
                raise ApiError(400, f"a {event.kind} needs `image`")
            e = getattr(p, event.kind)(data_url_bytes(event.image), comment=event.comment)
        elif event.kind == "pair":
            if event.chosen is None or event.rejected is None or not event.prompt.strip():
                raise ApiError(400, "a pair needs `prompt`, `chosen` and `rejected`")
            e = p.compare(event.prompt, data_url_bytes(event.chosen, "chosen"),
                          data_url_bytes(event.rejected, "rejected"), comment=event.comment)
        else:
            if not event.prompt.strip():
                raise ApiError(400, "a prompt event needs `prompt`")
            e = p.add_prompt(event.prompt)
        return e.to_dict()

    @app.delete("/v1/profile/events/{event_id}", tags=["profile"])
    def profile_forget(event_id: str, user: str = Depends(user_of)) -> dict[str, Any]:
        db.store.delete_profile_event(user, event_id)
        return {"id": event_id, "object": "profile.event", "deleted": True}

    @app.get("/v1/profile/attributes", tags=["profile"])
    def attributes_show(user: str = Depends(user_of)) -> dict[str, Any]:
        return profile(user).attributes.to_dict()

    @app.put("/v1/profile/attributes", tags=["profile"])
    def attributes_edit(body: AttributesBody, user: str = Depends(user_of)) -> dict[str, Any]:
        return profile(user).set_attributes(body.liked, body.disliked).to_dict()

    @app.post("/v1/profile/reward", tags=["profile"])
    async def reward_train(user: str = Depends(user_of)) -> dict[str, Any]:
        """Train your reward model on your pairs, likes and dislikes (it reranks your images)."""
        return (await model_job(lambda: profile(user).train_reward())).summary()

    @app.delete("/v1/profile", tags=["profile"])
    def profile_reset(user: str = Depends(user_of)) -> dict[str, Any]:
        """Forget your whole preference profile."""
        return {"removed": profile(user).reset()}

    return app


def personal(answer: Any) -> dict[str, Any]:
    """The `mmpersona` field of a chat response: what personalization did."""
    return {"retrieved": [r.to_dict() for r in answer.retrieved], "abstained": answer.abstained,
            "timings": {k: round(v, 3) for k, v in answer.timings.items()}}


def _seed(pipe: Any, seed: int, options: dict[str, Any]) -> None:
    """A request's `seed`: the server's sampling for a remote VLM, torch's generator here."""
    if pipe.vlm.remote is not None:
        options["seed"] = seed
    else:
        import torch

        torch.manual_seed(seed)


def _media_type(data: bytes) -> str:
    for magic, kind in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"RIFF", "image/webp"), (b"BM", "image/bmp")):
        if data.startswith(magic):
            return kind
    return "application/octet-stream"
