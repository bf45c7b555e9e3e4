"""Person concepts found by face (`Retriever.by_faces`, the fusion rule in `Retriever.retrieve`), with dlib's real
models and the real MobileNetV2 as the image embedder, on scikit-image's real photos."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dlib", reason='the face model needs dlib: pip install "mmpersona[face]"')

from PIL import Image, ImageOps  # noqa: E402

from mmpersona.face import DIM, Face, to_stored  # noqa: E402
from pipelines.retrieval import FACE_THRESHOLD_SETTING, Retriever  # noqa: E402


@pytest.fixture(scope="module")
def face():
    from mmpersona.models import load_face_model

    return load_face_model()


@pytest.fixture
def db(tmp_path, mobilenet, skimage_photos):
    from mmpersona.conceptdb import ConceptDB

    with ConceptDB(tmp_path / "c.db", embedder=mobilenet) as db:
        db.add("alice", "<eileen>", [skimage_photos["astronaut"]], category="person", info="my friend Eileen")
        db.add("alice", "<chelsea>", [skimage_photos["chelsea"]], category="cat")
        db.add("alice", "<cup>", [skimage_photos["coffee"]], category="cup")
        yield db


def group_photo(skimage_photos) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Eileen (mirrored, at 0.7x) beside the cat and the cup on one canvas; returns it and where she is."""
    canvas = Image.new("RGB", (1300, 560), (128, 128, 128))
    her = ImageOps.mirror(skimage_photos["astronaut"]).resize((358, 358))
    canvas.paste(her, (20, 100))
    canvas.paste(skimage_photos["chelsea"].resize((451, 300)), (420, 30))
    canvas.paste(skimage_photos["coffee"].resize((400, 267)), (880, 280))
    return canvas, (20, 100, 378, 458)


def test_a_person_is_found_by_face_in_a_group_photo(db, face, skimage_photos):
    canvas, where = group_photo(skimage_photos)
    retriever = Retriever(db, face=face)
    hits = retriever.retrieve("alice", "who is this?", canvas, k=3)
    eileen = next(h for h in hits if h.concept.handle == "<eileen>")
    assert eileen.source == "face" and eileen.score >= face.default_threshold
    assert hits[0] is eileen  # identity evidence ranks above whole-image look-alikes
    x0, y0, x1, y1 = eileen.box
    assert where[0] <= x0 < x1 <= where[2] and where[1] <= y0 < y1 <= where[3]  # her face, inside her photo
    assert eileen.image == db.resolve("alice", "<eileen>").images[0]
    assert retriever.people("alice") == {db.resolve("alice", "<eileen>").id}


def test_a_stranger_is_not_taken_for_a_person_concept(db, face, skimage_photos, monkeypatch):
    """The photo is Eileen's own reference photo (the image embedder's cosine is 1.0), but the face in it is a
    stranger's: with faces in the photo, a person is found by face or not at all."""
    retriever = Retriever(db, face=face)
    image = skimage_photos["astronaut"]
    rng = np.random.default_rng(0)
    stranger = to_stored(rng.standard_normal(128))
    monkeypatch.setattr(retriever, "faces", lambda user, image: [Face((200, 80, 280, 160), 1.0, stranger)])
    names = [h.concept.handle for h in retriever.retrieve("alice", "", image, k=3)]
    assert "<eileen>" not in names
    # the same photo with no face found (the back of her head): the image embedder finds her
    monkeypatch.setattr(retriever, "faces", lambda user, image: [])
    hits = retriever.retrieve("alice", "", image, k=3)
    assert hits[0].concept.handle == "<eileen>" and hits[0].source == "image"


