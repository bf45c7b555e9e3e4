"""The Gradio app through gradio_client: each tab's main action, two users, concurrent requests."""

import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from servers import free_port

gr = pytest.importorskip("gradio", reason="the app extra is not installed")
gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_cache):
    import gradio_app

    tmp = tmp_path_factory.mktemp("app")
    demo = gradio_app.build_app("tiny", tmp / "app.db", multi_user=True, device="cpu")
    port = free_port()
    gradio_app.launch(demo, logins={"alice": "pw-a", "bob": "pw-b"}, server_name="127.0.0.1", server_port=port,
                      prevent_thread_lock=True, quiet=True)
    images = {}
    for name, color, kind in (("red", (210, 30, 30), "ellipse"), ("blue", (30, 60, 200), "rectangle")):
        img = Image.new("RGB", (64, 64), (240, 240, 240))
        getattr(ImageDraw.Draw(img), kind)((10, 10, 54, 54), fill=color)
        images[name] = tmp / f"{name}.png"
        img.save(images[name])
    yield f"http://127.0.0.1:{port}/", images, demo
    demo.close()


def client(url, user, password):
    return gradio_client.Client(url, auth=(user, password), verbose=False)


def test_concepts_chat_preferences_generate(server):
    url, images, _ = server
    alice = client(url, "alice", "pw-a")
    status, gallery, table, pick, *cleared = alice.predict("<bo>", "dog", "my shiba",
                                                           [gradio_client.handle_file(str(images["red"]))],
                                                           api_name="/add_concept")
    assert cleared == [None, "", "", ""]  # stored: the form is cleared (images, name, category, info)
    assert alice.predict("<bo>", api_name="/concept_fields") == ("<bo>", "dog", "my shiba", "")
    assert "/gradio_api/file=" not in gallery and "data:image/webp;base64," in gallery  # inline, not a URL
    assert "added <bo>" in status and table["data"][0][0] == "<bo>" and gallery.count("<img") == 1
    chat, rows, thumbs, boxes, chat_status, memory = alice.predict(gradio_client.handle_file(str(images["red"])),
                                                                   "What is in this photo?", [], False,
                                                                   api_name="/chat")
    assert memory == ""  # a question: nothing to remember, nothing remembered yet
    assert rows["data"][0][0] == "<bo>" and rows["data"][0][2] == "image" and "used <bo>" in chat_status
    assert chat[-1]["role"] == "assistant" and thumbs.count("<img") >= 1 and boxes == ""  # no regions asked
    *_, boxes, _, _ = alice.predict(gradio_client.handle_file(str(images["red"])), "Where is <bo>?", [], True,
                                    api_name="/chat")
    assert boxes == "" or ("data:image/webp;base64," in boxes and "data-boxes=" in boxes)
    assert "liked the image" in alice.predict(gradio_client.handle_file(str(images["red"])), "warm red",
                                              api_name="/like")
    assert "recorded a choice" in alice.predict(gradio_client.handle_file(str(images["red"])),
                                                gradio_client.handle_file(str(images["blue"])), "a ball",
                                                api_name="/choose_a")
    liked, disliked, msg = alice.predict("warm light, film grain", "blue cast", api_name="/save_attributes")
    assert liked == "warm light, film grain" and disliked == "blue cast"
    assert "reward model trained" in alice.predict(api_name="/train_reward")
    mine, plain, meta, *_ = alice.predict("a ball", ["attributes", "rerank"], 1, 2, 0, True, api_name="/generate")
    assert mine.count("<img") == 1 and plain.count("<img") == 1 and "score" in mine
    metadata = meta  # JSON in the page: no metadata file is left on the server
    assert metadata["personalized"][0]["final_prompt"] == "a ball, warm light, film grain"
    assert metadata["vanilla"][0]["final_prompt"] == "a ball"
    # the vanilla comparison costs a second generation, so only when asked for
    mine, plain, meta, *_ = alice.predict("a ball", ["attributes"], 1, 2, 0, False, api_name="/generate")
    assert mine.count("<img") == 1 and plain == "" and meta["vanilla"] is None


