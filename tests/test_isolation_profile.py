"""Two isolation properties of the text-to-image side ("Hostile users, round three").

- The IP-Adapter image embeddings are cached per user: another user's use of an image never makes a user's own
  use of it faster (the encoder runs for bob whatever alice liked or registered), and the cache stays bounded.
- A reward model is stored only if the profile it was trained on lost nothing meanwhile: a reset (or a removed
  entry) during a training makes it end with `ProfileChanged` (HTTP 409, `profile_changed`) and store nothing,
  on both backends, through the library, the HTTP API and the app. Entries added during a training do not
  discard it: the model is trained on what the profile held when the training read it, all of it still there.

Trainings are held at a known point by a hook (`Held`), never by sleeping.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_server import data_url, drawn, error_of

import mmpersona.preferences as preferences
from concept_db import ProfileChanged, open_store
from mmpersona import ConceptDB, PreferenceProfile
from mmpersona.reward import BLOB_NAME
from servers import in_thread

WAIT = 60  # seconds a held step may take at most (a bound on a failure, not a delay: nothing sleeps)


# ------------------------------------------------------------------------------------------ IP-Adapter cache


@pytest.fixture(scope="module")
def t2i(tmp_path_factory, tiny_embedder, tiny_cache):
    from pipelines import PersonalizedT2IPipeline

    db = ConceptDB(tmp_path_factory.mktemp("ip-cache") / "c.db", embedder=tiny_embedder)
    yield PersonalizedT2IPipeline(db, role="t2i", preset="tiny", device="cpu")
    db.close()


@pytest.fixture
def encoded(t2i):
    """The images the IP-Adapter's image encoder encodes (one forward pass each), as a list that grows."""
    calls = []
    hook = t2i.diffusers.image_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    yield calls
    hook.remove()


def steer(t2i, prompt, user):
    cond, _ = t2i.condition(prompt, user, t2i._strategies(["subject", "ip_adapter"]))
    return cond


def test_another_users_image_is_encoded_afresh_for_bob(t2i, encoded):
    """Alice's likes (even one she took back) and her concept's images never make bob's generation faster:
    bob's first use of the same images runs the encoder for each; alice's own repeat runs it for none."""
    liked, subject, own = drawn((220, 120, 20)), drawn((30, 60, 200), kind="rectangle"), drawn((40, 170, 60))
    alice = PreferenceProfile(t2i.db, "alice")
    taken_back = alice.like(liked)
    alice.like(own)
    t2i.db.add("alice", "<bo>", [subject], category="dog")
    first = steer(t2i, "a photo of <bo>", "alice")
    assert len(encoded) == 3 and first.notes["ip_adapter"]["liked"] == 2
    t2i.db.store.delete_profile_event("alice", taken_back.id)

    PreferenceProfile(t2i.db, "bob").like(liked)
    t2i.db.add("bob", "<rex>", [subject], category="dog")
    encoded.clear()
    bobs = steer(t2i, "a photo of <rex>", "bob")
    assert len(encoded) == 2, "bob was served embeddings computed for alice"
    encoded.clear()
    again = steer(t2i, "a photo of <rex>", "bob")
    assert len(encoded) == 0  # bob's own repeat is cached
    for a, b in zip(bobs.ip_positive, again.ip_positive, strict=True):
        assert a.equal(b)
    steer(t2i, "a photo of <bo>", "alice")
    assert len(encoded) == 0  # and so is alice's


def test_the_ip_embedding_cache_is_bounded_per_user_and_in_users(t2i, encoded, monkeypatch):
    from pipelines.caching import UserCache

    cache = UserCache(per_user=2, users=2)
    monkeypatch.setattr(t2i, "ip_cache", cache)
    users = ["u1", "u2", "u3"]
    for u, user in enumerate(users):
        for i in range(3):
            PreferenceProfile(t2i.db, user).like(drawn((10 + 80 * u, 20 + 70 * i, 200)))
    first = {}
    for user in users:
        first[user] = steer(t2i, "a ball", user).ip_positive[0]
        assert len(cache) <= 4 and all(cache.size(u) <= 2 for u in users)
    assert len(encoded) == 9 and cache.users() == ["u2", "u3"]  # u1, the least recently used, went first
    encoded.clear()
    assert steer(t2i, "a ball", "u1").ip_positive[0].equal(first["u1"])  # recomputed alike
    assert len(encoded) == 3 and len(cache) <= 4 and cache.users() == ["u3", "u1"]
    with pytest.raises(ValueError, match="per_user"):
        UserCache(per_user=0)
    default = type(t2i)(t2i.db, t2i=t2i.t2i).ip_cache
    assert default.per_user * default.max_users <= 8192  # a few tens of MiB of embeddings at most


