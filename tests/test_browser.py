"""The app in a real browser: Debian's Chromium driven by Playwright (no browser download: no internet here).

Logs in (multi-user mode, behind the app's SessionGuard), adds a concept with an image, asks about that image and
sees the concept retrieved, then generates an image.
Screenshots go to artifacts/browser/ (kept by CI as test artifacts).
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


def _need_browser():
    if os.environ.get("CI") and not CHROMIUM:
        pytest.fail("CI must have Debian's chromium installed (.ci/run installs it)")
    if not CHROMIUM:
        pytest.skip("no Chromium here: apt-get install chromium (CI installs it)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extra)")
    pytest.importorskip("gradio", reason="the app extra is not installed")


def test_add_concept_chat_and_generate_in_chromium(tmp_path, tiny_cache):
    _need_browser()
    import gradio_app
    from playwright.sync_api import expect, sync_playwright

    img = Image.new("RGB", (96, 96), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((16, 16, 80, 80), fill=(210, 30, 30))
    photo = tmp_path / "bo.png"
    img.save(photo)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # multi-user mode: the real page works behind the login and the SessionGuard (uploads, previews, queue)
    demo = gradio_app.build_app("tiny", tmp_path / "app.db", device="cpu", multi_user=True)
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
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("input[type=text], input:not([type])").first.fill("alice")
            page.locator("input[type=password]").fill("pw-a")
            page.get_by_role("button", name=re.compile("login", re.IGNORECASE)).click()
            expect(page.get_by_text("Signed in")).to_be_visible(timeout=60_000)

            # Concepts: add <bo> with its photo
            page.get_by_label("Name").fill("<bo>")
            page.get_by_label("Category").fill("dog")
            page.get_by_label("Info").fill("my shiba inu")
            page.locator("#concept-images input[type=file]").set_input_files(str(photo))
            expect(page.locator("#concept-images")).to_contain_text(".png", timeout=60_000)  # upload finished
            page.get_by_role("button", name="Add concept").click()
            expect(page.locator("#concept-status textarea")).to_have_value("added <bo> with 1 image(s)",
                                                                           timeout=120_000)
            expect(page.locator("#concept-gallery img")).to_have_count(1)  # the thumbnail, inline
            page.screenshot(path=str(ARTIFACTS / "1-concept-added.png"), full_page=True)

            # Chat: ask about the same photo; <bo> is among the retrieved concepts
            page.get_by_role("tab", name="Chat").click()
            page.locator("#chat-image input[type=file]").set_input_files(str(photo))
            expect(page.locator("#chat-image img").first).to_be_visible(timeout=60_000)  # upload finished
            page.wait_for_function("() => document.querySelector('#chat-image img').naturalWidth > 0")  # served
            page.get_by_label("Question").fill("What is in this photo?")
            page.get_by_role("button", name="Ask").click()
            expect(page.locator("#chat-status textarea")).to_have_value(re.compile("used <bo>"), timeout=180_000)
            expect(page.locator("#chat-retrieved")).to_contain_text("<bo>")  # the retrieved-concepts table
            page.screenshot(path=str(ARTIFACTS / "2-chat-retrieved.png"), full_page=True)

            # Generate: an image appears in the personalized gallery
            page.get_by_role("tab", name="Generate").click()
            page.get_by_label("Prompt").fill("a photo of a ball on a lawn")
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#generated img").first).to_be_visible(timeout=180_000)
            page.screenshot(path=str(ARTIFACTS / "3-generated.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    for name in ("1-concept-added.png", "2-chat-retrieved.png", "3-generated.png"):
        assert (ARTIFACTS / name).stat().st_size > 0
