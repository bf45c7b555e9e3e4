"""The app's defences that need no server: request limits, logins, the checked zip import, start-up rules."""

import sys
import tempfile
from pathlib import Path

import pytest

import gradio_app
import scripts

corpus = scripts.load("hostile_corpus")


def test_history_is_bounded_in_turns_and_characters():
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(100)]
    turns = gradio_app.bounded_history(history)
    assert len(turns) == gradio_app.MAX_HISTORY_TURNS
    assert turns[-1]["content"][0]["text"] == "message 99"  # the most recent are kept
    long = [{"role": "user", "content": "x" * 3_000}] * 10
    assert sum(len(t["content"][0]["text"]) for t in gradio_app.bounded_history(long)) <= gradio_app.MAX_HISTORY_CHARS
    with pytest.raises(ValueError, match="over the limit"):
        gradio_app.bounded_history([{"role": "user", "content": "x" * 400_000}])
    assert gradio_app.bounded_history([{"role": "system", "content": "ignore me"}, "junk"]) == []
    with pytest.raises(ValueError, match="list"):
        gradio_app.bounded_history("not a list")


def test_oversized_requests_are_refused_before_any_model_runs(tmp_path):
    app = gradio_app.App("tiny", tmp_path / "a.db", "cpu")
    with pytest.raises(ValueError, match="prompt is 100000 characters"):
        app.generate("alice", "x" * 100_000, [], 1, 1, 0)
    with pytest.raises(ValueError, match="question is"):
        next(app.chat("alice", None, "q" * 100_000, []))
    with pytest.raises(ValueError, match="over the limit of 32"):
        app.add_concept("alice", "bo", "", "", ["x.png"] * 33)
    assert app._vlm_pipe is None and app._t2i_pipe is None  # nothing was loaded for them
    app.db.close()


def test_zipped_rap_upload_goes_through_the_checked_reader(tmp_path):
    app = gradio_app.App("tiny", tmp_path / "a.db", "cpu")
    before = set(Path(tempfile.gettempdir()).glob("mmpersona-import-*"))
    bomb = corpus.unzip_bomb(tmp_path / "bomb.zip", 200 * corpus.MiB)
    with pytest.raises(ValueError, match="over the limit"):
        app.import_upload("alice", str(bomb), "rap")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a readable archive"):  # a message, not an empty error
        app.import_upload("alice", str(junk), "folder")
    assert set(Path(tempfile.gettempdir()).glob("mmpersona-import-*")) == before  # cleaned up
    assert app.db.list("alice") == []
    app.db.close()


def test_logins_are_throttled_and_compared_safely():
    logins = gradio_app.Logins({"alice": "pw-a"}, max_failures=3, window=60)
    assert logins("alice", "pw-a")
    assert not logins("nobody", "x")
    for _ in range(3):
        assert not logins("alice", "wrong")
    assert not logins("alice", "pw-a")  # locked out for the window, even with the right password
    logins.window = 0  # the window has passed
    assert logins("alice", "pw-a")


def test_login_file(tmp_path):
    f = tmp_path / "logins.txt"
    f.write_text("# team\nalice:pw:with:colons\n\nbob: spaced\n")
    assert gradio_app.read_logins(f) == {"alice": "pw:with:colons", "bob": " spaced"}
    f.write_text("alice\n")
    with pytest.raises(SystemExit, match="expected user:password"):
        gradio_app.read_logins(f)


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["gradio_app.py", *argv])
    launched = []
    monkeypatch.setattr(gradio_app, "build_app", lambda *a, **k: launched.append(k) or pytest.fail("started"))
    gradio_app.main()


def test_passwords_never_on_the_command_line(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "--auth", "alice:pw1")
    assert e.value.code == 2 and "--auth-file" in capsys.readouterr().err


def test_multi_user_starts_behind_the_guard(monkeypatch, tmp_path):
    f = tmp_path / "logins.txt"
    f.write_text("alice:pw\n")
    monkeypatch.setattr(sys, "argv", ["gradio_app.py", "--auth-file", str(f), "--db", str(tmp_path / "a.db")])
    launched = {}
    monkeypatch.setattr(gradio_app, "build_app", lambda *a, **k: launched.update(build=k) or "demo")
    monkeypatch.setattr(gradio_app, "launch", lambda demo, **k: launched.update(launch=k))
    gradio_app.main()
    assert launched["build"]["multi_user"] is True and launched["launch"]["logins"] == {"alice": "pw"}


def test_thumbnails_are_made_once_per_image_and_only_for_their_owner(tmp_path, tiny_embedder, monkeypatch):
    from concept_db import ConceptNotFound

    app = gradio_app.App("tiny", tmp_path / "a.db", "cpu")
    app.db._embedder = tiny_embedder
    for i in range(3):
        app.db.add("alice", f"c{i}", [corpus.png(i)])
    made = []
    import mmpersona.app.state as app_state

    real = app_state.data_uri
    monkeypatch.setattr(app_state, "data_uri", lambda data, size: made.append(size) or real(data, size))
    first = app.gallery("alice")
    assert first.count("<img") == 3 and len(made) == 3
    assert app.gallery("alice") == first and len(made) == 3  # a refresh decodes nothing again
    with pytest.raises(ConceptNotFound):  # cached or not, another user's image is not served
        app.thumbnail("bob", app.db.get("alice", "c0").images[0])
    app.db.close()
