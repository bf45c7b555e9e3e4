"""The app in a real browser: Debian's Chromium driven by Playwright (no browser download: no internet here).

Each flow as a new user would do it, behind the login and the app's SessionGuard, asserting the state it leaves
in the database, not only what rendered: two concepts that keep their own photos, editing and deleting one;
chat with the retrieved concepts; memory proposed in the chat, kept, listed and forgotten; the taste onboarding (one choice, one pair event); feedback under generated
images; the profile list, where removing an entry removes it. One screenshot per flow, taken after the images
have rendered, goes to artifacts/browser/ (kept by CI as test artifacts).
"""

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
SHOTS = ("1-concepts.png", "2-chat.png", "3-taste.png", "4-generate-feedback.png", "5-profile.png")


def _need_browser():
    if os.environ.get("CI") and not CHROMIUM:
        pytest.fail("CI must have Debian's chromium installed (.ci/run installs it)")
    if not CHROMIUM:
        pytest.skip("no Chromium here: apt-get install chromium (CI installs it)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extra)")
    pytest.importorskip("gradio", reason="the app extra is not installed")


def photo(path: Path, color, kind="ellipse", size=(96, 72)) -> Path:
    img = Image.new("RGB", size, (240, 240, 240))
    getattr(ImageDraw.Draw(img), kind)((14, 10, size[0] - 14, size[1] - 10), fill=color)
    img.save(path)
    return path


