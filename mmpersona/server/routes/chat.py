"""Personalized chat in OpenAI's chat completions protocol (streamed as server-sent events on request)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...images import load_image
from ..config import ServeConfig
from ..dependencies import Server, server, user_of
from ..errors import ApiError, as_api_error, error_body
from ..media import data_url_bytes
from ..schemas import ChatMessage, ChatRequest

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, user: str = Depends(user_of), srv: Server = Depends(server)):
    """A personalized answer: your concepts retrieved for the photo and the question, then the model's
    reply (streamed as server-sent events with `stream: true`). The response's `mmpersona` field lists the
    concepts used."""
    talk = conversation(req.messages, srv.limits)
    options = sampling(req, srv.limits)
    seed = req.seed
    # the photo is decoded (and a bad one refused) here, before it takes a place in the model queue
    photo = await run_in_threadpool(load_image, talk.image) if talk.image is not None else None

    def pipeline():
        pipe = srv.chat.variant(regions=True, assign=True) if req.regions else srv.chat.get()
        if seed is not None:
            _seed(pipe, seed, options)
        return pipe

    common = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
    if not req.stream:
        answer = await srv.worker.run(lambda: pipeline()(photo, talk.question, user=user, history=talk.history,
                                                         system=talk.system, **options))
        # a plain JSON body already: returned as is, not walked again by FastAPI's encoder
        return JSONResponse({**common, "object": "chat.completion", "model": srv.chat.get().vlm.spec.id,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                                          "finish_reason": "stop"}],
                             "usage": None, "mmpersona": personal(answer)})

    def start():
        stream = pipeline().stream(photo, talk.question, user=user, history=talk.history,
                                   system=talk.system, **options)
        return stream, iter(stream)

    stream, pieces = await srv.worker.stream(start)
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