def test_memory_from_a_chat_turn_kept_with_one_click_and_used_next(server):
    """What the user says is proposed under the answer; "Remember this" keeps it (in this session: the
    proposals are the session's own); the next answer says it used it; bob's session cannot settle alice's."""
    url, images, demo = server
    alice = client(url, "alice", "pw-a")
    photo = gradio_client.handle_file(str(images["red"]))
    if not any(row[0] == "<bo>" for row in alice.predict(api_name="/list_concepts")[1]["data"]):
        alice.predict("<bo>", "dog", "my shiba", [photo], api_name="/add_concept")
    *_, memory = alice.predict(photo, "Bo turned four last week.", [], False, api_name="/chat")
    assert "Remember this?" in memory and "Bo turned four last week." in memory
    store = demo.mmpersona_app.db.store
    waiting = store.memory("alice", status="proposed")
    assert [e.text for e in waiting] == ["Bo turned four last week."]
    bob = client(url, "bob", "pw-b")
    assert "nothing proposed" in bob.predict(api_name="/remember")  # his session has no proposals of hers
    assert "remembered 1 entry" in alice.predict(api_name="/remember")
    assert store.memory_entry("alice", waiting[0].id).current
    *_, memory = alice.predict(photo, "How old is <bo>?", [], False, api_name="/chat")
    assert "Remembered and used:\n• Bo turned four last week. (a state: age)" in memory
    store.delete_memory("alice", waiting[0].id)


def test_chats_are_kept_and_a_past_one_is_continued(server):
    """Each session's chat is kept from its first answer (the session continues the same one); a past chat opens
    with its turns and its photo, and the next answer continues it; bob can neither open nor delete it."""
    url, images, demo = server
    alice = client(url, "alice", "pw-a")
    photo = gradio_client.handle_file(str(images["red"]))
    if not any(row[0] == "<bo>" for row in alice.predict(api_name="/list_concepts")[1]["data"]):
        alice.predict("<bo>", "dog", "my shiba", [photo], api_name="/add_concept")
    store = demo.mmpersona_app.db.store
    before = {c.id for c in store.conversations("alice")}
    shown, *_ = alice.predict(photo, "Is this my dog?", [], False, api_name="/chat")
    alice.predict(photo, "What colour is it?", shown, False, api_name="/chat")
    new = [c for c in store.conversations("alice") if c.id not in before]
    assert len(new) == 1 and new[0].turns == 2 and new[0].title == "Is this my dog?"
    kept = store.turns("alice", new[0].id)
    assert kept[0].image is not None and kept[0].image == kept[1].image and kept[1].question == "What colour is it?"

    later = client(url, "alice", "pw-a")  # another visit: opens the past chat and goes on with it
    messages, image, photo, status = later.predict(new[0].id, api_name="/open_chat")
    assert [m["content"][0]["text"] for m in messages][0::2] == ["Is this my dog?", "What colour is it?"]
    assert image is None and "data:image" in photo and "continuing" in status  # the photo inline, not a file
    shown, rows, *_ = later.predict(None, "And now?", messages, False, api_name="/chat")
    assert rows["data"][0][0] == "<bo>"  # retrieved from the chat's own photo
    assert store.conversation("alice", new[0].id).turns == 3
    assert store.turns("alice", new[0].id)[-1].image == kept[0].image  # the photo it opened with

    bob = client(url, "bob", "pw-b")
    with pytest.raises(Exception, match="no conversation|not in the list|Value"):
        bob.predict(new[0].id, api_name="/open_chat")
    assert store.conversation("alice", new[0].id).turns == 3
    assert "deleted" in later.predict(api_name="/delete_chat")[-1]
    assert new[0].id not in {c.id for c in store.conversations("alice")}


