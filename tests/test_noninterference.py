"""User-level non-interference, as a tested property: everything the toolkit computes for one user is
bit-identical whether or not other users exist and whatever they stored, hostile archives included.

Hypothesis draws sequences of other users' operations (adds with forged vectors and with copies of alice's
own images and query photos, forged and squatting archive imports, deletes, edits, likes, settings, memory
entries in alice's words and attached to her concepts, kept chats about her photos and their deletion, erasure)
and runs them between alice's steps; alice's outputs (retrieval results and scores, her memory for each turn, the
rendered VLM prompt, the calibrated threshold, her reward model's scores, her stored vectors, her kept
conversation, its turns and its photo) must equal those of a run in which
nobody else exists. On both backends.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scripts
from concept_db import ConceptDBError
from mmpersona import ConceptDB, PreferenceProfile
from mmpersona.concept_io import ImportFormatError

corpus = scripts.load("hostile_corpus")

ALICE = "alice"
OTHERS = ["bob", "mallory"]
# alice's images 0-2, her query photos 3-4, others' own images 5-7: the others may use any of them
POOL = [corpus.png(100 + i) for i in range(8)]
NAMES = ["cat", "dog", "mug", "x"]


def alice_run(db: ConceptDB, others: list[tuple], tmp: Path) -> dict:
    """Alice's fixed session, with `others` spread between her steps; returns everything computed for her."""
    from pipelines.calibrate import calibrate
    from pipelines.memory import MemoryIndex
    from pipelines.prompt import PromptBuilder
    from pipelines.retrieval import Retriever

    chunks = [others[i::4] for i in range(4)]
    out: dict = {}
    run_others(db, chunks[0], tmp)
    db.add(ALICE, "cat", [POOL[0], POOL[1]], category="pet", info="alice's cat")
    db.add(ALICE, "dog", [POOL[1], POOL[2]], category="pet", info="alice's dog", aliases=["rex"])
    cat = db.get(ALICE, "cat")
    db.store.add_memory(ALICE, "The cat sleeps in the kitchen.", concept_id=cat.id, kind="state", topic="bed",
                        valid_from=1.7e9)
    db.store.add_memory(ALICE, "The cat sleeps on the balcony.", concept_id=cat.id, kind="state", topic="bed",
                        valid_from=1.7e9 + 86400)
    db.store.add_memory(ALICE, "I walk the dog at dawn.")
    chat = db.store.start_conversation(ALICE, "alice's chat", created=1.7e9, updated=1.7e9)
    db.store.add_turn(ALICE, chat.id, "Where is the cat?", "On the balcony.", image=POOL[3], created=1.7e9 + 1)
    run_others(db, chunks[1], tmp)
    retriever = Retriever(db)
    builder = PromptBuilder()
    memory = MemoryIndex(db)
    for q in (3, 4, 0):
        image = corpus_image(q)
        found = Retriever.merge(retriever.by_mention(ALICE, "is <cat> with rex?"), retriever.by_image(ALICE, image))
        out[f"retrieved{q}"] = [(r.concept.name, r.score, r.source, r.image) for r in found]
        entries = memory.select(ALICE, "where does it sleep at dawn?", [r.concept.id for r in found])
        out[f"memory{q}"] = [(e.text, e.kind, e.topic, e.current) for e in entries]
        out[f"prompt{q}"] = json.dumps(builder.build("what is this?", None, found, memory=entries,
                                                     handles={r.concept.id: r.concept.handle for r in found}
                                                     ).messages)
    out["search_text"] = [(m.concept.name, m.score, m.image) for m in db.search_text(ALICE, "a pet", k=3)]
    run_others(db, chunks[2], tmp)
    out["calibration"] = calibrate(db, ALICE, {"cat": [POOL[0]], "dog": [POOL[2]]}, [POOL[3]]).to_dict()
    profile = PreferenceProfile(db, ALICE)
    profile.like(POOL[3], comment="warm")
    profile.dislike(POOL[4])
    profile.compare("a ball", POOL[0], POOL[2])
    run_others(db, chunks[3], tmp)
    reward = profile.train_reward()
    out["reward"] = reward.score(profile.image_vectors([corpus_hash(i) for i in (3, 4)])).tolist()
    out["vectors"] = {c.name: {e: (h, m.tobytes()) for e, (h, m) in db.store.vectors(ALICE, c.id).items()}
                      for c in db.list(ALICE)}
    out["concepts"] = [(c.name, c.category, c.info, c.aliases, c.images, c.version) for c in db.list(ALICE)]
    out["conversations"] = [(c.title, c.turns, c.created, c.updated) for c in db.store.conversations(ALICE)]
    turns = db.store.turns(ALICE, chat.id)
    out["turns"] = [(t.question, t.answer, t.image, t.created) for t in turns]
    out["turn_photo"] = hashlib.sha256(db.store.image_bytes(ALICE, turns[0].image)).hexdigest()
    return out


