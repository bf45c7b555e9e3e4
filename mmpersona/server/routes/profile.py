"""Your preference profile: likes, dislikes, pairs and prompts, the attributes, the reward model."""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from concept_db import ProfileChanged

from ...images import encoded_pixels
from ..dependencies import Server, server, user_of
from ..errors import ApiError
from ..media import data_url_bytes
from ..scheduler import Watch
from ..schemas import AttributesBody, EventRequest

if TYPE_CHECKING:
    from pipelines.taste import TastePool

router = APIRouter(tags=["profile"])
logger = logging.getLogger(__name__)
#: the model worker's queue the shared taste pool is generated in (no API user's share: their names have no NUL)
POOL_QUEUE = "\x00taste-pool"


def profile(srv: Server, user: str):
    from mmpersona.preferences import PreferenceProfile

    return PreferenceProfile(srv.db, user)


@router.get("/v1/profile")
def profile_show(user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    """Counts, attributes and the reward model's state."""
    return profile(srv, user).summary()


@router.get("/v1/profile/next-pair")
async def next_pair(request: Request, order: Literal["active", "random"] = "active", step: int | None = None,
                    user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    """The next two images to choose between, to learn your taste (record your choice as a `pair` event with
    `prompt`, `chosen` and `rejected`).

    `order` "active" (default): the pair whose answer is expected to teach your profile the most, from a pool of
    vanilla images of built-in prompts shared by every user (no one's data); a pair you were shown is not shown
    again. The pool is generated in the background, two images at a time while the model has nothing else to do
    (started by the first such request); until it is complete the fixed order answers (the answer's `order` says
    which). "random": the fixed order, two fresh images of the built-in prompt number `step` (default: your
    number of choices)."""
    from pipelines.taste import TASTE_PROMPTS, fixed_pair, pick_pair, taste_pool, user_choices

    limits = srv.limits
    if step is not None and not 0 <= step <= 1_000_000:
        raise ApiError(400, f"step must be between 0 and 1000000, got {step}")
    async with Watch(request) as watch:
        pipe = srv.images.loaded() or await srv.worker.run(srv.images.get, user=user, stop=watch.stop)
        steps = limits.default_steps
        pair = None
        if order == "active":
            pool = taste_pool(pipe, steps)
            if pool.complete:
                # the user's image vectors through the model worker (new ones are embedded), the choice beside it
                choices = await srv.worker.run(lambda: user_choices(pipe, user), user=user, stop=watch.stop)
                pair = await run_in_threadpool(pick_pair, pool, choices, srv.taste.of(user))
                if pair is not None:
                    srv.taste.add(user, pair)
            else:
                fill_in_background(srv, pipe, pool)
        if pair is None:  # the fixed order, the pool not complete yet, or every pair of it answered
            at = step if step is not None else len(profile(srv, user).events("pair"))
            pair = await srv.worker.run(lambda: fixed_pair(pipe, user, TASTE_PROMPTS, at, steps, stop=watch.stop),
                                        user=user, stop=watch.stop)
    encoded = [base64.b64encode(data).decode("ascii") for data in pair.images]
    return {"object": "profile.pair", "prompt": pair.prompt, "order": pair.order, "information": pair.information,
            "seeds": list(pair.seeds), "images": [{"b64_json": data} for data in encoded]}


def fill_in_background(srv: Server, pipe, pool: "TastePool") -> None:
    """Generate the shared taste pool unless that is under way: one chunk per background job of the model worker
    (`submit_idle`: it starts only when no request waits and gives way to one that arrives), each queuing the next
    when it ends. No request waits for the pool (the first one used to wait for all 48 images)."""
    from pipelines.taste import POOL_USER

    from ...cancel import Cancelled
    from ..worker import QueueFull

    if pool.complete or not srv.taste_filling.acquire(blocking=False):
        return

    def chunk(stop) -> None:
        todo = pool.chunks()
        if todo:
            pool.fill(pipe, todo[0], POOL_USER, stop=stop)

    def ended(future) -> None:
        srv.taste_filling.release()
        error = future.exception() if not future.cancelled() else Cancelled()
        if error is None or isinstance(error, Cancelled):  # given way too often: queued again, behind requests
            fill_in_background(srv, pipe, pool)
        else:  # the fixed order goes on answering; the next request starts it again
            logger.warning("the taste pool could not be generated: %s", error)

    try:
        future = srv.worker.submit_idle(chunk, user=POOL_QUEUE, yields=True)
    except (QueueFull, RuntimeError):  # busy with other background work, or closing: a later request starts it
        srv.taste_filling.release()
        return
    future.add_done_callback(ended)


@router.get("/v1/profile/events")
def profile_events(kind: Literal["like", "dislike", "pair", "prompt"] | None = None,
                   user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    return {"object": "list", "data": [e.to_dict() for e in profile(srv, user).events(kind)]}


@router.post("/v1/profile/events", status_code=201)
async def profile_record(event: EventRequest, user: str = Depends(user_of),
                         srv: Server = Depends(server)) -> dict[str, Any]:
    """Record a like or dislike (`image`, optional `comment`), a pairwise choice (`prompt`, `chosen`,
    `rejected`) or a prompt."""
    p = profile(srv, user)
    if event.kind in ("like", "dislike"):
        if event.image is None:
            raise ApiError(400, f"a {event.kind} needs `image`")
        images = [data_url_bytes(event.image)]
        record = lambda: getattr(p, event.kind)(images[0], comment=event.comment)  # noqa: E731
    elif event.kind == "pair":
        if event.chosen is None or event.rejected is None or not event.prompt.strip():
            raise ApiError(400, "a pair needs `prompt`, `chosen` and `rejected`")
        images = [data_url_bytes(event.chosen, "chosen"), data_url_bytes(event.rejected, "rejected")]
        record = lambda: p.compare(event.prompt, *images, comment=event.comment)  # noqa: E731
    else:
        if not event.prompt.strip():
            raise ApiError(400, "a prompt event needs `prompt`")
        images, record = [], lambda: p.add_prompt(event.prompt)
    # the images are decoded (checked) before they are stored: within the server's pixel budget
    hold = await srv.decode.acquire(sum(encoded_pixels(data) for data in images))
    try:
        return (await run_in_threadpool(record)).to_dict()
    finally:
        hold.release()


@router.delete("/v1/profile/events/{event_id}")
def profile_forget(event_id: str, user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    removed = srv.db.store.delete_profile_event(user, event_id)
    # what was learned from the profile went with it (the reward model, the LoRA): train them again to use them
    return {"id": event_id, "object": "profile.event", "deleted": True, "artefacts_removed": removed}


@router.get("/v1/profile/attributes")
def attributes_show(user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    return profile(srv, user).attributes.to_dict()


@router.put("/v1/profile/attributes")
def attributes_edit(body: AttributesBody, user: str = Depends(user_of),
                    srv: Server = Depends(server)) -> dict[str, Any]:
    return profile(srv, user).set_attributes(body.liked, body.disliked).to_dict()


@router.post("/v1/profile/reward")
async def reward_train(user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    """Train your reward model on your pairs, likes and dislikes (it reranks your images).

    If your profile is reset, or loses an entry, while the model trains, nothing is stored and the answer is
    409 with code `profile_changed`: train again. Entries added meanwhile do not count as a change: the model
    returned (and stored) fits the entries the training read, and the next training adds the new ones."""
    try:
        model = await srv.worker.run(lambda: profile(srv, user).train_reward(), user=user)
    except ProfileChanged as e:
        raise ApiError(409, str(e), "conflict_error", "profile_changed") from e
    return model.summary()


@router.delete("/v1/profile")
def profile_reset(user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    """Forget your whole preference profile."""
    return {"removed": profile(srv, user).reset()}