def test_a_concept_introduced_in_the_chat_is_added_with_one_click(server):
    """"This is my friend Anna." shows a new-concept proposal under the answer; "Add the new concept" makes it from
    the kept turn's photo; bob's session has none to add."""
    url, images, demo = server
    alice = client(url, "alice", "pw-a")
    photo = gradio_client.handle_file(str(images["blue"]))
    if not any(row[0] == "<bo>" for row in alice.predict(api_name="/list_concepts")[1]["data"]):
        alice.predict("<bo>", "dog", "my shiba", [gradio_client.handle_file(str(images["red"]))],
                      api_name="/add_concept")
    *_, memory = alice.predict(photo, "This is my friend Anna.", [], False, api_name="/chat")
    assert "New concept?" in memory and "<Anna> (person, my friend), from the whole photo" in memory
    store = demo.mmpersona_app.db.store
    assert store.find("alice", "Anna") is None  # not before the click
    bob = client(url, "bob", "pw-b")
    assert "no new concept" in bob.predict(api_name="/add_new_concept")
    assert "added <Anna>" in alice.predict(api_name="/add_new_concept")
    anna = store.find("alice", "Anna")
    assert anna.category == "person" and anna.info == "my friend" and len(anna.images) == 1
    assert "no new concept" in alice.predict(api_name="/add_new_concept")  # added once
    store.delete("alice", anna.id)


def test_users_never_see_each_other(server):
    url, images, _ = server
    alice, bob = client(url, "alice", "pw-a"), client(url, "bob", "pw-b")
    alice.predict("<secret>", "thing", "alice only", [gradio_client.handle_file(str(images["blue"]))],
                  api_name="/add_concept")
    gallery, table, choices = bob.predict(api_name="/list_concepts")
    assert "<img" not in gallery and not table["data"] and choices["choices"] == []
    with pytest.raises(gradio_client.exceptions.AppError, match="no concept"):
        bob.predict("<secret>", api_name="/delete_concept")
    bob.predict("<rex>", "dog", "bob's dog", [gradio_client.handle_file(str(images["red"]))], api_name="/add_concept")
    _, alice_table, _ = alice.predict(api_name="/list_concepts")
    assert "<rex>" not in [row[0] for row in alice_table["data"]]
    with pytest.raises((ValueError, gradio_client.exceptions.AuthenticationError), match="(?i)login|credential"):
        gradio_client.Client(url, auth=("alice", "wrong"), verbose=False)


def test_concurrent_requests(server):
    url, images, demo = server
    carol = client(url, "alice", "pw-a")
    jobs = [carol.submit(f"<c{i}>", "toy", f"concept {i}", [gradio_client.handle_file(str(images["blue"]))],
                         api_name="/add_concept") for i in range(4)]
    for job in jobs:
        job.result(timeout=120)
    chats = [carol.submit(gradio_client.handle_file(str(images["blue"])), f"Is <c{i}> here?", [], False,
                          api_name="/chat") for i in range(4)]
    results = [job.result(timeout=300) for job in chats]
    assert all(r[0][-1]["role"] == "assistant" for r in results)
    handles = {row[0] for row in carol.predict(api_name="/list_concepts")[1]["data"]}
    assert {f"<c{i}>" for i in range(4)} <= handles  # no lost writes
    app = demo.mmpersona_app
    assert app.db.store.count("alice") >= 6


def logged_in(url, user, password):
    import httpx

    http = httpx.Client(base_url=url.rstrip("/"), timeout=60)
    assert http.post("/login", data={"username": user, "password": password}).status_code == 200
    return http


