"""Kept conversations (#32): chats with their turns and photos, per user, in the concept database; resumed by the
pipeline's `ChatSession`, the CLI, the HTTP API and the app."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from concept_db import ConceptNotFound, InvalidConceptError, open_store
from concept_db.types import Quota, QuotaExceeded


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return buf.getvalue()


def test_a_conversation_keeps_its_turns_in_order_and_its_photos_once(store):
    chat = store.start_conversation("alice")
    photo = png("red")
    first = store.add_turn("alice", chat.id, "Where  is\nBo sleeping?", "On the balcony.", image=photo)
    store.add_turn("alice", chat.id, "And tomorrow?", "Probably there too.", image=photo)
    store.add_turn("alice", chat.id, "Thanks", "You're welcome.")
    got = store.conversation("alice", chat.id)
    assert got.title == "Where is Bo sleeping?" and got.turns == 3 and got.updated >= got.created
    turns = store.turns("alice", chat.id)
    assert [t.position for t in turns] == [0, 1, 2] and [t.image for t in turns] == [first.image, first.image, None]
    assert [t.question for t in store.turns("alice", chat.id, last=2)] == ["And tomorrow?", "Thanks"]
    assert store.image_bytes("alice", first.image) == photo
    assert store.usage("alice").bytes == len(photo)  # one photo, asked about twice, is counted once
    assert store.usage("alice").turns == 3 and store.usage("alice").conversations == 1
    later = store.start_conversation("alice", "Second chat")
    store.rename_conversation("alice", chat.id, "  Bo's   bed ")
    assert [c.title for c in store.conversations("alice")] == ["Bo's bed", "Second chat"]  # last changed first
    assert [c.id for c in store.conversations("alice", limit=1, offset=1)] == [later.id]


def test_conversations_are_their_owners_alone(store):
    chat = store.start_conversation("alice")
    photo = png("blue")
    turn = store.add_turn("alice", chat.id, "Who is this?", "Your dog.", image=photo)
    for call in (lambda: store.conversation("bob", chat.id), lambda: store.turns("bob", chat.id),
                 lambda: store.add_turn("bob", chat.id, "mine now?", "no"),
                 lambda: store.rename_conversation("bob", chat.id, "taken"),
                 lambda: store.delete_conversation("bob", chat.id), lambda: store.image_bytes("bob", turn.image)):
        with pytest.raises(ConceptNotFound):
            call()
    assert store.conversations("bob") == [] and "alice" in store.owners()
    bobs = store.start_conversation("bob")
    store.add_turn("bob", bobs.id, "Same photo?", "Yes.", image=photo)  # stored once, by content hash
    store.delete_conversation("alice", chat.id)
    assert store.image_bytes("bob", turn.image) == photo  # bob's turn still uses it
    with pytest.raises(ConceptNotFound):
        store.image_bytes("alice", turn.image)
    assert store.conversations("alice") == [] and store.usage("alice").bytes == 0
    store.erase_owner("bob")
    assert store.conversations("bob") == [] and "bob" not in store.owners()
    with pytest.raises(ConceptNotFound):
        store.image_bytes("bob", turn.image)


def test_a_photo_stays_while_a_concept_uses_it_after_its_conversation_goes(store):
    photo = png("green")
    bo = store.add("alice", "bo", images=[photo])
    chat = store.start_conversation("alice")
    store.add_turn("alice", chat.id, "Is this Bo?", "Yes.", image=photo)
    store.delete_conversation("alice", chat.id)
    assert store.image_bytes("alice", bo.images[0]) == photo
    chat = store.start_conversation("alice")
    store.add_turn("alice", chat.id, "Is this Bo?", "Yes.", image=photo)
    store.delete("alice", bo.id)
    assert store.image_bytes("alice", store.turns("alice", chat.id)[0].image) == photo


def test_bad_turns_are_refused_and_store_nothing(store):
    chat = store.start_conversation("alice")
    for kwargs in ({"question": "nul\x00"}, {"answer": "x" * 64_001}, {"image": b""}, {"image": "a path"},
                   {"question": "\ud800"}):
        with pytest.raises(InvalidConceptError):
            store.add_turn("alice", chat.id, **{"question": "q", "answer": "a", **kwargs})
    with pytest.raises(ConceptNotFound):
        store.add_turn("alice", "no-such-chat", "q", "a")
    with pytest.raises(InvalidConceptError):
        store.start_conversation("alice", "t" * 201)
    assert store.conversation("alice", chat.id).turns == 0 and len(store.conversations("alice")) == 1
    assert store.usage("alice").bytes == 0


def test_the_quota_bounds_conversations_turns_and_their_photos(tmp_path):
    s = open_store(tmp_path / "q.db")
    s.quota = Quota(conversations=2, turns=3, bytes=3000)
    try:
        a, b = s.start_conversation("alice"), s.start_conversation("alice")
        with pytest.raises(QuotaExceeded, match="conversations"):
            s.start_conversation("alice")
        big = png("red") + b"\0" * 2000  # a PNG with trailing bytes: 2,000 more
        s.add_turn("alice", a.id, "one", "1", image=big)
        s.add_turn("alice", a.id, "two", "2", image=big)  # the same photo costs no more bytes
        with pytest.raises(QuotaExceeded, match="of images"):
            s.add_turn("alice", b.id, "other photo", "x", image=png("blue") + b"\0" * 2000)
        s.add_turn("alice", b.id, "three", "3")
        with pytest.raises(QuotaExceeded, match="conversation turns"):
            s.add_turn("alice", b.id, "four", "4")
        assert s.usage("alice").turns == 3
        s.start_conversation("bob")  # bob has his own
    finally:
        s.close()


def test_migrating_a_user_keeps_their_conversations_as_they_were(tmp_path):
    from concept_db.migrate import migrate
    from test_memory import same_after_migration

    src = open_store(tmp_path / "a.db")
    chat = src.start_conversation("alice", "Bo")
    src.add_turn("alice", chat.id, "Where is Bo?", "Here.", image=png("red"))
    src.add_turn("alice", chat.id, "Sure?", "Yes.")
    src.start_conversation("alice")
    report = migrate(src, tmp_path / "b.db")
    owner = report.owners[0]
    assert owner.counts["conversations"] == 2 and owner.counts["turns"] == 2 and owner.copied["turns"] == 2
    src.add_turn("alice", chat.id, "And now?", "Still here.")  # a re-run copies only the new turn
    again = migrate(src, tmp_path / "b.db")
    assert again.owners[0].copied["turns"] == 1 and again.owners[0].copied["conversations"] == 0
    same_after_migration(src, tmp_path / "b.db", "alice")


# ------------------------------------------------------------------------------------------ the pipeline and the CLI


def test_a_kept_chat_session_is_continued_with_its_history_and_photo(tmp_path, tiny_embedder, tiny_cache):
    """End to end on the tiny models: a kept `ChatSession` stores each turn with its photo; continued by id it
    has the earlier turns as history (in the model's messages) and the last photo as its image; a turn over the
    quota is refused before the model runs; a stopped answer is not kept; a bad photo changes nothing."""
    from concept_db.types import Quota
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.errors import MmpersonaError
    from pipelines.vlm import PersonalizedVLMPipeline

    red = Image.new("RGB", (64, 64), (200, 30, 30))
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        db.add("alice", "<bo>", [red], category="dog")
        pipe = PersonalizedVLMPipeline(db, vlm="tiny:qwen2.5-vl", preset="tiny", device="cpu", max_new_tokens=2)
        first = pipe.chat("alice", png("red"), keep=True)
        assert first.conversation_id is None  # nothing is stored before the first turn
        a1 = first.ask("Is <bo> in this photo?")
        cid = first.conversation_id
        assert cid is not None and [c.id for c in db.store.conversations("alice")] == [cid]
        assert "".join(first.stream("What is he doing?")).strip() == first.answers[-1].answer
        with pytest.raises(MmpersonaError):
            first.image = b"not an image"
        assert first.image is not None  # the bad photo changed nothing

        again = pipe.chat("alice", conversation=cid)
        assert again.image is not None and again.image.getpixel((0, 0)) == (255, 0, 0)  # png("red")
        answer = again.ask("And now?")
        texts = [p["text"] for m in answer.messages for p in m["content"] if p.get("type") == "text"]
        assert "Is <bo> in this photo?" in texts and a1.answer in texts and "What is he doing?" in texts
        turns = db.store.turns("alice", cid)
        assert [t.question for t in turns] == ["Is <bo> in this photo?", "What is he doing?", "And now?"]
        assert len({t.image for t in turns}) == 1 and turns[0].image is not None
        assert not pipe.chat("alice").keep and pipe.chat("alice", red).ask("Not kept?").answer is not None
        assert len(db.store.conversations("alice")) == 1

        from pipelines.vlm import RESUMED_CHARS

        long = db.store.start_conversation("alice")  # kept turns of 14,000 characters: the newest that fit
        for i in range(4):
            db.store.add_turn("alice", long.id, f"{i}" * 7_000, f"{i}" * 7_000, image=png("red"))
        resumed = pipe.chat("alice", conversation=long.id).history
        assert [m["content"][0]["text"][:1] for m in resumed] == ["2", "2", "3", "3"]
        assert sum(len(m["content"][0]["text"]) for m in resumed) <= RESUMED_CHARS
        db.store.delete_conversation("alice", long.id)

        stream = again.stream("Stopped halfway?")
        next(iter(stream), None)
        stream.close()  # the client stopped the answer: not kept
        assert db.store.conversation("alice", cid).turns == 3

        with pytest.raises(ConceptNotFound):
            pipe.chat("bob", conversation=cid)  # alice's, not bob's
        db.store.quota = Quota(turns=3)
        calls = []
        pipe.vlm.generate = lambda *a, **k: calls.append(1)  # the model must not run for a refused turn
        with pytest.raises(QuotaExceeded, match="conversation turns"):
            again.ask("One too many?")
        assert calls == [] and db.store.conversation("alice", cid).turns == 3


def test_chat_sessions_through_the_cli(tiny_cache, tmp_path):
    """`chat --session new` keeps a one-shot question; `--session ID` continues it without --image (the last photo
    and the earlier turns); an interactive chat is kept and says how to continue it; `chats list/show/rename/rm`;
    errors are one line."""
    from test_cli import run_cli

    photo = tmp_path / "bo.png"
    photo.write_bytes(png("red"))
    base = ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "c.db"), "--user", "alice", "--json"]
    run_cli(*base, "concepts", "add", "bo", "--image", str(photo))
    first = json.loads(run_cli(*base, "chat", "--image", str(photo), "--session", "new", "Is <bo> here?",
                               "--max-new-tokens", "2", "--no-remember").stdout)
    cid = first["conversation"]
    assert cid
    second = json.loads(run_cli(*base, "chat", "--session", cid, "What is he doing?", "--max-new-tokens", "2",
                                "--no-remember").stdout)
    assert second["conversation"] == cid and second["retrieved"][0]["concept"]["name"] == "bo"  # the kept photo
    texts = [p["text"] for m in second["messages"] for p in m["content"] if p.get("type") == "text"]
    assert "Is <bo> here?" in texts and first["answer"] in texts
    assert json.loads(run_cli(*base, "chat", "--image", str(photo), "Not kept", "--max-new-tokens", "1",
                              "--no-remember").stdout)["conversation"] is None
    listing = json.loads(run_cli(*base, "chats", "list").stdout)["conversations"]
    assert [(c["id"], c["turns"], c["title"]) for c in listing] == [(cid, 2, "Is <bo> here?")]
    shown = json.loads(run_cli(*base, "chats", "show", cid).stdout)
    assert [m["question"] for m in shown["messages"]] == ["Is <bo> here?", "What is he doing?"]
    run_cli(*base, "chats", "rename", cid, "Bo at home")

    plain = [a for a in base if a != "--json"]
    proc = subprocess.run([sys.executable, "-m", "mmpersona", *plain, "chat", "--session", cid, "--max-new-tokens",
                           "1", "--no-remember"], input="third?\n/quit\n", capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "continuing" in proc.stderr and f"chat --session {cid}" in proc.stderr
    assert json.loads(run_cli(*base, "chats", "list").stdout)["conversations"][0]["turns"] == 3
    assert json.loads(run_cli(*base, "--user", "bob", "chats", "list").stdout)["conversations"] == []
    out = run_cli(*base, "--user", "bob", "chat", "--session", cid, "mine?", check=False)
    assert out.returncode == 2 and "no conversation" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_cli(*base, "chat", "hi", check=False)
    assert out.returncode == 2 and "--image" in out.stderr
    run_cli(*base, "chats", "rm", cid)
    assert json.loads(run_cli(*base, "chats", "list").stdout)["conversations"] == []


def test_an_archive_carries_the_conversations_and_an_import_restores_them(tmp_path, tiny_embedder):
    """An exported archive holds the user's kept conversations (conversations.json, each photo once among the
    images); an import restores them under new ids with their turns, photos and times; a malformed turn is a
    clear error that imports nothing; a conversation over the importer's quota is skipped whole and named."""
    import zipfile

    from mmpersona.concept_io import ImportFormatError
    from mmpersona.conceptdb import ConceptDB

    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        photo = png("red")
        db.add("alice", "bo", [photo])
        chat = db.store.start_conversation("alice", "Bo at home", created=1000.0, updated=2000.0)
        db.store.add_turn("alice", chat.id, "Is this Bo?", "Yes.", image=photo, created=1500.0)
        db.store.add_turn("alice", chat.id, "Where?", "The balcony.", created=1600.0)
        other = db.store.start_conversation("alice")
        db.store.add_turn("alice", other.id, "And this?", "A cat.", image=png("blue"))
        archive = tmp_path / "alice.zip"
        db.export_concepts("alice", archive, "archive")
        with zipfile.ZipFile(archive) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
        assert sum(n.startswith("images/") for n in members) == 2  # the concept's photo is the turn's
        db.import_concepts("bob", archive, "archive", progress=False)
        got = {c.title: c for c in db.store.conversations("bob")}
        assert set(got) == {"Bo at home", "And this?"} and got["Bo at home"].id != chat.id
        assert (got["Bo at home"].created, got["Bo at home"].updated) == (1000.0, 2000.0)
        turns = db.store.turns("bob", got["Bo at home"].id)
        assert [(t.question, t.answer, t.created) for t in turns] == [("Is this Bo?", "Yes.", 1500.0),
                                                                      ("Where?", "The balcony.", 1600.0)]
        assert db.store.image_bytes("bob", turns[0].image) == photo and turns[1].image is None

        chats = json.loads(members["conversations.json"])
        chats["conversations"][0]["turns"][0]["created"] = "noon"
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(bad, "w") as zf:
            for n, data in {**members, "conversations.json": json.dumps(chats).encode()}.items():
                zf.writestr(n, data)
        with pytest.raises(ImportFormatError, match=r"turns\[0\]\.created must be"):
            db.import_concepts("carol", bad, "archive", progress=False)
        assert db.list("carol") == [] and db.store.conversations("carol") == []

        db.store.quota = Quota(turns=2)
        report = db.import_concepts("dave", archive, "archive", progress=False)
        db.store.quota = None
        kept = db.store.conversations("dave")
        assert [(c.title, c.turns) for c in kept] == [("And this?", 1)]  # the newest fits; the next is skipped whole
        assert any("Bo at home" in item and "turns" in reason for item, reason in report.skipped)