def corpus_image(i: int):
    from mmpersona import load_image

    return load_image(POOL[i])


def corpus_hash(i: int) -> str:
    from concept_db.types import content_hash

    return content_hash(POOL[i])


def run_others(db: ConceptDB, ops: list[tuple], tmp: Path) -> None:
    emb = db.embedder
    for n, (kind, owner, name, images, seed) in enumerate(ops):
        datas = [POOL[i] for i in images]
        try:
            if kind == "add":
                db.add(owner, name, datas, category="pet", info=f"{owner}'s")
            elif kind == "add_forged":  # vectors of the forger's choosing: alice's query photos, or noise
                target = emb.embed_images([POOL[seed % len(POOL)]])[0] if seed % 2 else \
                    np.random.default_rng(seed).normal(size=emb.dim).astype(np.float32)
                db.store.add(owner, name, images=datas, embeddings={emb.name: np.stack([target] * len(datas))})
            elif kind == "import_forged":
                vector = emb.embed_images([POOL[seed % len(POOL)]])[0]
                path = corpus.forged_vector_archive(tmp / f"forged{n}.zip", datas[0], vector, emb.name)
                db.import_concepts(owner, path, "archive", progress=False)
            elif kind == "import_squat":
                path = corpus.squatting_archive(tmp / f"squat{n}.zip", datas[0], emb.name, dim=seed % 40 + 1)
                db.import_concepts(owner, path, "archive", progress=False)
            elif kind == "delete":
                db.delete(owner, name)
            elif kind == "edit":
                db.update(owner, name, info=f"edited {seed}", aliases=["rex", "cat"])
            elif kind == "like":
                PreferenceProfile(db, owner).like(datas[0])
            elif kind == "setting":
                db.store.set_setting(owner, "retrieval.threshold", seed / 100)
            elif kind == "memory":  # alice's words, about their own concept of her concept's name, or hers
                target = db.get(ALICE if seed % 3 == 0 else owner, name).id
                db.store.add_memory(owner, "The cat sleeps at dawn in the kitchen.", concept_id=target,
                                    kind="state", topic="bed", valid_from=1.7e9 + seed)
            elif kind == "chat":  # alice's photo and question in their own kept chat
                c = db.store.start_conversation(owner)
                db.store.add_turn(owner, c.id, "Where is the cat?", "In the garage.", image=datas[0])
            elif kind == "chat_rm":  # their chats deleted: a photo alice's turn holds must stay
                for c in db.store.conversations(owner):
                    db.store.delete_conversation(owner, c.id)
            elif kind == "memory_rm":
                for e in db.store.memory(owner)[:1]:
                    db.store.delete_memory(owner, e.id)
            elif kind == "erase":
                db.erase_user(owner)
        except (ConceptDBError, ImportFormatError):
            pass  # the others' own mistakes are theirs


operations = st.tuples(
    st.sampled_from(["add", "add_forged", "import_forged", "import_squat", "delete", "edit", "like", "setting",
                     "memory", "memory_rm", "chat", "chat_rm", "erase"]),
    st.sampled_from(OTHERS),
    st.sampled_from(NAMES),
    st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=3),
    st.integers(0, 1000),
)


@pytest.mark.parametrize("examples", [30])
def test_other_users_never_change_alice_results(db_url, tiny_embedder, tmp_path, examples):
    with ConceptDB(db_url, embedder=tiny_embedder) as db:
        baseline = alice_run(db, [], tmp_path)
        assert baseline["retrieved3"] and baseline["calibration"]["threshold"] is not None
        assert ("The cat sleeps on the balcony.", "state", "bed", True) in baseline["memory3"]
        assert all("kitchen" not in text for text, *_ in baseline["memory3"])

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
        @given(others=st.lists(operations, min_size=1, max_size=16))
        def check(others):
            db.erase_user(ALICE)  # the others' data from earlier examples stays: more for them to interfere with
            assert alice_run(db, others, tmp_path) == baseline

        check()