def hash_of(path: Path) -> str:
    from concept_db.types import content_hash

    return content_hash(path.read_bytes())


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_cache):
    """The app (multi-user, one login) and a logged-in Chromium page; `db` is the app's own database."""
    _need_browser()
    import gradio_app
    from playwright.sync_api import expect, sync_playwright

    tmp = tmp_path_factory.mktemp("browser")
    files = {"bo1": photo(tmp / "bo1.png", (210, 30, 30)), "bo2": photo(tmp / "bo2.png", (190, 50, 40), size=(64, 96)),
             "dragon": photo(tmp / "dragon.png", (30, 150, 60), "rectangle")}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name in SHOTS:
        (ARTIFACTS / name).unlink(missing_ok=True)
    demo = gradio_app.build_app("tiny", tmp / "app.db", device="cpu", multi_user=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gradio_app.launch(demo, logins={"alice": "pw-a"}, server_name="127.0.0.1", server_port=port,
                      prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(120_000)
            expect.set_options(timeout=90_000)  # the first call of each model loads it
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("input[type=text], input:not([type])").first.fill("alice")
            page.locator("input[type=password]").fill("pw-a")
            page.get_by_role("button", name=re.compile("login", re.IGNORECASE)).click()
            expect(page.get_by_text("Signed in")).to_be_visible(timeout=60_000)
            yield page, demo.mmpersona_app.db, files
            browser.close()
    finally:
        demo.close()


def says(box, text: str) -> None:
    """Until the text box `box` holds `text` somewhere in its value."""
    from playwright.sync_api import expect

    expect(box).to_have_value(re.compile(re.escape(text)))


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def images_rendered(page, selector: str) -> None:
    """Until every image under `selector` has decoded (screenshots only after the images are there)."""
    page.wait_for_function("(s) => { const imgs = [...document.querySelectorAll(s + ' img')];"
                           " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
                           arg=selector)


def test_concepts_keep_their_own_images_and_edit_and_delete(ui):
    from playwright.sync_api import expect

    page, db, files = ui
    status = page.locator("#concept-status textarea")
    # <bo> with two photos
    field(page, "add-name").fill("<bo>")
    field(page, "add-category").fill("dog")
    field(page, "add-info").fill("my shiba inu")
    page.locator("#concept-images input[type=file]").set_input_files([str(files["bo1"]), str(files["bo2"])])
    expect(page.locator("#concept-images").get_by_role("row")).to_have_count(2)  # both uploaded
    page.get_by_role("button", name="Add concept").click()
    expect(status).to_have_value("added <bo> with 2 image(s)")
    # the form is empty again: the next concept starts from nothing
    expect(field(page, "add-name")).to_have_value("")
    expect(field(page, "add-category")).to_have_value("")
    expect(page.locator("#concept-images")).not_to_contain_text(".png")
    # then <dragon>, typed anew, with its one photo
    field(page, "add-name").fill("<dragon>")
    field(page, "add-category").fill("toy")
    page.locator("#concept-images input[type=file]").set_input_files(str(files["dragon"]))
    expect(page.locator("#concept-images").get_by_role("row")).to_have_count(1)
    expect(page.locator("#concept-images")).to_contain_text(re.compile(r"dragon\s*\.png"))
    page.get_by_role("button", name="Add concept").click()
    expect(status).to_have_value("added <dragon> with 1 image(s)")
    assert list(db.resolve("alice", "dragon").images) == [hash_of(files["dragon"])]  # exactly its own photo
    assert sorted(db.resolve("alice", "bo").images) == sorted([hash_of(files["bo1"]), hash_of(files["bo2"])])
    # the gallery: one small tile per concept, handle and category readable under it
    tiles = page.locator("#concept-gallery figure.mmp-concept")
    expect(tiles).to_have_count(2)
    expect(tiles.nth(0)).to_contain_text("dog")
    box = tiles.nth(0).locator("img").bounding_box()
    assert box["width"] <= 130 and box["height"] <= 130
    # edit <bo>: its fields fill in, its two photos show, one is removed
    field(page, "edit-pick").click()
    page.get_by_role("option", name="<bo>").click()
    expect(field(page, "edit-name")).to_have_value("<bo>")
    expect(field(page, "edit-info")).to_have_value("my shiba inu")
    expect(page.locator("figure.mmp-edit-image")).to_have_count(2)
    images_rendered(page, "#concept-gallery")
    images_rendered(page, "#edit-images")
    page.screenshot(path=str(ARTIFACTS / SHOTS[0]), full_page=True)
    field(page, "edit-info").fill("my shiba inu, 3 years old")
    page.get_by_role("button", name="Save changes").click()
    expect(status).to_have_value("saved <bo>")
    assert db.resolve("alice", "bo").info == "my shiba inu, 3 years old"
    removed = db.resolve("alice", "bo").images[1]
    page.get_by_role("button", name="Remove image 2").click()
    says(status, "1 left")
    expect(page.locator("figure.mmp-edit-image")).to_have_count(1)
    assert list(db.resolve("alice", "bo").images) == [h for h in (hash_of(files["bo1"]), hash_of(files["bo2"]))
                                                      if h != removed]
    # and a photo added to it
    again = next(f for f in (files["bo1"], files["bo2"]) if hash_of(f) == removed)
    page.locator("#edit-images-upload input[type=file]").set_input_files(str(again))
    expect(page.locator("#edit-images-upload").get_by_role("row")).to_have_count(1)
    page.get_by_role("button", name="Add these images").click()
    says(status, "<bo> has 2 image(s)")
    expect(page.locator("figure.mmp-edit-image")).to_have_count(2)
    assert sorted(db.resolve("alice", "bo").images) == sorted([hash_of(files["bo1"]), hash_of(files["bo2"])])
    # delete <dragon>: asked first
    field(page, "edit-pick").click()
    page.get_by_role("option", name="<dragon>").click()
    expect(field(page, "edit-name")).to_have_value("<dragon>")
    page.get_by_role("button", name="Delete concept").click()
    expect(page.locator("#delete-confirm")).to_contain_text("Delete <dragon> and its 1 image(s)?")
    assert db.store.find("alice", "dragon") is not None  # nothing deleted before the confirmation
    page.get_by_role("button", name="Yes, delete it").click()
    expect(status).to_have_value("deleted <dragon>")
    assert db.store.find("alice", "dragon") is None
    expect(tiles).to_have_count(1)


def test_chat_shows_the_retrieved_concepts_small_with_score_and_source(ui):
    from playwright.sync_api import expect

    page, db, files = ui
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-image input[type=file]").set_input_files(str(files["bo1"]))
    expect(page.locator("#chat-image img").first).to_be_visible(timeout=60_000)  # upload finished
    page.wait_for_function("() => document.querySelector('#chat-image img').naturalWidth > 0")  # served
    page.get_by_label("Question").fill("What is in this photo?")
    page.get_by_role("button", name="Ask").click()
    expect(page.locator("#chat-status textarea")).to_have_value(re.compile("used <bo>"), timeout=180_000)
    expect(page.locator("#chat-retrieved")).to_contain_text("<bo>")
    thumb = page.locator("#chat-thumbs figure.mmp-retrieved").first
    expect(thumb).to_contain_text(re.compile(r"<bo>\s*\d\.\d{3} · image"))
    images_rendered(page, "#chat-thumbs")
    assert thumb.locator("img").bounding_box()["width"] <= 100
    page.screenshot(path=str(ARTIFACTS / SHOTS[1]), full_page=True)


def test_memory_proposed_under_the_answer_kept_then_forgotten_in_the_memory_tab(ui):
    """A statement in the chat is proposed under the answer; "Remember this" stores it as current; the Memory tab
    lists it, and "Forget" removes it from the database."""
    from playwright.sync_api import expect

    page, db, _ = ui
    page.get_by_role("tab", name="Chat").click()
    page.get_by_label("Question").fill("Bo turned four last week.")
    page.get_by_role("button", name="Ask").click()
    memory = page.locator("#chat-memory textarea")
    expect(memory).to_have_value(re.compile(r"Remember this\?\n• Bo turned four last week\."), timeout=180_000)
    assert [e.status for e in db.store.memory("alice")] == ["proposed"]
    page.locator("#chat-remember").click()
    expect(memory).to_have_value("remembered 1 entry")
    assert [(e.text, e.current) for e in db.store.memory("alice")] == [("Bo turned four last week.", True)]
    page.get_by_role("tab", name="Memory").click()
    rows = page.locator(".memory-entry")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Bo turned four last week.")
    expect(rows.first).to_contain_text("<bo> · current · state of age")
    rows.first.get_by_role("button", name="Forget").click()
    expect(page.locator("#memory-status textarea")).to_have_value("forgot 1 entry")
    expect(rows).to_have_count(0)
    assert db.store.memory("alice") == []


def test_a_past_chat_is_reopened_and_continued(ui):
    """The chat so far is kept; "New chat" empties the conversation; picking the kept chat under "Past chats"
    shows its turns and its photo (inline), and the next question continues it about that photo."""
    from playwright.sync_api import expect

    page, db, _ = ui
    page.get_by_role("tab", name="Chat").click()
    (kept,) = db.store.conversations("alice")
    turns = kept.turns
    assert turns >= 1 and kept.title == "What is in this photo?"
    page.get_by_role("button", name="New chat").click()
    says(page.locator("#chat-status textarea"), "a new chat")
    expect(page.locator("#chat-conversation")).not_to_contain_text("What is in this photo?")
    field(page, "chat-past").click()
    page.get_by_role("option", name=re.compile("What is in this photo")).click()
    says(page.locator("#chat-status textarea"), "continuing a past chat")
    expect(page.locator("#chat-conversation")).to_contain_text("What is in this photo?")
    expect(page.locator("#chat-image img")).to_have_count(0)  # the photo field is empty: the chat's own is used
    images_rendered(page, "#chat-thumbs")
    page.get_by_label("Question").fill("Is it still here?")
    page.get_by_role("button", name="Ask").click()
    expect(page.locator("#chat-status textarea")).to_have_value(re.compile("used <bo>"), timeout=180_000)
    assert db.store.conversation("alice", kept.id).turns == turns + 1
    assert len(db.store.conversations("alice")) == 1


def test_taste_onboarding_stores_each_choice_as_one_pair(ui):
    from playwright.sync_api import expect

    page, db, _ = ui
    pairs = lambda: len(db.store.profile_events("alice", "pair"))  # noqa: E731
    before = pairs()
    page.get_by_role("tab", name="Taste").click()
    page.get_by_role("button", name="A is better").click()  # nothing shown yet: a readable error, nothing stored
    expect(page.get_by_text("start the onboarding first")).to_be_visible()
    assert pairs() == before
    page.get_by_role("button", name="Show me a pair").click()
    images_rendered(page, "#taste-a")
    images_rendered(page, "#taste-b")
    first_prompt = page.locator("#taste-prompt").inner_text()
    shown = lambda: (page.locator("#taste-a img").get_attribute("src"),  # noqa: E731
                     page.locator("#taste-b img").get_attribute("src"))
    first_pair = shown()
    field(page, "taste-comment").fill("warmer light")
    page.get_by_role("button", name="A is better").click()
    says(page.locator("#taste-status textarea"), f"choice {before + 1} stored: A")
    assert pairs() == before + 1
    event = db.store.profile_events("alice", "pair")[-1]
    assert event.comment == "warmer light" and event.prompt == first_prompt.strip()
    expect(page.locator("#taste-count")).to_contain_text(f"{before + 1} choice(s) made")
    expect(field(page, "taste-comment")).to_have_value("")
    # the next pair is shown (the most informative order may ask about the same prompt again)
    page.wait_for_function("([a, b]) => { const x = document.querySelector('#taste-a img'), "
                           "y = document.querySelector('#taste-b img'); "
                           "return x && y && (x.src !== a || y.src !== b); }", arg=list(first_pair))
    page.get_by_role("button", name="Skip").click()
    expect(page.locator("#taste-status textarea")).to_have_value("skipped")
    assert pairs() == before + 1  # a skip stores nothing
    for _ in range(3):  # the fourth choice trains the reward model in the background
        n = pairs()
        page.get_by_role("button", name="B is better").click()
        says(page.locator("#taste-status textarea"), f"choice {n + 1} stored: B")
    expect(page.locator("#taste-reward")).to_contain_text("held-out accuracy", timeout=120_000)
    assert pairs() == before + 4
    images_rendered(page, "#taste-a")
    page.screenshot(path=str(ARTIFACTS / SHOTS[2]), full_page=True)


def test_feedback_under_every_generated_image(ui):
    from playwright.sync_api import expect

    page, db, _ = ui
    likes = lambda: len(db.store.profile_events("alice", "like"))  # noqa: E731
    pairs = lambda: len(db.store.profile_events("alice", "pair"))  # noqa: E731
    like0, pair0 = likes(), pairs()
    page.get_by_role("tab", name="Generate").click()
    field(page, "generate-prompt").fill("a photo of a ball on a lawn")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#generate-status textarea")).to_have_value("generated 2 image(s)", timeout=180_000)
    images_rendered(page, "#generated-1")
    images_rendered(page, "#generated-2")
    expect(page.locator("#generated-3")).to_be_hidden()
    page.locator("#generated-1 .feedback-like").click()
    says(page.locator("#generate-status textarea"), "liked image 1")
    assert likes() == like0 + 1
    page.locator("#generated-2 .feedback-choose").click()
    says(page.locator("#generate-status textarea"), "chose image 2 over 1 other")
    assert pairs() == pair0 + 1
    assert db.store.profile_events("alice", "pair")[-1].prompt == "a photo of a ball on a lawn"
    page.screenshot(path=str(ARTIFACTS / SHOTS[3]), full_page=True)


def test_the_profile_lists_every_entry_and_removes_one(ui):
    from playwright.sync_api import expect

    page, db, _ = ui
    events = db.store.profile_events("alice")
    assert events  # from the flows above
    page.get_by_role("tab", name="Profile").click()
    entries = page.locator(".profile-entry")
    expect(entries).to_have_count(len(events))
    expect(page.locator(".profile-pair").first).to_contain_text("Chose the first")
    images_rendered(page, ".profile-entry")
    page.screenshot(path=str(ARTIFACTS / SHOTS[4]), full_page=True)
    newest = events[-1]
    from mmpersona.preferences import PreferenceProfile

    assert not PreferenceProfile(db, "alice").train_reward().cold_start
    entries.first.get_by_role("button", name="Remove").click()
    expect(page.locator("#profile-status textarea")).to_have_value(
        "removed it from your profile; your reward model learned from it went too: train again")
    assert PreferenceProfile(db, "alice").reward().cold_start  # untrained
    expect(entries).to_have_count(len(events) - 1)
    assert [e.id for e in db.store.profile_events("alice")] == [e.id for e in events if e.id != newest.id]
    # reset asks first
    page.get_by_role("button", name="Reset my profile").click()
    expect(page.locator("#reset-confirm")).to_be_visible()
    assert db.store.profile_events("alice")
    page.get_by_role("button", name="Yes, reset it").click()
    says(page.locator("#profile-status textarea"), "profile reset")
    assert db.store.profile_events("alice") == []
    expect(entries).to_have_count(0)
    for name in SHOTS:
        assert (ARTIFACTS / name).stat().st_size > 0
