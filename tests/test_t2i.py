"""PersonalizedT2IPipeline end to end on tiny SD and tiny SDXL (real diffusers classes, tiny weights)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmpersona import ConceptDB, MmpersonaError
from mmpersona.preferences import PreferenceProfile
from pipelines import PersonalizedT2IPipeline
from pipelines.t2i import STRATEGIES, IPAdapterConfig, UnknownStrategyError


def drawn(color, kind="ellipse"):
    img = Image.new("RGB", (48, 48), (240, 240, 240))
    getattr(ImageDraw.Draw(img), kind)((8, 8, 40, 40), fill=color)
    return img


@pytest.fixture(scope="module")
def db(tmp_path_factory, tiny_embedder):
    database = ConceptDB(tmp_path_factory.mktemp("t2i") / "c.db", embedder=tiny_embedder)
    database.add("alice", "<bo>", [drawn((200, 30, 30))], category="dog", info="a shiba")
    profile = PreferenceProfile(database, "alice")
    for i in range(3):
        profile.like(drawn((230, 80 + 20 * i, 20)), comment="warm")
        profile.dislike(drawn((20, 80 + 20 * i, 230), "rectangle"))
        profile.compare("a ball", drawn((230, 90, 20 + i)), drawn((20, 90, 230 - i), "rectangle"))
    profile.set_attributes(liked=["warm light", "film grain"], disliked=["blue cast"])
    profile.train_reward()
    yield database
    database.close()


@pytest.fixture(scope="module", params=["t2i", "t2i_xl"])
def pipe(request, db, tiny_cache):
    return PersonalizedT2IPipeline(db, role=request.param, preset="tiny", device="cpu")


def count_unet_calls(pipe):
    calls = []
    unet = pipe.diffusers.unet
    original = unet.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0] if args else kwargs["sample"].shape[0])
        return original(*args, **kwargs)

    unet.forward = counting
    return calls, lambda: setattr(unet, "forward", original)


def test_attributes_one_unet_pass_per_step(pipe):
    calls, restore = count_unet_calls(pipe)
    try:
        vanilla = pipe("a ball", user="alice", steps=3, strategies=[])
        n_vanilla = len(calls)
        steered = pipe("a ball", user="alice", steps=3, strategies=["attributes"])
    finally:
        restore()
    # one (CFG-batched) UNet call per scheduler step, both times (SD 1.5's PNDM takes one step more than asked)
    passes = len(pipe.diffusers.scheduler.timesteps)
    assert passes in (3, 4) and n_vanilla == passes and len(calls) - n_vanilla == passes
    meta = steered.metadata[0]
    assert meta["final_prompt"] == "a ball, warm light, film grain" and meta["negative_prompt"] == "blue cast"
    assert not np.array_equal(np.asarray(vanilla.images[0]), np.asarray(steered.images[0]))


def test_ip_adapter_embeds_shape_and_order(pipe):
    cond, run = pipe.condition("a ball", "alice", pipe._strategies(["ip_adapter"]))
    embeds = pipe.ip_adapter_embeds(cond, do_cfg=True)
    dim = pipe.diffusers.image_encoder.config.projection_dim
    assert len(embeds) == 1 and tuple(embeds[0].shape) == (2, 1, dim)
    liked = run.image_embeds([e.image for e in run.profile.events("like")]).mean(0)
    disliked = run.image_embeds([e.image for e in run.profile.events("dislike")]).mean(0)
    torch.testing.assert_close(embeds[0][0, 0], disliked.to(embeds[0].dtype))  # negative half first
    torch.testing.assert_close(embeds[0][1, 0], liked.to(embeds[0].dtype))
    assert tuple(pipe.ip_adapter_embeds(cond, do_cfg=False)[0].shape) == (1, 1, dim)
    out = pipe("a ball", user="alice", steps=2, strategies=["ip_adapter"])
    assert out.metadata[0]["notes"]["ip_adapter"] == {"liked": 3, "disliked": 3, "scale": 0.6}


def test_subject_brings_reference_images(pipe):
    cond, _ = pipe.condition("a photo of <bo> at the beach", "alice", pipe._strategies(["subject", "ip_adapter"]))
    assert cond.prompt == "a photo of dog at the beach" and len(cond.ip_positive) == 2  # subject + liked
    embeds = pipe.ip_adapter_embeds(cond, do_cfg=True)[0]
    assert embeds.shape[:2] == (2, 2)
    out = pipe("a photo of <bo> at the beach", user="alice", steps=2, strategies=["subject", "ip_adapter"])
    assert out.images[0].size == (64, 64) and out.metadata[0]["notes"]["subject"] == {"concepts": ["<bo>"]}
    with pytest.raises(MmpersonaError, match="<rex> is not in 'alice'"):
        pipe("a photo of <rex>", user="alice", steps=1, strategies=["subject"])


def test_rerank_orders_by_reward_and_sidecar_metadata(pipe):
    out = pipe("a ball", user="alice", n=2, steps=2, strategies=["rerank"], seed=5)
    assert len(out.images) == 2 and out.scores[0] >= out.scores[1]
    meta = out.metadata[0]
    assert meta["candidates"] == 8 and meta["seed"] in range(5, 13) and meta["reward_score"] == out.scores[0]
    assert set(meta["strategies"]) == {"rerank"} and meta["model"] == pipe.t2i.spec.id
    json.dumps(out.metadata)
    calls, restore = count_unet_calls(pipe)
    try:
        cold = pipe("a ball", user="newcomer", steps=1, strategies=["rerank", "attributes", "ip_adapter"])
    finally:
        restore()
    assert cold.scores == [0.0] and cold.metadata[0]["reward_cold_start"] is True
    assert cold.metadata[0]["notes"]["ip_adapter"] == {"skipped": "the user has no liked images"}
    # without a reward model there is nothing to rank by: one candidate, not four
    assert cold.metadata[0]["candidates"] == 1 and cold.metadata[0]["notes"]["rerank"]["candidates"] == 1
    assert sum(calls) == 2 * len(pipe.diffusers.scheduler.timesteps)  # one image (CFG pair) per step


def test_candidates_in_batches_give_the_same_images(pipe):
    """`batch_size` bounds how many images one diffusers call makes (memory on consumer GPUs); every image
    keeps its own seed, so the images are the same."""
    whole = pipe("a ball", user="alice", n=3, steps=2, strategies=["attributes"], seed=1)
    calls, restore = count_unet_calls(pipe)
    pipe.batch_size = 1
    try:
        parts = pipe("a ball", user="alice", n=3, steps=2, strategies=["attributes"], seed=1)
    finally:
        pipe.batch_size = None
        restore()
    assert max(calls) == 2  # one image (with its CFG twin) per call
    for a, b in zip(whole.images, parts.images, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_same_seed_same_image(pipe):
    a = pipe("a ball", user="alice", steps=2, strategies=["attributes"], seed=3).images[0]
    b = pipe("a ball", user="alice", steps=2, strategies=["attributes"], seed=3).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_input(db, pipe):
    with pytest.raises(UnknownStrategyError, match="valid: attributes, ip_adapter, lora, preference, rerank, subject, viper"):
        pipe("a ball", user="alice", strategies=["sparkle"])
    with pytest.raises(MmpersonaError, match="`prompt` must be a non-empty string"):
        pipe("  ", user="alice")
    with pytest.raises(MmpersonaError, match="takes a IPAdapterConfig"):
        PersonalizedT2IPipeline(db, t2i=pipe.t2i, configs={"ip_adapter": 3})
    with pytest.raises(MmpersonaError, match="has no LoRA yet"):
        pipe("a ball", user="alice", strategies=["lora"], steps=1)
    assert set(STRATEGIES) == {"attributes", "ip_adapter", "subject", "lora", "rerank", "preference", "viper"}
    assert IPAdapterConfig().scale == 0.6


def test_other_users_never_change_alice_images(pipe, db):
    """Non-interference for generation: alice's images, scores and conditioning for a fixed seed are
    bit-identical after another user stored her very images, a forged `<bo>`, opposite tastes and a reward model
    of their own, and generated first through a fresh pipeline (so the shared IP-Adapter cache was filled by
    them)."""
    strategies = ["attributes", "ip_adapter", "subject", "rerank"]
    prompt = "a photo of <bo> on a lawn"
    before = pipe(prompt, user="alice", n=2, steps=2, seed=3, strategies=strategies)
    mallory = PreferenceProfile(db, "mallory")
    for i in range(3):  # alice's own liked and disliked images, with the opposite verdicts
        mallory.dislike(drawn((230, 80 + 20 * i, 20)), comment="cold")
        mallory.like(drawn((20, 80 + 20 * i, 230), "rectangle"))
        mallory.compare("a ball", drawn((20, 90, 230 - i), "rectangle"), drawn((230, 90, 20 + i)))
    mallory.set_attributes(liked=["blue cast"], disliked=["warm light"])
    mallory.train_reward()
    dim = db.embedder.dim
    db.store.add("mallory", "bo", images=[db.store.image_bytes("alice", db.get("alice", "<bo>").images[0])],
                 embeddings={db.embedder.name: np.ones((1, dim), np.float32)}, info="forged")
    fresh = PersonalizedT2IPipeline(db, t2i=pipe.t2i)
    fresh(prompt, user="mallory", n=2, steps=2, seed=3, strategies=strategies)
    after = fresh(prompt, user="alice", n=2, steps=2, seed=3, strategies=strategies)
    assert [np.asarray(i).tobytes() for i in after.images] == [np.asarray(i).tobytes() for i in before.images]
    assert after.scores == before.scores

    def untimed(metadata):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metadata]

    assert untimed(after.metadata) == untimed(before.metadata)
    db.erase_user("mallory")
