"""Taste in fewer clicks: the most informative next pair (elicitation), the rerank's diversity floor, the Taste
pool through the app and the API, and the LoRA's diversity watch."""

import base64
import io
import itertools
import time

import numpy as np
import pytest
from PIL import Image

from mmpersona import ConceptDB, MmpersonaError
from mmpersona import diversity as diversity_module
from mmpersona.diversity import diversity, select_diverse
from mmpersona.elicitation import information, next_pair, posterior


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def simulate(order: str, seed: int, clicks: int = 12, dim: int = 8, pool: int = 40):
    """The cosine of the learned direction with a planted taste after `clicks` choices asked in `order`."""
    rng = np.random.default_rng(seed)
    taste = unit(rng.normal(size=dim))
    vectors = unit(rng.normal(size=(pool, dim)))
    keys = [str(i) for i in range(pool)]
    chosen, rejected, asked = [], [], set()
    for click in range(clicks):
        pick = next_pair(vectors, [0] * pool, keys, chosen=np.array(chosen).reshape(-1, dim),
                         rejected=np.array(rejected).reshape(-1, dim), asked=asked, order=order, seed=seed + click)
        asked.add(frozenset((keys[pick.a], keys[pick.b])))
        a, b = (pick.a, pick.b) if vectors[pick.a] @ taste > vectors[pick.b] @ taste else (pick.b, pick.a)
        chosen.append(vectors[a])
        rejected.append(vectors[b])
    mean = posterior(np.array(chosen), np.array(rejected)).mean
    return float(unit(mean) @ taste)


def test_active_pairs_learn_a_planted_taste_faster_than_random_ones():
    active = np.mean([simulate("active", s) for s in range(12)])
    random = np.mean([simulate("random", s) for s in range(12)])
    assert active > random + 0.05, (active, random)


def test_the_first_pair_is_the_most_different_and_no_pair_comes_back():
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(6, 4)))
    keys = list("abcdef")
    pick = next_pair(vectors, [0] * 6, keys, chosen=np.zeros((0, 4)), rejected=np.zeros((0, 4)))
    distances = {(i, j): np.linalg.norm(vectors[i] - vectors[j]) for i in range(6) for j in range(i + 1, 6)}
    assert (pick.a, pick.b) == max(distances, key=distances.get) and pick.information > 0
    asked: set = set()
    seen = []
    while (pick := next_pair(vectors, [0, 0, 0, 1, 1, 1], keys, chosen=np.zeros((0, 4)), rejected=np.zeros((0, 4)),
                             asked=asked)) is not None:
        assert (pick.a < 3) == (pick.b < 3) and pick.prompt == (0 if pick.a < 3 else 1)  # within one prompt
        seen.append(frozenset((keys[pick.a], keys[pick.b])))
        asked.add(seen[-1])
    assert len(seen) == len(set(seen)) == 6  # 3 pairs per prompt, each once, then None
    with pytest.raises(MmpersonaError, match="order"):
        next_pair(vectors, [0] * 6, keys, chosen=np.zeros((0, 4)), rejected=np.zeros((0, 4)), order="best")
    a = next_pair(vectors, [0] * 6, keys, chosen=np.zeros((0, 4)), rejected=np.zeros((0, 4)), order="random", seed=3)
    b = next_pair(vectors, [0] * 6, keys, chosen=np.zeros((0, 4)), rejected=np.zeros((0, 4)), order="random", seed=3)
    assert a == b and a.information is None


def test_an_answered_direction_is_worth_less_than_an_open_one():
    x = np.eye(3)
    post = posterior(np.array([x[0]] * 6), np.array([-x[0]] * 6))
    gain = information(post, np.array([x[0] - (-x[0]), x[1] - (-x[1])]))
    assert gain[1] > gain[0] * 2, gain


def test_a_rerank_keeps_its_diversity_floor(monkeypatch):
    rng = np.random.default_rng(1)
    cluster = unit(rng.normal(size=8))
    near = unit(cluster + 0.05 * rng.normal(size=(4, 8)))  # the best four look alike
    far = unit(rng.normal(size=(12, 8)))
    vectors = np.vstack([near, far])
    scores = [10, 9, 8, 7] + list(rng.uniform(0, 6, size=12))
    order, info = select_diverse(scores, vectors, 4, 0.8)
    assert diversity(vectors[:4]) < 0.8 * diversity(vectors)  # the plain top four break the floor
    assert diversity(vectors[order[:4]]) >= 0.8 * diversity(vectors) and info["method"] == "exact"
    assert order[0] == 0 and sorted(order) == list(range(16))  # the best stays first; every candidate ordered
    # the highest total score the floor allows: no set of 4 holding the best that keeps the floor scores more
    keep = [c for c in itertools.combinations(range(1, 16), 3)
            if diversity(vectors[[0, *c]]) >= 0.8 * diversity(vectors)]
    assert sum(scores[i] for i in order[:4]) == pytest.approx(max(scores[0] + sum(scores[i] for i in c) for c in keep))
    # past EXACT_SETS sets, greedy MMR keeps the floor too, and scores no more than the exact choice
    monkeypatch.setattr(diversity_module, "EXACT_SETS", 0)
    greedy, info = select_diverse(scores, vectors, 4, 0.8)
    assert info["method"] == "mmr" and info["mmr_weight"] > 0 and greedy[0] == 0
    assert diversity(vectors[greedy[:4]]) >= 0.8 * diversity(vectors)
    assert sum(scores[i] for i in greedy[:4]) <= sum(scores[i] for i in order[:4]) + 1e-9
    plain, info = select_diverse(scores, vectors, 4, 0.0)
    assert plain[:4] == [0, 1, 2, 3] and info["method"] == "top"
    spread = unit(rng.normal(size=(8, 8)))
    assert select_diverse(list(range(8, 0, -1)), spread, 3, 0.5)[0][:3] == [0, 1, 2]  # the floor already holds


