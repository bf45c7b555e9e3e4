"""Your concepts: list, create (multipart, with photos), show, edit, delete, their images, search, stored media."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ...images import encoded_pixels, load_image
from ..config import ServeConfig
from ..dependencies import Server, server, user_of
from ..errors import ApiError
from ..media import data_url_bytes, media_type
from ..scheduler import Watch
from ..schemas import INT_MAX, ConceptPatch, ProposedConcept, SearchRequest

router = APIRouter(tags=["concepts"])


async def read_uploads(files: list[UploadFile], limits: ServeConfig) -> list[bytes]:
    if len(files) > limits.max_upload_images:
        raise ApiError(400, f"{len(files)} images at once is over the limit of {limits.max_upload_images}")
    return [await f.read() for f in files]


@router.get("/v1/concepts")
def concepts_list(category: str | None = None, limit: int = Query(100, ge=1, le=INT_MAX),
                  offset: int = Query(0, ge=0, le=INT_MAX),
                  user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    if limit > srv.limits.max_list:
        raise ApiError(400, f"limit {limit} is over the limit of {srv.limits.max_list}")
    found = srv.db.list(user, category=category, limit=limit, offset=offset)
    return {"object": "list", "data": [c.to_dict() for c in found]}


@router.post("/v1/concepts", status_code=201)
async def concepts_create(request: Request,
                          name: str = Form(..., description="The concept's name, e.g. bo or <bo>."),
                          category: str = Form(""), info: str = Form(""), aliases: list[str] = Form([]),
                          images: list[UploadFile] = File([], description="Reference photos."),
                          user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    """Register a concept with its reference photos (multipart form); nothing is stored if one is bad."""
    datas = await read_uploads(images, srv.limits)
    async with Watch(request) as watch:
        concept = await srv.worker.run(lambda: srv.db.add(user, name, datas, category=category, info=info,
                                                          aliases=aliases), user=user, stop=watch.stop)
    return concept.to_dict()


@router.post("/v1/concepts/proposed", status_code=201)
async def concepts_from_proposal(body: ProposedConcept, request: Request, user: str = Depends(user_of),
                                 srv: Server = Depends(server)) -> dict[str, Any]:
    """Confirm a concept a chat turn proposed (`mmpersona.proposed_concepts`, "this is my friend Anna"): made from
    the proposal's region of the photo, named by the content hash of a kept turn's photo or sent as a data URL."""
    from pipelines.introductions import accept

    async with Watch(request) as watch:
        if body.image.startswith("data:"):
            data = data_url_bytes(body.image, "image")
        else:
            data = await run_in_threadpool(srv.db.store.image_bytes, user, body.image)
        watch.on_end((await srv.decode.acquire(encoded_pixels(data))).release)
        photo = await run_in_threadpool(load_image, data)
        proposal = body.model_dump(exclude={"image"})
        concept = await srv.worker.run(lambda: accept(srv.db, user, proposal, photo), user=user, stop=watch.stop)
    return concept.to_dict()


@router.get("/v1/concepts/{ref}")
def concepts_show(ref: str, user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    """One concept by name (`<bo>` or `bo`), alias or id."""
    return srv.db.resolve(user, ref).to_dict()


@router.patch("/v1/concepts/{ref}")
def concepts_edit(ref: str, patch: ConceptPatch, user: str = Depends(user_of),
                  srv: Server = Depends(server)) -> dict[str, Any]:
    fields = {k: v for k, v in patch.model_dump().items() if v is not None}
    return srv.db.update(user, ref, **fields).to_dict()


@router.delete("/v1/concepts/{ref}")
def concepts_delete(ref: str, user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    concept = srv.db.delete(user, ref)
    return {"id": concept.id, "object": "concept", "deleted": True}


@router.post("/v1/concepts/{ref}/images")
async def concepts_add_images(ref: str, request: Request, images: list[UploadFile] = File(...),
                              user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    datas = await read_uploads(images, srv.limits)
    async with Watch(request) as watch:
        concept = await srv.worker.run(lambda: srv.db.add_images(user, ref, datas), user=user, stop=watch.stop)
    return concept.to_dict()


@router.delete("/v1/concepts/{ref}/images/{image_hash}")
def concepts_remove_image(ref: str, image_hash: str, user: str = Depends(user_of),
                          srv: Server = Depends(server)) -> dict[str, Any]:
    return srv.db.remove_image(user, ref, image_hash).to_dict()


@router.post("/v1/concepts/search")
async def concepts_search(req: SearchRequest, request: Request, user: str = Depends(user_of),
                          srv: Server = Depends(server)) -> dict[str, Any]:
    """Your concepts most like a photo (`image`, a data URL) or a description (`text`)."""
    if (req.text is None) == (req.image is None):
        raise ApiError(400, "send exactly one of `text` and `image`")
    options = {"k": req.k, "category": req.category, "min_score": req.min_score}
    if req.text is not None:
        if not req.text.strip() or len(req.text) > srv.limits.max_message_chars:
            raise ApiError(400, f"`text` must be 1 to {srv.limits.max_message_chars} characters")
    data = data_url_bytes(req.image) if req.image is not None else None
    async with Watch(request) as watch:
        if data is None:
            query, kind = req.text, "text"
        else:
            watch.on_end((await srv.decode.acquire(encoded_pixels(data))).release)
            query, kind = await run_in_threadpool(load_image, data), "image"
        # embedded in one call with the other searches waiting (each user's own search after that)
        found = await srv.worker.run_batched(("search", kind), (user, query, options),
                                             partial(search_batch, srv.db, kind), user=user, stop=watch.stop)
    return {"object": "list", "data": [m.to_dict() for m in found]}


def search_batch(db: Any, kind: str, items: list[tuple[str, Any, dict[str, Any]]]) -> list[Any]:
    """Searches of several requests: their queries (all texts or all photos) embedded in one call, then each
    user's concepts searched with their own vector. An embedding that fails is tried again alone, so that one
    request's bad input fails only that request."""
    embed = db.embedder.embed_texts if kind == "text" else db.embedder.embed_images
    try:
        vectors = list(embed([query for _, query, _ in items]))
    except Exception:  # noqa: BLE001 - which one failed: each alone
        vectors = []
        for _, query, _ in items:
            try:
                vectors.append(embed([query])[0])
            except Exception as e:  # noqa: BLE001 - this request's error
                vectors.append(e)
    out: list[Any] = []
    for (user, _, options), vector in zip(items, vectors, strict=True):
        try:
            if isinstance(vector, BaseException):
                raise vector
            out.append(db.store.search(user, vector, embedder=db.embedder.name, **options))
        except Exception as e:  # noqa: BLE001 - this request's error
            out.append(e)
    return out


@router.get("/v1/media/{image_hash}", response_class=Response)
def media(image_hash: str, user: str = Depends(user_of), srv: Server = Depends(server)) -> Response:
    """One of your stored images (a concept's, the profile's or a kept conversation's) by content hash."""
    data = srv.db.store.image_bytes(user, image_hash)
    return Response(data, media_type=media_type(data), headers={"Cache-Control": "private, max-age=86400"})
