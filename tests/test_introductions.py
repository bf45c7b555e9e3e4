"""Concepts proposed from the conversation (#32): "this is my friend Anna" about a photo proposes <anna>, made
from the region that shows her, confirmed in one step (`pipelines/introductions.py`)."""

from __future__ import annotations

import pytest
from PIL import Image

from pipelines.introductions import ConceptProposal, head_and_shoulders, introductions


@pytest.mark.parametrize("message, expected", [
    ("This is my friend Anna.", [("Anna", "friend", "person")]),
    ("this is my best friend Anna!", [("Anna", "best friend", "person")]),
    ("Meet Rex, my dog. He is three.", [("Rex", "dog", "dog")]),
    ("Here's <tom-cat>", [("tom-cat", "", "")]),
    ("Anna is my sister", [("Anna", "sister", "person")]),
    ("Say hi to Bob. And this is my bike Blue.", [("Bob", "", ""), ("Blue", "bike", "bike")]),
    ("Is this my friend Anna?", []),  # a question introduces nobody
    ("This is my dog.", []),  # no name
    ("this is my dog rex", []),  # not a name: lower case
    ("This is the best day. That's it.", []),
    ("Today is my birthday. Monday is my day off.", []),  # not a person, pet or thing word
    ("Rex is my puppy", [("Rex", "puppy", "puppy")]),
    ("This is my friend Anna. this is my friend Anna", [("Anna", "friend", "person")]),  # once
])
def test_introductions_are_read_by_their_documented_patterns(message, expected):
    assert [(i.name, i.relation, i.category) for i in introductions(message)] == expected


def test_a_face_is_widened_to_head_and_shoulders_within_the_photo():
    assert head_and_shoulders((100, 100, 140, 160), (1000, 1000)) == (80, 80, 160, 220)
    assert head_and_shoulders((0, 0, 40, 60), (50, 100)) == (0, 0, 50, 100)


def test_a_proposal_is_confirmed_in_one_step_through_the_pipeline(tmp_path, tiny_embedder, tiny_cache):
    """End to end on the tiny models (no face model, no detector: the whole photo): the introduction after an
    answer is proposed with a free name; accepting it makes the concept from the photo, and the next answer
    retrieves it; a name the user has is not proposed; a bad box is refused and stores nothing."""
    from concept_db import InvalidConceptError
    from mmpersona.conceptdb import ConceptDB
    from pipelines.vlm import PersonalizedVLMPipeline

    photo = Image.new("RGB", (64, 48), (30, 160, 60))
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        db.add("alice", "<bo>", [Image.new("RGB", (64, 64), (200, 30, 30))], category="dog")
        pipe = PersonalizedVLMPipeline(db, vlm="tiny:qwen2.5-vl", preset="tiny", device="cpu", max_new_tokens=2)
        said = "Meet Rex, my dog! And this is Bo."
        answer = pipe(photo, said, user="alice")
        (rex,) = pipe.propose_concepts("alice", said, photo, answer)  # Bo is a concept already
        assert rex == ConceptProposal("Rex", "dog", "my dog", None, "photo")
        assert pipe.propose_concepts("alice", "What is this?", photo, answer) == []
        with pytest.raises(InvalidConceptError, match="not inside"):
            pipe.add_proposed("alice", {**rex.to_dict(), "box": [0, 0, 65, 10]}, photo)
        assert db.store.find("alice", "Rex") is None
        concept = pipe.add_proposed("alice", rex, photo)
        assert (concept.handle, concept.category, concept.info, len(concept.images)) == ("<Rex>", "dog", "my dog", 1)
        again = pipe(photo, "What is <Rex> doing?", user="alice")
        assert "<Rex>" in [r.concept.handle for r in again.retrieved]
        assert pipe.propose_concepts("alice", said, photo, again) == []  # both names are taken now
        cropped = pipe.add_proposed("bob", {**rex.to_dict(), "box": [0, 0, 32, 24]}, photo)  # a region: the crop
        assert Image.open(__import__("io").BytesIO(db.store.image_bytes("bob", cropped.images[0]))).size == (32, 24)


dlib = pytest.importorskip("dlib", reason='the face model needs dlib: pip install "mmpersona[face]"')


