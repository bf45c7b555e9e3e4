"""Personalized generation in the shape of OpenAI's `/v1/images/generations`."""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ..config import ServeConfig
from ..dependencies import Server, server, user_of
from ..errors import ApiError
from ..media import png_b64
from ..scheduler import Watch
from ..schemas import ImageRequest

router = APIRouter(tags=["images"])


@router.post("/v1/images/generations")
async def images_generations(req: ImageRequest, request: Request, user: str = Depends(user_of),
                             srv: Server = Depends(server)):
    """Personalized images for `prompt` (the `strategies` use your profile), as base64 PNG; the
    `mmpersona` field has each image's metadata and personal reward score."""
    limits = srv.limits
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
    async with Watch(request) as watch:
        pipe = srv.images.loaded() or await srv.worker.run(srv.images.get, user=user, stop=watch.stop)
        within_budget(pipe, req, steps, width, height, limits)
        pipe.check_inputs(req.prompt, user, req.n, steps, req.seed, req.strategies)  # the seeds' range too

        def job():
            return pipe(req.prompt, user=user, n=req.n, steps=steps, seed=req.seed, guidance_scale=req.guidance_scale,
                        strategies=req.strategies, width=width, height=height, stop=watch.stop)

        result = await srv.worker.run(job, user=user, stop=watch.stop)
    encoded = await run_in_threadpool(lambda: [png_b64(img) for img in result.images])
    return {"created": int(time.time()),
            "data": [{"b64_json": data, "revised_prompt": meta["final_prompt"]}
                     for data, meta in zip(encoded, result.metadata, strict=True)],
            "mmpersona": {"metadata": result.metadata, "scores": result.scores}}


def within_budget(pipe: Any, req: ImageRequest, steps: int, width: int | None, height: int | None,
                  limits: ServeConfig) -> None:
    """Refuse (400) a generation that costs more than the server allows, before it queues: a side over twice
    the model's native size (attention grows with the square of the pixels), or more image-steps at the native
    size than `max_image_steps` (images, reranking's candidates included, x steps x pixels / native pixels)."""
    native = pipe.native_size
    most = limits.largest_side(native)
    if max(width or native, height or native) > most:
        raise ApiError(400, f"size {width}x{height}: this model ({native}x{native} native) takes sides up to {most}")
    work = pipe.work(n=req.n, steps=steps, width=width, height=height, strategies=req.strategies)
    if work > limits.max_image_steps:
        raise ApiError(400, f"this request is {work:.0f} image-steps at the model's native size (images, "
                            f"reranking's candidates included, x steps x pixels / {native}x{native}), over the "
                            f"limit of {limits.max_image_steps}: ask for fewer images, steps or pixels")


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

