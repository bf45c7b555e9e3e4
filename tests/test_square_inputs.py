"""Processors that resize the short side and centre-crop (llava-hf LLaVA-1.5's CLIPImageProcessor: 336 -> 336;
DINOv2's BitImageProcessor: 256 -> 224) cut the outer bands of a photo that is not square. Boxes, marks, verify
crops and region crops must reach the vision tower whole: the image is padded to a square of the processor's
mean colour first (LLaVA's own `expand2square`), and a box is written in fractions of that square. Checked
through the real (tiny) processors, whose rules are the published ones at small sizes."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmpersona.models import load_instance_embedder, load_vlm

GREY = (120, 120, 120)


@pytest.fixture(scope="module")
def llava(tiny_cache):
    return load_vlm("tiny:llava", preset="tiny", device="cpu")


def _pixels(vlm, image) -> np.ndarray:
    """What the processor passes to the vision tower for `image` (channels, height, width), through the same
    path as every prompt (`LoadedVLM.inputs`)."""
    inputs = vlm.inputs([{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": "."}]}])
    return inputs["pixel_values"][0].float().numpy()


def _in_square(box, size) -> list[float]:
    """`box` as fractions of the photo padded to a square (centred, as LLaVA's expand2square pastes it)."""
    w, h = size
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    x0, y0, x1, y1 = box
    return [round((x0 + left) / side, 3), round((y0 + top) / side, 3), round((x1 + left) / side, 3),
            round((y1 + top) / side, 3)]


# boxes in the outer bands a centre crop cuts: the left and right eighths of a 4:3 photo, the top and bottom
# thirds of a 1:3 one
OUTER_BOXES = [((400, 300), (2, 110, 60, 200)), ((400, 300), (340, 10, 398, 90)),
               ((100, 300), (10, 2, 90, 60)), ((100, 300), (5, 230, 95, 298))]


@pytest.mark.parametrize("size, box", OUTER_BOXES)
def test_llava_boxes_and_marks_land_where_the_vision_tower_sees_them(llava, size, box):
    """Every corner of a mark drawn in an outer band shows in the processor's output, at the place the box
    written in the prompt names; the fractions are positions in the padded square."""
    from pipelines.marks import draw_marks

    photo = Image.new("RGB", size, GREY)
    written = llava.box_in_prompt(box, photo)
    assert written == _in_square(box, size)
    plain, marked = _pixels(llava, photo), _pixels(llava, draw_marks(photo, [("1", box)]))
    diff = np.abs(marked - plain).sum(0)  # (height, width) of the vision tower's input
    side = diff.shape[0]
    assert diff.shape == (side, side)
    x0, y0, x1, y1 = (min(side - 1, int(f * side)) for f in written)
    for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):
        around = diff[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
        assert around.max() > 0.05, f"the mark's corner at ({x}, {y}) of the input is not there: {box} in {size}"


def test_llava_pads_with_the_processors_mean_colour(llava):
    """The padding normalises to zero (the processor's mean colour): no content the model could mistake for the
    photo's, and the whole 1:3 photo is there between the bands."""
    pixels = _pixels(llava, Image.new("RGB", (100, 300), (30, 30, 30)))
    side = pixels.shape[-1]
    band = int(side * 100 / 300) - 1  # the padding on either side of the photo, in input pixels
    assert np.abs(pixels[:, :, :band]).max() < 0.02 and np.abs(pixels[:, :, -band:]).max() < 0.02
    assert np.abs(pixels[:, :, side // 2]).min() > 1.0  # the dark photo, top to bottom


def test_llava_verify_crop_keeps_a_tall_regions_ends(llava, tmp_path, tiny_embedder):
    """`verify` sends a region's crop to the VLM: a 1:3 person box keeps its head and feet (a centre crop of
    the short side kept the middle third)."""
    from mmpersona.conceptdb import ConceptDB
    from pipelines.retrieval import RetrievedConcept
    from pipelines.vlm import PersonalizedVLMPipeline

    red, blue = (220, 20, 20), (20, 20, 220)
    photo = Image.new("RGB", (300, 300), GREY)
    draw = ImageDraw.Draw(photo)
    box = (100, 0, 160, 180)  # a tall region: red head, blue feet
    draw.rectangle((100, 0, 159, 29), fill=red)
    draw.rectangle((100, 150, 159, 179), fill=blue)
    with ConceptDB(tmp_path / "v.db", embedder=tiny_embedder) as db:
        concept = db.add("u", "bo", [Image.new("RGB", (8, 8), red)], category="person")
        pipe = PersonalizedVLMPipeline(db, vlm=llava, device="cpu", max_new_tokens=2)
        seen = []
        real_inputs = llava.inputs
        pipe.vlm.inputs = lambda messages, **kw: seen.append(real_inputs(messages, **kw)) or seen[-1]
        try:
            _, checks = pipe.verified("u", photo, [RetrievedConcept(concept, 0.9, "region", box)])
        finally:
            del pipe.vlm.inputs
    assert checks == 1
    crop = seen[0]["pixel_values"][1].float().numpy()  # the second image: the region's crop
    mean, std = np.asarray(llava.processor.image_processor.image_mean), np.asarray(
        llava.processor.image_processor.image_std)
    rgb = crop.transpose(1, 2, 0) * std + mean  # back to 0-1 colours
    reddish = (rgb[..., 0] > 0.6) & (rgb[..., 2] < 0.3)
    bluish = (rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.3)
    assert reddish.any() and bluish.any(), "the crop's top or bottom was cut before the vision tower"


def test_qwen_images_and_boxes_unchanged(tiny_cache):
    """Dynamic-resolution processors (Qwen2-VL, Qwen2.5-VL) see the whole photo already: nothing is padded."""
    photo = Image.new("RGB", (400, 300), GREY)
    ImageDraw.Draw(photo).rectangle((0, 0, 50, 50), fill=(200, 10, 10))
    for name in ("tiny:qwen2-vl", "tiny:qwen2.5-vl"):
        vlm = load_vlm(name, preset="tiny", device="cpu")
        prepared = vlm.prepare_image(photo)
        assert prepared.size == photo.size and prepared.tobytes() == photo.tobytes()
    assert vlm.box_in_prompt((0, 0, 400, 300), photo) == [0, 0, *vlm.input_size(photo)]


# ------------------------------------------------------------------------------------------ instance embedder


@pytest.mark.parametrize("size, band", [((60, 200), (0, 0, 59, 9)),       # a 1:3 person: its top 5%
                                        ((60, 200), (0, 190, 59, 199)),   # ... its bottom 5%
                                        ((200, 100), (0, 0, 9, 99))])     # a 2:1 dog: its left 5%
def test_instance_embedder_sees_a_crops_outer_band(size, band, tiny_cache):
    """DINOv2's processor resizes the short side and crops the centre: content only in a tall or wide crop's
    outer band did not change its vector. Padded to a square first, the whole crop is embedded."""
    emb = load_instance_embedder(preset="tiny", device="cpu")
    plain = Image.new("RGB", size, GREY)
    banded = plain.copy()
    ImageDraw.Draw(banded).rectangle(band, fill=(230, 200, 20))
    a, b = emb.embed_images([plain, banded])
    assert float(np.abs(a - b).max()) > 1e-3, "the band was cropped away before the model"


def test_instance_embedder_batches_crops_of_any_shape(tiny_cache):
    """Crops of different shapes go through in one batch, each as it would alone."""
    emb = load_instance_embedder(preset="tiny", device="cpu")
    rng = np.random.default_rng(0)
    crops = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in
             ((60, 200), (200, 100), (64, 64))]
    together = emb.embed_images(crops)
    alone = np.concatenate([emb.embed_images([c]) for c in crops])
    assert np.allclose(together, alone, atol=1e-5)


def test_marks_on_a_tall_photo_are_sized_by_its_long_side_for_llava(tiny_cache, llava, tmp_path):
    """Padded to a square, a 1:3 photo is shrunk by its long side: marks sized by its short side would thin to
    under a pixel at 336 px. The pipeline sizes them by the long side for LLaVA, by the short side for Qwen."""
    from mmpersona import ConceptDB
    from pipelines import PersonalizedVLMPipeline
    from pipelines.marks import draw_marks

    tall = Image.new("RGB", (320, 960), GREY)
    with ConceptDB(tmp_path / "c.db", preset="tiny", device="cpu") as db:
        pipe = PersonalizedVLMPipeline(db, vlm=llava, marks=True)
        assert pipe.grounding(tall).mark_side == 960
        qwen = PersonalizedVLMPipeline(db, vlm=load_vlm("tiny:qwen2.5-vl", preset="tiny", device="cpu"), marks=True)
        assert qwen.grounding(tall).mark_side is None
    box = (40, 100, 280, 400)
    thin = np.asarray(draw_marks(tall, [("1", box)]))
    wide = np.asarray(draw_marks(tall, [("1", box)], side=960))
    assert (wide[250, 40:60] != GREY).all(axis=1).sum() > (thin[250, 40:60] != GREY).all(axis=1).sum()
