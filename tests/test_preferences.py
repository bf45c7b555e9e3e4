"""Preference profiles, the strict attribute parser, and the personal reward model."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmpersona import ConceptDB, ImageLoadError, MmpersonaError
from mmpersona.attributes import AttributeParseError, extract_attributes, parse_attributes
from mmpersona.preferences import PreferenceProfile
from mmpersona.reward import RewardModel, train_reward


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted(n_pairs, dim=32, seed=0, shuffle=False):
    rng = np.random.default_rng(seed)
    taste = unit(rng.normal(size=dim))
    a, b = unit(rng.normal(size=(n_pairs, dim))), unit(rng.normal(size=(n_pairs, dim)))
    a_wins = (a @ taste) > (b @ taste)
    if shuffle:
        a_wins = rng.permutation(a_wins)
    chosen = np.where(a_wins[:, None], a, b)
    rejected = np.where(a_wins[:, None], b, a)
    return chosen, rejected, taste


def test_reward_learns_a_planted_preference():
    chosen, rejected, taste = planted(400)
    model = train_reward("e", chosen=chosen, rejected=rejected)
    assert model.held_out_accuracy >= 0.9 and not model.cold_start and model.pairs == 400
    assert float(np.corrcoef(model.w, taste)[0, 1]) > 0.8


def test_reward_near_chance_on_shuffled_labels():
    chosen, rejected, _ = planted(400, shuffle=True)
    model = train_reward("e", chosen=chosen, rejected=rejected)
    assert 0.3 <= model.held_out_accuracy <= 0.7


def test_reward_from_likes_and_dislikes_and_cold_start():
    rng = np.random.default_rng(3)
    taste = unit(rng.normal(size=16))
    pool = unit(rng.normal(size=(200, 16)))
    likes, dislikes = pool[pool @ taste > 0.1], pool[pool @ taste < -0.1]
    model = train_reward("e", likes=likes, dislikes=dislikes)
    assert model.held_out_accuracy >= 0.9 and model.likes == len(likes)
    one_sided = train_reward("e", chosen=pool[:2], rejected=pool[2:4], likes=pool[:1],
                             dislikes=np.zeros((0, 16), np.float32), dim=16)
    assert not one_sided.cold_start and one_sided.dislikes == 0
    cold = train_reward("e", dim=16)
    assert cold.cold_start and np.all(cold.score(pool) == 0) and cold.held_out_accuracy is None
    restored = RewardModel.from_bytes(model.to_bytes())
    np.testing.assert_array_equal(restored.score(pool), model.score(pool))
    with pytest.raises(MmpersonaError, match=r"expects \(n, 16\)"):
        model.score(np.ones((2, 8)))
    with pytest.raises(MmpersonaError, match="3 chosen but 2 rejected"):
        train_reward("e", chosen=pool[:3], rejected=pool[:2])


@pytest.mark.parametrize("text,liked", [
    ('{"liked": ["warm light", "Warm light", "film grain"], "disliked": []}', ["warm light", "film grain"]),
    ('```json\n{"liked": ["pastel"], "disliked": ["neon"]}\n```', ["pastel"]),
])
def test_parse_attributes_accepts(text, liked):
    assert parse_attributes(text).liked == liked


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("I like warm light", "not JSON"),
    ('{"liked": ["a"]}', "exactly the keys"),
    ('{"liked": ["a"], "disliked": [], "extra": 1}', "exactly the keys"),
    ('{"liked": "a", "disliked": []}', "must be a list"),
    ('{"liked": [1], "disliked": []}', "must be a string"),
    ('{"liked": [" "], "disliked": []}', "is empty"),
    ('{"liked": ["' + "x" * 200 + '"], "disliked": []}', "short phrase"),
    ('[1, 2]', "JSON object"),
    ('{"liked": ["a"], "disliked": []} and more', "not JSON"),
])
def test_parse_attributes_rejects_without_half_parsing(text, reason):
    with pytest.raises(AttributeParseError, match=reason):
        parse_attributes(text)


class ScriptedVLM:
    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def generate(self, messages, max_new_tokens=0):
        self.seen.append(messages)
        return self.answers.pop(0)


def test_extract_attributes_retries_then_reports():
    vlm = ScriptedVLM(["sure! warm colours", '{"liked": ["warm colours"], "disliked": ["blur"]}'])
    got = extract_attributes(vlm, [("like", "love the warm colours"), ("dislike", "too blurry")])
    assert got.liked == ["warm colours"] and got.disliked == ["blur"]
    assert "not valid" in vlm.seen[1][-1]["content"][0]["text"]  # the retry said what was wrong
    with pytest.raises(AttributeParseError, match="3 attempts"):
        extract_attributes(ScriptedVLM(["no"] * 3), [("like", "nice")], retries=2)
    with pytest.raises(MmpersonaError, match="no comments"):
        extract_attributes(ScriptedVLM([]), [("like", "")])


def test_extract_attributes_with_the_real_tiny_vlm_reports_cleanly(tiny_cache):
    from mmpersona.models import load_vlm

    vlm = load_vlm("tiny:qwen2-vl", device="cpu")
    with pytest.raises(AttributeParseError, match="no valid attribute JSON in 2 attempts"):
        extract_attributes(vlm, [("like", "warm light")], retries=1, max_new_tokens=8)


def drawn(color):
    img = Image.new("RGB", (48, 48), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((8, 8, 40, 40), fill=color)
    return img


def test_profile_end_to_end(tmp_path, tiny_embedder):
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        alice, bob = PreferenceProfile(db, "alice"), PreferenceProfile(db, "bob")
        warm = [drawn((230, 60 + 10 * i, 20)) for i in range(6)]
        cold = [drawn((20, 60 + 10 * i, 230)) for i in range(6)]
        for w, c in zip(warm, cold, strict=True):
            alice.like(w, comment="warm tones")
            alice.dislike(c)
            alice.compare("a ball", w, c)
        alice.add_prompt("a ball on grass")
        assert alice.comments()[0] == ("like", "warm tones") and len(alice.events("pair")) == 6
        emb = alice.embeddings()
        assert emb["liked"].shape == (tiny_embedder.dim,) and abs(float(np.linalg.norm(emb["liked"])) - 1) < 1e-5
        assert bob.embeddings() == {"liked": None, "disliked": None} and bob.events() == []
        model = alice.train_reward()
        assert not model.cold_start and model.pairs == 6 and model.held_out_accuracy is not None
        scores = alice.reward().score(tiny_embedder.embed_images([warm[0], cold[0]]))
        assert scores[0] > scores[1]
        assert bob.reward().cold_start  # explicit cold start, not an error
        assert alice.set_attributes(liked=["warm tones"], disliked=["blue cast"]).liked == ["warm tones"]
        assert PreferenceProfile(db, "alice").attributes.disliked == ["blue cast"]
        with pytest.raises(AttributeParseError):
            alice.set_attributes(liked=["x" * 300])
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not an image")
        with pytest.raises(ImageLoadError, match="bad.png"):
            alice.like(bad)
        with pytest.raises(MmpersonaError, match="same image"):
            alice.compare("p", warm[0], warm[0])
        summary = alice.summary()
        assert summary["counts"] == {"like": 6, "dislike": 6, "pair": 6, "prompt": 1}
        json.dumps(summary)
        assert alice.reset() == 19 and alice.events() == [] and alice.reward().cold_start
        assert alice.attributes.liked == []


def test_profile_images_are_embedded_once_and_kept_with_the_profile(tmp_path, tiny_embedder, monkeypatch):
    """Training again (a new profile object: a new request to the server) decodes no image it has embedded."""
    def img(color):
        out = Image.new("RGB", (48, 48), (240, 240, 240))
        ImageDraw.Draw(out).ellipse((8, 8, 40, 40), fill=color)
        return out

    db = ConceptDB(tmp_path / "c.db", embedder=tiny_embedder)
    p = PreferenceProfile(db, "alice")
    p.like(img((200, 0, 0)))
    p.dislike(img((0, 0, 200)))
    p.compare("a dog", img((0, 200, 0)), img((200, 200, 0)))
    embedded = []
    real = db.embedder.embed_images
    monkeypatch.setattr(db.embedder, "embed_images", lambda images, **kw: embedded.append(len(images)) or
                        real(images, **kw))
    first = PreferenceProfile(db, "alice").train_reward()
    assert sum(embedded) == 4
    again = PreferenceProfile(db, "alice").train_reward()
    assert sum(embedded) == 4 and again.summary() == first.summary()
    PreferenceProfile(db, "alice").like(img((120, 0, 120)))
    PreferenceProfile(db, "alice").train_reward()
    assert sum(embedded) == 5  # only the new like
    assert PreferenceProfile(db, "bob").image_vectors([]).shape == (0, db.embedder.dim)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
def test_removing_an_event_untrains_what_was_learned_from_it(backend, tmp_path, tiny_embedder, request):
    """A like the user takes back leaves no trace in what was learned from the profile: the reward model, the
    LoRA and the cached image vectors trained on it go with it (to be trained again on what is left); another
    user's stay, and so do the user's artefacts not learned from the profile."""
    from safetensors.numpy import save

    from concept_db.types import PROFILE_ARTEFACTS
    from mmpersona.preferences import PROFILE_VECTORS_BLOB, USER_EMBEDDING_BLOB
    from mmpersona.reward import BLOB_NAME
    from pipelines.t2i import LORA_BLOB

    assert set(PROFILE_ARTEFACTS) == {BLOB_NAME, LORA_BLOB, USER_EMBEDDING_BLOB, PROFILE_VECTORS_BLOB}
    url = str(tmp_path / "c.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    with ConceptDB(url, embedder=tiny_embedder) as db:
        profiles = {user: PreferenceProfile(db, user) for user in ("alice", "bob")}
        for user, p in profiles.items():
            p.like(drawn((200, 30, 30)))
            p.dislike(drawn((30, 30, 200)))
            p.user_embedding()
            assert not p.train_reward().cold_start
            db.store.put_blob(user, LORA_BLOB, save({"w": np.ones(2, np.float32)}), model="m")
            db.store.put_blob(user, "concept_tokens", save({"t": np.zeros(2, np.float32)}), model="m")
        assert db.store.get_blob("alice", PROFILE_VECTORS_BLOB) is not None
        removed = db.store.delete_profile_event("alice", profiles["alice"].events("like")[0].id)
        assert removed == sorted(PROFILE_ARTEFACTS)
        alice = PreferenceProfile(db, "alice")
        assert alice.reward().cold_start and all(db.store.get_blob("alice", n) is None for n in PROFILE_ARTEFACTS)
        assert db.store.get_blob("alice", "concept_tokens") is not None  # not learned from the profile
        assert not PreferenceProfile(db, "bob").reward().cold_start
        assert all(db.store.get_blob("bob", n) is not None for n in PROFILE_ARTEFACTS)
        assert not alice.train_reward().cold_start  # trained again on the dislike that is left
        last = alice.events("dislike")[0].id
        assert db.store.delete_profile_event("alice", last) == sorted([BLOB_NAME, PROFILE_VECTORS_BLOB])