def test_a_friend_introduced_in_a_group_photo_is_made_from_her_face_and_found_again(tmp_path, mobilenet,
                                                                                   skimage_photos):
    """Real weights on real photos: in a group photo with bob's cat and cup (recognised), "this is my friend
    Eileen" proposes <Eileen> from the one free face, widened to head and shoulders; accepted, she is found by face
    in her own (different) photo. Without detection (the server) and no face looked for, the proposal is the whole
    photo."""
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.models import load_face_model
    from pipelines.introductions import accept, propose_concepts
    from pipelines.retrieval import Retriever
    from test_face_retrieval import group_photo

    face = load_face_model()
    canvas, where = group_photo(skimage_photos)
    with ConceptDB(tmp_path / "c.db", embedder=mobilenet) as db:
        db.add("bob", "<chelsea>", [skimage_photos["chelsea"]], category="cat")
        db.add("bob", "<cup>", [skimage_photos["coffee"]], category="cup")
        retriever = Retriever(db, face=face)
        retrieved = retriever.retrieve("bob", "This is my friend Eileen.", canvas, k=3)
        blind = propose_concepts(db, retriever, "bob", "This is my friend Eileen.", canvas, retrieved, detect=False)
        assert [(p.source, p.box) for p in blind] == [("photo", None)]  # bob has no people: no face was looked for
        (eileen,) = propose_concepts(db, retriever, "bob", "This is my friend Eileen.", canvas, retrieved)
        assert (eileen.name, eileen.category, eileen.info, eileen.source) == ("Eileen", "person", "my friend", "face")
        x0, y0, x1, y1 = eileen.box
        assert where[0] <= x0 < x1 <= where[2] and where[1] <= y0 < y1 <= where[3] + 60  # her, not the cat
        concept = accept(db, "bob", eileen, canvas)
        hits = Retriever(db, face=face).retrieve("bob", "who is this?", skimage_photos["astronaut"], k=3)
        assert hits[0].concept.id == concept.id and hits[0].source == "face"


def test_concepts_introduced_in_the_cli_chat_are_added_with_one_answer(tiny_cache, tmp_path):
    """A one-shot question lists the proposal and the one command that adds it (run here as printed); in an
    interactive chat one 'y' adds it; `concepts add --box` keeps only the region."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    from test_cli import run_cli

    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 48), (30, 160, 60)).save(photo)
    base = ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "c.db"), "--user", "alice"]
    run_cli(*base, "concepts", "add", "bo", "--image", str(photo))
    said = json.loads(run_cli(*base, "--json", "chat", "--image", str(photo), "Meet Rex, my dog.",
                              "--max-new-tokens", "1").stdout)
    assert [(p["name"], p["category"], p["box"]) for p in said["proposed_concepts"]] == [("Rex", "dog", None)]
    text = run_cli(*base, "chat", "--image", str(photo), "Meet Rex, my dog.", "--max-new-tokens", "1").stdout
    command = next(line for line in text.splitlines() if line.startswith("new concept? <Rex>")).split(": ", 1)[1]
    assert command.startswith("mmpersona concepts add Rex --image ")
    run_cli(*base, *shlex.split(command)[1:])
    shown = json.loads(run_cli(*base, "--json", "concepts", "show", "Rex").stdout)
    assert (shown["category"], shown["info"]) == ("dog", "my dog")

    proc = subprocess.run([sys.executable, "-m", "mmpersona", *base, "chat", "--image", str(photo),
                           "--max-new-tokens", "1", "--no-keep"], input="This is my friend Anna.\ny\n/quit\n",
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "add <Anna> (person, my friend) from the whole photo? [y/N]" in proc.stdout and "added <Anna>" in proc.stderr
    assert json.loads(run_cli(*base, "--json", "concepts", "show", "Anna").stdout)["category"] == "person"

    small = json.loads(run_cli(*base, "--json", "concepts", "add", "corner", "--image", str(photo),
                               "--box", "0,0,16,8").stdout)
    assert len(small["images"]) == 1
    out = run_cli(*base, "concepts", "add", "bad", "--image", str(photo), "--box", "0,0,99,8", check=False)
    assert out.returncode == 2 and "not inside" in out.stderr