@pytest.fixture
def db(tmp_path, tiny_embedder):
    d = ConceptDB(tmp_path / "c.db", embedder=tiny_embedder)
    yield d
    d.close()


def pngs(colors):
    out = []
    for color in colors:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_the_pipelines_rerank_reports_and_keeps_the_floor(db, tiny_cache):
    from mmpersona import PreferenceProfile
    from pipelines import PersonalizedT2IPipeline
    from pipelines.t2i import RerankConfig

    profile = PreferenceProfile(db, "alice")
    a, b, c, d = pngs([(250, 0, 0), (0, 0, 250), (200, 30, 0), (0, 30, 200)])
    profile.compare("x", a, b)
    profile.compare("x", c, d)
    profile.train_reward()
    floored = PersonalizedT2IPipeline(db, preset="tiny", device="cpu", strategies=["rerank"])
    out = floored("a ball", user="alice", n=3, steps=2, seed=0)
    note = out.metadata[0]["notes"]["rerank"]["diversity"]
    assert note["diversity"] >= 0.8 * note["candidates_diversity"] - 1e-9
    # measured on the 3 images returned, not on all 12 candidates (the selection sees the n asked for)
    assert note["diversity"] == pytest.approx(diversity(db.embedder.embed_images(out.images)), abs=1e-5)
    plain = PersonalizedT2IPipeline(db, t2i=floored.t2i, strategies=["rerank"],
                                    configs={"rerank": RerankConfig(diversity_floor=0)})
    out0 = plain("a ball", user="alice", n=3, steps=2, seed=0)
    assert "diversity" not in out0.metadata[0]["notes"]["rerank"]
    assert out0.scores == sorted(out0.scores, reverse=True)
    with pytest.raises(MmpersonaError, match="diversity_floor"):
        RerankConfig(diversity_floor=1.5)


def test_the_taste_pool_asks_the_most_informative_pair_and_only_your_choices_change_it(tmp_path, tiny_cache):
    import gradio_app
    from concept_db.types import content_hash
    from pipelines.taste import POOL_SEED, POOL_SEEDS, TASTE_PROMPTS, taste_pool

    app = gradio_app.App("tiny", tmp_path / "a.db", "cpu")
    try:
        # the first request starts the shared pool in the background and is answered in the fixed order
        assert app.taste_pair("bob", "", 0)["order"] == "random"
        pool = taste_pool(app.t2i_pipe, app.steps)
        deadline = time.monotonic() + 120
        while not pool.complete:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        bob_first = app.taste_pair("bob", "", 0)
        assert len(pool.images()) == len(TASTE_PROMPTS) * POOL_SEEDS
        pool.fill(None, (0, POOL_SEED, 2), "bob")  # a chunk filled meanwhile is not generated again (no model)
        by_hash = {i.key: i for i in pool.images()}
        keys = [content_hash(x) for x in bob_first["images"]]
        assert bob_first["order"] == "active" and all(k in by_hash for k in keys)
        assert {by_hash[k].prompt for k in keys} == {TASTE_PROMPTS.index(bob_first["prompt"])}
        seen = {frozenset(keys)}
        pair = app.taste_pair("alice", "", 0)
        for step in range(1, 4):  # alice answers: no pair comes back, answered or skipped
            app.taste_choose("alice", pair, "A", "")
            pair = app.taste_pair("alice", "", step)
            key = frozenset(content_hash(x) for x in pair["images"])
            assert key not in seen
            seen.add(key)
        app.answer_pair("alice", pair)  # a skip
        assert frozenset(content_hash(x) for x in app.taste_pair("alice", "", 4)["images"]) not in seen
        # carol's first pair is bob's first pair: alice's choices and skips changed nothing for another user
        assert app.taste_pair("carol", "", 0)["images"] == bob_first["images"]
        fixed = app.taste_pair("dave", "", 0, "random")
        assert fixed["order"] == "random" and fixed["prompt"] == TASTE_PROMPTS[0]
        own = app.taste_pair("dave", "my own prompt", 0)  # own prompts: the fixed order
        assert own["order"] == "random" and own["prompt"] == "my own prompt"
        with pytest.raises(ValueError, match="order"):
            app.taste_pair("dave", "", 0, "best")
    finally:
        app.db.close()