# ------------------------------------------------------------------------------------------ reward training


class Held:
    """Holds every reward training after it has read the profile (inside `train_reward`, the fit), until
    `release`; `started` is set once a training is held."""

    def __init__(self, monkeypatch):
        self.started, self.released = threading.Event(), threading.Event()
        fit = preferences.train_reward

        def held(*args, **kwargs):
            self.started.set()
            assert self.released.wait(WAIT), "the test never released the training"
            return fit(*args, **kwargs)

        monkeypatch.setattr(preferences, "train_reward", held)

    def wait(self):
        assert self.started.wait(WAIT), "the training never started"

    def release(self):
        self.released.set()


PNGS = [drawn((200, 40 + 40 * i, 30)) for i in range(4)]


def fill(profile: PreferenceProfile) -> None:
    profile.like(PNGS[0], comment="warm")
    profile.dislike(PNGS[1])
    profile.compare("a ball", PNGS[2], PNGS[3])


@pytest.fixture
def db(db_url, tiny_embedder):
    database = ConceptDB(db_url, embedder=tiny_embedder)
    yield database
    database.close()


@pytest.mark.parametrize("change", ["reset", "remove one"])
def test_a_training_whose_profile_lost_entries_stores_nothing(db, monkeypatch, change):
    fill(PreferenceProfile(db, "alice"))
    fill(PreferenceProfile(db, "bob"))
    bobs = PreferenceProfile(db, "bob").train_reward()
    held = Held(monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(PreferenceProfile(db, "alice").train_reward)
        held.wait()
        if change == "reset":
            assert PreferenceProfile(db, "alice").reset() == 3
        else:
            db.store.delete_profile_event("alice", db.store.profile_events("alice", "like")[0].id)
        held.release()
        with pytest.raises(ProfileChanged, match="nothing was stored"):
            training.result(WAIT)
    assert db.store.get_blob("alice", BLOB_NAME) is None
    assert PreferenceProfile(db, "alice").reward().cold_start
    if change == "reset":
        assert db.store.blob_names("alice") == []  # nor any other artefact derived from the old events
    # bob's model is his own business, and alice can train again on what her profile holds now
    assert PreferenceProfile(db, "bob").reward().to_bytes() == bobs.to_bytes()
    held.release()
    again = PreferenceProfile(db, "alice").train_reward()
    assert again.cold_start if change == "reset" else (again.likes, again.pairs) == (0, 1)


def test_entries_added_during_a_training_keep_its_result(db, monkeypatch):
    """The result fits the events the training read, every one of them still in the profile: it is stored."""
    fill(PreferenceProfile(db, "alice"))
    held = Held(monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(PreferenceProfile(db, "alice").train_reward)
        held.wait()
        PreferenceProfile(db, "alice").like(drawn((250, 250, 10)))
        held.release()
        model = training.result(WAIT)
    assert (model.likes, model.dislikes, model.pairs) == (1, 1, 1)
    assert PreferenceProfile(db, "alice").reward().to_bytes() == model.to_bytes()


def test_the_generation_check_is_in_the_write_and_survives_reopening(db_url):
    """`put_blob(..., profile_generation=)` refuses in its own transaction; the counter is per user, only
    removals move it, and it is kept in the database (a new connection sees it)."""
    import numpy as np
    from safetensors.numpy import save

    blob = save({"w": np.zeros(2, np.float32)})
    store = open_store(db_url)
    try:
        g = store.profile_generation("alice")
        store.add_profile_event("alice", "like", images=[b"a"])
        assert store.profile_generation("alice") == g  # an addition is not a change that discards
        store.put_blob("alice", "reward_model", blob, model="m", profile_generation=g)
        store.reset_profile("alice")
        assert store.profile_generation("alice") > g and store.profile_generation("bob") == 0
        with pytest.raises(ProfileChanged):
            store.put_blob("alice", "reward_model", blob, model="m", profile_generation=g)
        assert store.blob_names("alice") == []
        store.put_blob("bob", "reward_model", blob, model="m", profile_generation=0)  # bob's is his own
        g = store.profile_generation("alice")
        store.erase_owner("alice")
        assert store.profile_generation("alice") > g  # erasing never brings an old generation back
    finally:
        store.close()
    again = open_store(db_url)
    try:
        assert again.profile_generation("alice") > g and again.blob_names("bob") == ["reward_model"]
    finally:
        again.close()


def test_a_schema_4_sqlite_database_gains_the_counter(tmp_path):
    """An existing database (written before the profile generations) opens, upgraded, with its events."""
    import sqlite3

    from concept_db.sqlite import SCHEMA_MIGRATIONS, _statements

    path = tmp_path / "old.db"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.create_function("mmp_hash_key", 1, lambda h: 0)
    raw.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied REAL)")
    for version, sql in SCHEMA_MIGRATIONS[:4]:
        for statement in _statements(sql):
            raw.execute(statement)
        raw.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
    raw.execute("INSERT INTO profile_events VALUES ('e1', 'alice', 'prompt', 'a ball', NULL, NULL, '', 1)")
    raw.close()
    store = open_store(str(path))
    try:
        assert store.schema_version == len(SCHEMA_MIGRATIONS) and store.profile_generation("alice") == 0
        assert store.reset_profile("alice") == 1 and store.profile_generation("alice") == 1
    finally:
        store.close()


# ------------------------------------------------------------------------------------------ over HTTP


@pytest.fixture
def api(db, tmp_path):
    from mmpersona.server import KeyStore, ServeConfig, create_app

    keys = KeyStore(tmp_path / "keys.json")
    key = {user: keys.create(user)[1] for user in ("alice", "bob")}
    app = create_app(db, keys, config=ServeConfig())
    with in_thread(app) as url:
        yield lambda user: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key[user]}"},
                                        timeout=WAIT)


