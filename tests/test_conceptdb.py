"""ConceptDB end to end with the tiny open_clip embedder (real model classes, tiny weights), on both backends."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from concept_db import ConceptNotFound
from mmpersona import ConceptDB, ImageLoadError


def drawn(kind: str, color, shift: int = 0) -> Image.Image:
    img = Image.new("RGB", (96, 96), (235, 235, 225))
    d = ImageDraw.Draw(img)
    box = (20 + shift, 20, 76 + shift, 76)
    {"ellipse": d.ellipse, "rectangle": d.rectangle}[kind](box, fill=color)
    return img


@pytest.fixture
def db(db_url, tiny_embedder):
    with ConceptDB(db_url, embedder=tiny_embedder) as database:
        yield database


def test_add_and_retrieve_by_reference_image(db, tmp_path):
    paths = []
    for i, (kind, color) in enumerate([("ellipse", (210, 30, 30)), ("rectangle", (30, 60, 200)),
                                       ("ellipse", (30, 160, 40))]):
        p = tmp_path / f"{i}.png"
        drawn(kind, color).save(p)
        paths.append(p)
    db.add("alice", "<ball>", [paths[0]], category="toy", info="red ball")
    db.add("alice", "<box>", [paths[1]], category="toy")
    db.add("alice", "<leaf>", [paths[2]], category="plant")
    hits = db.search_image("alice", paths[1], k=3)
    assert hits[0].concept.name == "box" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.concept.name for h in db.search_image("alice", paths[1], k=3, category="plant")] == ["leaf"]
    assert db.search_image("bob", paths[1]) == []
    assert len(db.search_text("alice", "a red ball", k=2)) == 2


def test_each_image_embedded_once(db, tiny_embedder, monkeypatch):
    calls = []
    original = tiny_embedder.embed_images

    def counting(images, **kw):
        calls.append(len(images))
        return original(images, **kw)

    monkeypatch.setattr(tiny_embedder, "embed_images", counting)
    img = drawn("ellipse", (200, 0, 0))
    db.add("alice", "a", [img, drawn("rectangle", (0, 0, 200))])
    db.add("alice", "b", [img])  # same pixels, same PNG bytes: reused
    assert calls == [2]
    db.add("bob", "c", [img])  # once per user: never another user's vector (it could be forged)
    assert calls == [2, 1]
    db.add("bob", "d", [img])
    assert calls == [2, 1]


def test_bad_image_writes_nothing(db, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 nope")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        db.add("alice", "bo", [drawn("ellipse", (1, 2, 3)), bad])
    assert db.list("alice") == []


def test_resolve_update_delete_erase(db):
    c = db.add("alice", "bo", [drawn("ellipse", (9, 9, 9))], aliases=["shiba"])
    assert db.get("alice", "<shiba>").id == c.id == db.get("alice", c.id).id
    assert db.update("alice", "bo", info="good dog").info == "good dog"
    with pytest.raises(ConceptNotFound, match="no concept 'rex'"):
        db.get("alice", "rex")
    db.add("bob", "rex", [drawn("rectangle", (9, 9, 9))])
    gone = db.add("alice", "mam", [drawn("rectangle", (9, 9, 9))])
    assert db.delete("alice", "<mam>").id == gone.id  # the deleted concept, as it was
    with pytest.raises(ConceptNotFound):
        db.delete("alice", "mam")
    assert db.erase_user("alice") == 1
    assert db.list("alice") == [] and len(db.list("bob")) == 1
    vec = db.embedder.embed_images([drawn("rectangle", (9, 9, 9))])
    assert np.isclose(np.linalg.norm(vec), 1.0)