def test_ids_and_files_stay_with_the_user_who_made_them(server):
    """The attacks of a logged-in user on another's results: upload URLs, upload paths as inputs, event ids,
    session hashes. Each is refused by the app's SessionGuard, and each still works for its owner."""
    url, images, _ = server
    alice, bob = logged_in(url, "alice", "pw-a"), logged_in(url, "bob", "pw-b")
    private = Path(images["red"]).with_name("private.png")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(private)  # bytes only alice uploads (Gradio names uploads by
    with open(private, "rb") as f:                        # content: the same bytes from bob would be his too)
        uploaded = alice.post("/gradio_api/upload", files={"files": ("red.png", f, "image/png")})
    assert uploaded.status_code == 200
    path = uploaded.json()[0]
    assert alice.get(f"/gradio_api/file={path}").status_code == 200
    assert bob.get(f"/gradio_api/file={path}").status_code == 403  # her upload's URL
    file_ref = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "red.png"}
    stolen = bob.post("/gradio_api/call/add_concept", json={"data": ["<stolen>", "", "", [file_ref]]})
    assert stolen.status_code == 403  # her upload as his input
    # an event id: alice's list of concepts, fetched by bob
    event = alice.post("/gradio_api/call/list_concepts", json={"data": []}).json()["event_id"]
    assert bob.get(f"/gradio_api/call/list_concepts/{event}").status_code == 403
    mine = alice.get(f"/gradio_api/call/list_concepts/{event}")
    assert mine.status_code == 200 and "event: complete" in mine.text
    # a session hash: alice's queue session, read by bob
    info = alice.get("/config").json()
    fn_index = next(d["id"] for d in info["dependencies"] if d.get("api_name") == "list_concepts")
    joined = alice.post("/gradio_api/queue/join", json={"data": [], "fn_index": fn_index,
                                                          "session_hash": "alice-session-1"})
    assert joined.status_code == 200
    assert bob.get("/gradio_api/queue/data", params={"session_hash": "alice-session-1"}).status_code == 403
    with alice.stream("GET", "/gradio_api/queue/data", params={"session_hash": "alice-session-1"}) as r:
        assert r.status_code == 200
    assert bob.post("/gradio_api/cancel", json={"session_hash": "alice-session-1", "fn_index": fn_index,
                                                "event_id": "x"}).status_code == 403
    # a file in Gradio's upload folder that nobody is known to have uploaded is served to nobody
    anon = Path(path).parent.parent / "planted" / "x.png"
    anon.parent.mkdir(parents=True, exist_ok=True)
    anon.write_bytes(b"x")
    assert alice.get(f"/gradio_api/file={anon}").status_code == 403
    # logged out: nothing
    import httpx

    assert httpx.get(url.rstrip("/") + f"/gradio_api/file={path}").status_code in (401, 403)


def test_oversized_uploads_are_refused(server):
    url, _, _ = server
    alice = logged_in(url, "alice", "pw-a")
    big = b"\0" * (65 * 1024 * 1024)  # over the app's 64 MB limit
    response = alice.post("/gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert response.status_code == 413


def test_feedback_and_choices_store_exactly_what_was_picked(tmp_path, tiny_cache):
    """The app's feedback and onboarding handlers, without a server: what each stores, and what each refuses."""
    import io

    import gradio_app
    from concept_db.types import content_hash

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, format="PNG")
        return buf.getvalue()

    app = gradio_app.App("tiny", tmp_path / "a.db", "cpu")
    shown = {"prompt": "a ball", "images": [png((200, 0, 0)), png((0, 200, 0)), png((0, 0, 200))]}
    assert "liked image 2" in app.feedback("alice", "like", shown, 1, "green")
    like = app.db.store.profile_events("alice", "like")[0]
    assert like.image == content_hash(shown["images"][1]) and like.comment == "green"
    assert "over 2 other" in app.feedback("alice", "choose", shown, 0, "")
    pairs = app.db.store.profile_events("alice", "pair")
    assert [(p.image, p.other) for p in pairs] == [(content_hash(shown["images"][0]), content_hash(x))
                                                   for x in shown["images"][1:]]
    with pytest.raises(ValueError, match="generate two or more"):
        app.feedback("alice", "choose", {"prompt": "a", "images": shown["images"][:1]}, 0, "")
    with pytest.raises(ValueError, match="generate first"):
        app.feedback("alice", "like", None, 0, "")
    with pytest.raises(ValueError, match="start the onboarding"):
        app.taste_choose("alice", None, "A", "")
    pair = {"prompt": "a lake", "images": shown["images"][:2], "step": 0}
    app.taste_choose("alice", pair, "B", "calmer")
    last = app.db.store.profile_events("alice", "pair")[-1]
    assert (last.image, last.other, last.comment) == (content_hash(pair["images"][1]), content_hash(pair["images"][0]),
                                                      "calmer")
    assert "3 choice(s) made" in app.taste_progress("alice")
    # the fourth choice trains the reward model in the background; its status is kept for the page
    app.taste_choose("alice", pair, "A", "")
    deadline = time.monotonic() + 60
    while app.training_status("alice").startswith("training"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "trained on 4 choice(s), 1 like(s)" in app.training_status("alice")
    entries = app.profile_entries("alice")
    assert len(entries) == 5 and entries[0]["kind"] == "pair" and all(e["thumbs"] for e in entries)
    assert app.profile_entries("bob") == [] and app.training_status("bob") == ""
    app.db.close()