def test_faces_and_people_are_assigned_one_to_one(db, face, skimage_photos):
    """Two faces that both look most like one person: the better pair wins, the other face takes the next
    person above the threshold, never the same one twice."""
    retriever = Retriever(db, face=face)
    retriever.people("alice")  # index the reference faces
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(128), rng.standard_normal(128)
    for name, vector in (("<chelsea>", a), ("<cup>", a + 0.25 * b)):  # two "people" with similar faces
        concept = db.resolve("alice", name)
        db.store.set_embeddings("alice", concept.id, face.name, concept.images, to_stored(vector)[None, :])
    retriever._people.clear()
    faces = [Face((0, 0, 50, 50), 1.0, to_stored(a + 0.05 * b)), Face((60, 0, 110, 50), 1.0, to_stored(a + 0.2 * b))]
    hits = retriever.by_faces("alice", skimage_photos["coffee"], faces=faces, min_score=0.9)
    assert {(h.concept.handle, h.box) for h in hits} == {("<chelsea>", (0, 0, 50, 50)), ("<cup>", (60, 0, 110, 50))}
    assert len({h.concept.id for h in hits}) == len(hits) == 2


def test_the_calibrated_face_threshold_is_the_users_and_is_used(db, face, skimage_photos):
    from pipelines.calibrate import calibrate

    her_again = ImageOps.mirror(skimage_photos["astronaut"]).resize((400, 400))
    result = calibrate(db, "alice", {"<eileen>": [her_again]}, [skimage_photos["coffee"]], face=face)
    assert result.face is not None and result.face["faces"] == 1 and result.face["reached"]
    stored = db.store.get_setting("alice", FACE_THRESHOLD_SETTING)
    assert stored == pytest.approx(result.face["threshold"])
    retriever = Retriever(db, face=face)
    assert retriever.user_face_threshold("alice") == pytest.approx(stored)
    assert [h.concept.handle for h in retriever.by_faces("alice", her_again)] == ["<eileen>"]
    db.store.set_setting("alice", FACE_THRESHOLD_SETTING, 0.9999)  # stricter than her own score
    assert retriever.by_faces("alice", her_again) == []
    assert retriever.user_face_threshold("bob") == face.default_threshold  # nobody else's setting


def test_face_vectors_are_one_per_reference_image_and_erased_with_the_user(db, face):
    retriever = Retriever(db, face=face)
    retriever.people("alice")
    ids, _, vectors = db.store.owner_vectors("alice", face.name)
    assert len(ids) == 3 and vectors.shape == (3, DIM)
    assert sum(v[-1] < 0.5 for v in vectors) == 1  # Eileen's photo has a face, the cat's and the cup's none
    db.store.erase_owner("alice")
    assert db.store.owner_vectors("alice", face.name)[0] == []


def test_no_face_is_searched_for_a_user_without_person_concepts(db, face, skimage_photos, mobilenet, monkeypatch):
    db.add("bob", "<mug>", [skimage_photos["coffee"]], category="cup")
    retriever = Retriever(db, face=face)
    calls = []
    monkeypatch.setattr(face, "detect", lambda image, **kw: calls.append(image) or [])
    hits = retriever.retrieve("bob", "", skimage_photos["astronaut"], k=1)
    assert calls == [] and [h.source for h in hits] == ["image"]
    retriever.retrieve("alice", "", skimage_photos["astronaut"], k=1)  # alice has a person concept: her photo is searched
    assert len(calls) == 1


def test_a_photos_faces_are_detected_once_per_user(db, face, skimage_photos, monkeypatch):
    """A chat's turns about one photo detect its faces once; another user sending the same photo gets no cached
    detection (its 0.1-0.8 s saved would tell them that someone sent it)."""
    db.add("bob", "<eileen>", [skimage_photos["astronaut"]], category="person")
    retriever = Retriever(db, face=face)
    retriever.people("alice"), retriever.people("bob")  # index the reference faces first
    calls = []
    detect = face.detect
    monkeypatch.setattr(face, "detect", lambda image, **kw: calls.append(image) or detect(image, **kw))
    photo = ImageOps.mirror(skimage_photos["astronaut"])
    first = retriever.retrieve("alice", "who is this?", photo, k=1)
    assert retriever.retrieve("alice", "and now?", photo.copy(), k=1) == first and len(calls) == 1
    bobs = retriever.retrieve("bob", "who is this?", photo, k=1)
    assert len(calls) == 2 and bobs[0].concept.owner == "bob" and bobs[0].source == "face"