def test_next_pair_through_http(tmp_path, tiny_embedder, tiny_cache):
    import httpx

    from mmpersona.server import KeyStore, ServeConfig, create_app
    from pipelines import PersonalizedT2IPipeline
    from pipelines.taste import taste_pool
    from servers import in_thread

    db = ConceptDB(tmp_path / "c.db", embedder=tiny_embedder)
    keys = KeyStore(tmp_path / "keys.json")
    key = {u: keys.create(u)[1] for u in ("alice", "bob")}
    t2i = PersonalizedT2IPipeline(db, preset="tiny", device="cpu", strategies=[])
    app = create_app(db, keys, t2i=t2i, config=ServeConfig(default_steps=2))
    with in_thread(app) as url:
        def client(user):
            return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key[user]}"}, timeout=120)

        with client("alice") as alice, client("bob") as bob:
            # the first request does not wait for the shared pool: the fixed order answers while the model makes it
            # in the background, between requests
            early = alice.get("/v1/profile/next-pair")
            assert early.status_code == 200, early.text
            assert early.json()["order"] == "random" and early.json()["seeds"] == [1000, 1001]
            pool = taste_pool(t2i, 2)
            deadline = time.monotonic() + 300
            while not pool.complete and time.monotonic() < deadline:
                time.sleep(0.2)
            assert pool.complete
            first = alice.get("/v1/profile/next-pair")
            assert first.status_code == 200, first.text
            body = first.json()
            assert body["order"] == "active" and body["information"] > 0 and len(body["images"]) == 2
            images = [base64.b64decode(i["b64_json"]) for i in body["images"]]
            Image.open(io.BytesIO(images[0])).verify()
            assert bob.get("/v1/profile/next-pair").json()["images"] == body["images"]  # the same start for all
            recorded = alice.post("/v1/profile/events", json={
                "kind": "pair", "prompt": body["prompt"],
                "chosen": "data:image/png;base64," + body["images"][0]["b64_json"],
                "rejected": "data:image/png;base64," + body["images"][1]["b64_json"]})
            assert recorded.status_code == 201, recorded.text
            second = alice.get("/v1/profile/next-pair").json()
            assert second["images"] != body["images"]
            fixed = alice.get("/v1/profile/next-pair", params={"order": "random", "step": 2}).json()
            assert fixed["order"] == "random" and fixed["information"] is None and fixed["seeds"] == [1004, 1005]
            assert alice.get("/v1/profile/next-pair", params={"order": "best"}).status_code in (400, 422)
            assert alice.get("/v1/profile/next-pair", params={"order": "random", "step": -1}).status_code == 400
    db.close()


def test_the_lora_stops_at_the_diversity_floor_with_the_weights_that_kept_it(db, tiny_cache, monkeypatch):
    from safetensors.torch import load

    from mmpersona import PreferenceProfile
    from mmpersona.models import load_t2i
    from pipelines import dpo
    from pipelines.t2i import LORA_BLOB

    profile = PreferenceProfile(db, "alice")
    a, b, c, d = pngs([(250, 0, 0), (0, 0, 250), (200, 30, 0), (0, 30, 200)])
    profile.compare("a ball", a, b)
    profile.compare("a ball", c, d)
    t2i = load_t2i("tiny:sd", device="cpu", ip_adapter=False)
    readings = iter([1.0, 0.9, 0.5])  # vanilla, step 2 (kept), step 4 (under the floor)
    monkeypatch.setattr(dpo.DiversityWatch, "diversity", lambda self: next(readings))
    stopped = dpo.train_dpo_lora(t2i, db, "alice", dpo.DPOConfig(steps=6, diversity_every=2, lr=1e-2), progress=False)
    assert stopped.diversity_stopped and stopped.steps == 4 and [r["ratio"] for r in stopped.diversity] == [0.9, 0.5]
    kept = load(db.store.get_blob("alice", LORA_BLOB)[0])
    monkeypatch.undo()
    two = dpo.train_dpo_lora(t2i, db, "alice", dpo.DPOConfig(steps=2, diversity_floor=0, lr=1e-2), progress=False)
    assert not two.diversity
    again = load(db.store.get_blob("alice", LORA_BLOB)[0])
    assert kept.keys() == again.keys() and all(bool((kept[k] == again[k]).all()) for k in kept)
    # the real watch: images sampled with and without the LoRA, a ratio to vanilla's
    watched = dpo.train_dpo_lora(t2i, db, "alice", dpo.DPOConfig(steps=2, diversity_every=1, diversity_action="warn",
                                                                 diversity_images=2, diversity_steps=2),
                                 progress=False)
    assert [r["step"] for r in watched.diversity] == [1, 2] and all(r["ratio"] > 0 for r in watched.diversity)
    with pytest.raises(MmpersonaError, match="diversity_action"):
        dpo.DPOConfig(diversity_action="ignore")
