"""Your preference profile: likes, dislikes, pairs and prompts, the attributes, the reward model."""

from __future__ import annotations

import base64
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from concept_db import ProfileChanged

from ...images import encoded_pixels
from ..dependencies import Server, server, user_of
from ..errors import ApiError
from ..media import data_url_bytes
from ..scheduler import Watch
from ..schemas import AttributesBody, EventRequest

router = APIRouter(tags=["profile"])


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
    vanilla images of built-in prompts shared by every user (no one's data; generated on first use, two images
    per queued job, so other requests go between them); a pair you were shown is not shown again. "random": the
    fixed order, two fresh images of the built-in prompt number `step` (default: your number of choices)."""
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
            for chunk in pool.chunks():
                await srv.worker.run(lambda c=chunk: pool.fill(pipe, c, user, stop=watch.stop), user=user,
                                     stop=watch.stop)
            # the user's image vectors through the model worker (new ones are embedded), the choice beside it
            choices = await srv.worker.run(lambda: user_choices(pipe, user), user=user, stop=watch.stop)
            pair = await run_in_threadpool(pick_pair, pool, choices, srv.taste.of(user))
            if pair is not None:
                srv.taste.add(user, pair)
        if pair is None:  # the fixed order, or every pair of the pool answered
            at = step if step is not None else len(profile(srv, user).events("pair"))
            pair = await srv.worker.run(lambda: fixed_pair(pipe, user, TASTE_PROMPTS, at, steps, stop=watch.stop),
                                        user=user, stop=watch.stop)
    encoded = [base64.b64encode(data).decode("ascii") for data in pair.images]
    return {"object": "profile.pair", "prompt": pair.prompt, "order": pair.order, "information": pair.information,
            "seeds": list(pair.seeds), "images": [{"b64_json": data} for data in encoded]}


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