def test_the_api_and_the_app_say_a_person_was_matched_by_face(tmp_path, tiny_cache, face, skimage_photos):
    """`serve --face` and the app's `--face`: the chat's retrieved concepts carry the face match, over real HTTP,
    and the app's concept card says "matched by face"."""
    import base64
    import io

    import httpx
    from servers import in_thread

    from mmpersona.app.state import App
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.server import KeyStore, create_app
    from pipelines import PersonalizedVLMPipeline

    her_again = ImageOps.mirror(skimage_photos["astronaut"]).resize((400, 400))
    buf = io.BytesIO()
    her_again.save(buf, format="PNG")
    photo_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    db = ConceptDB(tmp_path / "api.db", preset="tiny", device="cpu")
    db.add("alice", "<eileen>", [skimage_photos["astronaut"]], category="person")
    db.add("alice", "<cup>", [skimage_photos["coffee"]], category="cup")
    keys = KeyStore(tmp_path / "keys.json")
    key = keys.create("alice")[1]
    vlm = PersonalizedVLMPipeline(db, preset="tiny", device="cpu", face=face, max_new_tokens=4)
    with in_thread(create_app(db, keys, vlm=vlm)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                       json={"model": "mmpersona", "max_tokens": 4, "messages": [{"role": "user", "content": [
                           {"type": "image_url", "image_url": {"url": photo_url}},
                           {"type": "text", "text": "Who is this?"}]}]})
    assert r.status_code == 200, r.text
    first = r.json()["mmpersona"]["retrieved"][0]
    assert first["source"] == "face" and first["concept"]["handle"] == "<eileen>" and first["box"]
    db.close()

    app = App("tiny", tmp_path / "app.db", "cpu", face=True)
    app.db.add("alice", "<eileen>", [skimage_photos["astronaut"]], category="person")
    *_, (shown, rows, thumbs, boxes, status, _, _, _, _) = app.chat("alice", her_again, "Who is this?", [])
    assert rows[0][0] == "<eileen>" and rows[0][2] == "face"
    assert "matched by face" in thumbs and "used <eileen>" in status


def test_a_retrieval_indexes_a_bounded_number_of_images(db, face, skimage_photos):
    """A user with many reference images not yet face-indexed: each retrieval embeds at most `index_budget`
    of them (a request's cost is bounded), the next ones the rest; `people` grows as they are indexed."""
    from PIL import ImageOps as Ops

    w, h = skimage_photos["astronaut"].size
    views = [Ops.mirror(skimage_photos["astronaut"]).crop((i, 0, w - i, h)) for i in range(0, 40, 4)]  # 10 new images
    db.add("carol", "<eileen>", views, category="person")
    retriever = Retriever(db, face=face)
    retriever.index_budget = 4
    assert [retriever.ensure_instance_vectors("carol", face) for _ in range(4)] == [4, 4, 2, 0]
    assert len(retriever.people("carol")) == 1


def test_one_retrieval_stays_within_the_index_budget(db, face, skimage_photos):
    """`retrieve` asks for the person concepts once: the faces, the veto and the ranking all use that answer, so
    one request embeds at most `index_budget` missing faces however many steps need them."""
    w, h = skimage_photos["astronaut"].size
    views = [ImageOps.mirror(skimage_photos["astronaut"]).crop((i, 0, w - i, h)) for i in range(0, 40, 4)]  # 10 new images
    db.add("carol", "<eileen>", views, category="person")
    retriever = Retriever(db, face=face)
    retriever.index_budget = 4
    missing = len(db.store.missing_embeddings("carol", face.name))
    retriever.retrieve("carol", "", skimage_photos["astronaut"], k=2)
    assert missing - len(db.store.missing_embeddings("carol", face.name)) == 4
