"""What a remote Qwen2.5-VL receives: images already at the size the toolkit computed (`input_size`), so that the
server's own processor (vLLM, `transformers serve`: the checkpoint's published min/max pixels and `smart_resize`)
leaves them as they are, and boxes and visual-token counts agree with the local computation. No server is needed:
the server's processor is loaded here exactly as a server loads it (the checkpoint's files, published limits)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmpersona.models import load_vlm
from mmpersona.models.remote import openai_messages

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tiny_vlms():
    """Only the two tiny VLMs this file needs (not the whole tiny preset)."""
    from mmpersona.models.tiny import ensure_tiny

    return {name: str(ensure_tiny(name)) for name in ("qwen2.5-vl", "llava")}


def received(vlm, image) -> Image.Image:
    """The one image of a remote request, decoded from its PNG data URL as a server decodes it."""
    messages = openai_messages(vlm._prepared([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "Where is the dog?"}]}]))
    url = messages[0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def photo(size, box) -> Image.Image:
    img = Image.new("RGB", size, (200, 220, 240))
    ImageDraw.Draw(img).rectangle(box, fill=(200, 30, 30))
    return img


@pytest.mark.parametrize("size,box", [((1034, 775), (300, 200, 700, 500)), ((4000, 3000), (1200, 800, 2800, 2000))])
def test_a_remote_qwen_receives_images_at_the_size_its_boxes_are_written_for(tiny_vlms, size, box):
    import transformers
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    folder = tiny_vlms["qwen2.5-vl"]
    vlm = load_vlm(f"openai:http://127.0.0.1:9/v1#{folder}")  # nothing connects: only the request is built
    image = photo(size, box)
    sent = received(vlm, image)
    w, h = vlm.input_size(image)
    assert (w, h) == (1008, 756)  # smart_resize of 1034x775 within 1024 tokens (1024 * 28 * 28 pixels)
    assert sent.size == (w, h)
    # The server applies the checkpoint's own limits (min 3136, max 12,845,056 pixels) and smart_resize again. On
    # sides that are already multiples of 28 (patch 14 * merge 2) and within those limits smart_resize is the
    # identity, so the server keeps the image as sent. Sent at 1034x775 it would round up to 1036x784: 1,036
    # visual tokens instead of 972, and boxes off by 2.4-3.7 %.
    server = transformers.AutoProcessor.from_pretrained(folder)  # as the server loads it: published limits
    ip = server.image_processor
    factor = ip.patch_size * ip.merge_size
    assert factor == 28 and w % factor == 0 and h % factor == 0
    assert smart_resize(h, w, factor=factor, min_pixels=ip.size["shortest_edge"],
                        max_pixels=ip.size["longest_edge"]) == (h, w)
    grid = server.image_processor(images=[sent], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid[1] * ip.patch_size == h and grid[2] * ip.patch_size == w
    assert grid[0] * grid[1] * grid[2] // ip.merge_size ** 2 == vlm.visual_tokens(image) == 972
    # the box written in the prompt (Qwen2.5-VL: pixels of the input it receives) is where the object is in it
    written = vlm.box_in_prompt(box, image)
    red = np.argwhere((np.asarray(sent)[..., 0] > 150) & (np.asarray(sent)[..., 1] < 100))
    found = [red[:, 1].min(), red[:, 0].min(), red[:, 1].max() + 1, red[:, 0].max() + 1]
    assert np.abs(np.array(found) - np.array(written)).max() <= 2, (found, written)


def test_fixed_size_processors_get_the_prepared_image_unchanged(tiny_vlms):
    vlm = load_vlm(f"openai:http://127.0.0.1:9/v1#{tiny_vlms['llava']}")
    image = photo((300, 200), (10, 10, 50, 50))
    assert vlm.pixels_per_token is None
    assert received(vlm, image).size == vlm.prepare_image(image).size