def record(http, i=0):
    for event in ({"kind": "like", "image": data_url(PNGS[0])}, {"kind": "dislike", "image": data_url(PNGS[1])},
                  {"kind": "pair", "prompt": f"a ball {i}", "chosen": data_url(PNGS[2]),
                   "rejected": data_url(PNGS[3])}):
        assert http.post("/v1/profile/events", json=event).status_code == 201


def test_reset_during_a_training_over_http_is_a_409_and_stores_nothing(api, db, monkeypatch):
    with api("alice") as alice, api("alice") as alice_again, api("bob") as bob:
        record(alice)
        record(bob)
        assert bob.post("/v1/profile/reward").status_code == 200
        held = Held(monkeypatch)
        with ThreadPoolExecutor(1) as pool:
            training = pool.submit(alice.post, "/v1/profile/reward")
            held.wait()
            assert alice_again.delete("/v1/profile").json() == {"removed": 3}
            held.release()
            r = training.result(WAIT)
        assert r.status_code == 409, r.text
        error = error_of(r)
        assert error["code"] == "profile_changed" and "reset" in error["message"]
        assert "nothing was stored" in error["message"]
        assert alice.get("/v1/profile").json()["reward_model"] == {"cold_start": True}
        assert db.store.blob_names("alice") == []
        assert bob.get("/v1/profile").json()["reward_model"]["pairs"] == 1
        # entries added during a training keep its result (it fits what it read, all of it still there)
        record(alice, 1)
        with ThreadPoolExecutor(1) as pool:
            training = pool.submit(alice.post, "/v1/profile/reward")
            held.wait()
            record(alice_again, 2)
            held.release()
            r = training.result(WAIT)
        assert r.status_code == 200 and r.json()["pairs"] == 1
        assert alice.get("/v1/profile").json()["reward_model"]["pairs"] == 1


# ------------------------------------------------------------------------------------------ in the app


def test_the_apps_trainings_follow_the_same_rule(db, monkeypatch, tmp_path, tiny_cache):
    """The background training (every TRAIN_EVERY choices) and the Train button (`App.train_reward`): a reset
    during either stores nothing and says so on the page."""
    from mmpersona.app.state import App

    app = App(preset="tiny", db_path=tmp_path / "unused.db", device="cpu")
    app.db.close()
    app.db = db
    fill(app.profile("alice"))
    held = Held(monkeypatch)
    app.train_in_background("alice")
    held.wait()
    thread = next(t for t in threading.enumerate() if t.name == "reward-alice")
    assert app.training_status("alice").startswith("training")
    app.profile("alice").reset()
    held.release()
    thread.join(WAIT)
    assert not thread.is_alive()
    status = app.training_status("alice")
    assert "reset" in status and "nothing was stored" in status, status
    assert db.store.get_blob("alice", BLOB_NAME) is None

    fill(app.profile("alice"))
    held.started.clear()
    held.released.clear()
    with ThreadPoolExecutor(1) as pool:
        pressed = pool.submit(app.train_reward, "alice")
        held.wait()
        app.profile("alice").reset()
        held.release()
        status = pressed.result(WAIT)
    assert "reset" in status and "nothing was stored" in status, status
    assert db.store.get_blob("alice", BLOB_NAME) is None
    fill(app.profile("alice"))
    assert "reward model trained on 1 choice(s), 1 like(s), 1 dislike(s)" in app.train_reward("alice")
    assert db.store.get_blob("alice", BLOB_NAME) is not None
