"""Several concepts in one photo: boxes in each model's coordinate convention (checked against the processor's own
resize), numbered marks, one concept per region, and verification by the VLM; on the tiny models end to end."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmpersona.conceptdb import ConceptDB
from mmpersona.models import Detection, load_vlm
from pipelines.prompt import Grounding, PromptBudget, PromptBuilder
from pipelines.retrieval import Retriever, RetrievedConcept, iou

COLOURS = {"bo": (205, 35, 30), "mam": (35, 60, 195), "kiki": (40, 170, 60), "dug": (230, 200, 40)}
BOXES = {"bo": (0, 0, 60, 60), "mam": (70, 0, 130, 60), "kiki": (0, 70, 60, 130), "dug": (70, 70, 130, 130)}


def scene() -> Image.Image:
    """A 4-concept photo: each concept's colour in its own quadrant."""
    img = Image.new("RGB", (130, 130), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for name, box in BOXES.items():
        draw.rectangle(box, fill=COLOURS[name])
    return img


class ColourEmbedder:
    """A test double for the image embedder: an image's vector is looked up by its mean colour's nearest entry
    in `table`, so that similarities are exactly what a test needs (the real embedder runs elsewhere)."""

    name, dim = "colour-table", 4

    def __init__(self, table: dict[tuple[int, int, int], list[float]]):
        self.table = {k: np.asarray(v, np.float32) / np.linalg.norm(v) for k, v in table.items()}

    def embed_images(self, images, **_):
        from mmpersona.images import load_image

        out = []
        for item in images:
            mean = np.asarray(load_image(item).convert("RGB"), np.float32).reshape(-1, 3).mean(0)
            key = min(self.table, key=lambda c: float(np.sum((np.asarray(c) - mean) ** 2)))
            out.append(self.table[key])
        return np.stack(out)

    def embed_texts(self, texts, **_):
        return np.zeros((len(texts), self.dim), np.float32)


class KnownBoxes:
    """A detector double: the quadrants of `scene()` (and one box overlapping the first), as a detector finds
    them: one pass, every category a query."""

    def __init__(self, boxes):
        self.boxes, self.calls = boxes, 0

    def detect(self, image, labels, *, threshold=0.1, top_k=None):
        self.calls += 1
        return [Detection(labels[0], 0.9 - 0.01 * i, box) for i, box in enumerate(self.boxes)][:top_k]


def test_one_concept_per_region_not_the_best_match_twice(tmp_path):
    """Two regions whose best match is the same concept (a "hub" reference): without assignment both give <bo>
    and <mam> is lost; with it, the region that fits <mam> second-best gets <mam>. Overlapping boxes merge."""
    red, pink = (205, 35, 30), (35, 60, 195)
    embedder = ColourEmbedder({red: [1, 0.2, 0, 0], pink: [0.8, 0.6, 0, 0]})
    with ConceptDB(tmp_path / "a.db", embedder=embedder) as db:
        db.add("u", "bo", [Image.new("RGB", (8, 8), red)], category="thing")
        db.add("u", "mam", [Image.new("RGB", (8, 8), (35, 61, 195))], category="thing")
        # both regions are red-ish: their best match is <bo>, <mam> second
        boxes = [BOXES["bo"], (1, 1, 59, 59), BOXES["mam"]]  # the second box is the first one found again
        photo = Image.new("RGB", (130, 130), red)
        retriever = Retriever(db, KnownBoxes(boxes))
        plain = Retriever.merge(retriever.by_regions("u", photo, k=1))
        assert [r.concept.name for r in plain] == ["bo"]
        assigned = retriever.by_regions("u", photo, k=1, assign=True)
        assert [r.concept.name for r in assigned] == ["bo", "mam"]
        assert [r.box for r in assigned] == [BOXES["bo"], BOXES["mam"]]  # (1, 1, 59, 59) merged into the first
    assert iou(BOXES["bo"], (1, 1, 59, 59)) > 0.9 and iou(BOXES["bo"], BOXES["dug"]) == 0.0


@pytest.mark.parametrize("model", ["tiny:qwen2.5-vl", "tiny:qwen2-vl"])
def test_input_size_is_the_processors_own_resize(model, tiny_cache):
    """Qwen2.5-VL boxes are pixels of the resized input: `input_size` must be the size the processor produces
    (its image_grid_thw x patch size), at several photo sizes and visual budgets (1024 tokens is RePIC's)."""
    vlm = load_vlm(model, preset="tiny", device="cpu")
    patch = vlm.processor.image_processor.patch_size
    for budget in (1024, 256):
        vlm.set_visual_budget(budget)
        for size in ((640, 480), (1920, 1080), (4032, 3024), (33, 500), (301, 300)):
            img = Image.new("RGB", size, (90, 90, 90))
            inputs = vlm.inputs([{"role": "user", "content": [{"type": "image", "image": img},
                                                              {"type": "text", "text": "."}]}])
            _, gh, gw = inputs["image_grid_thw"][0].tolist()
            assert vlm.input_size(img) == (gw * patch, gh * patch), (size, budget)


def test_box_conventions_per_family(tiny_cache):
    photo = Image.new("RGB", (1920, 1080))
    box = (960, 270, 1920, 1080)
    qwen25 = load_vlm("tiny:qwen2.5-vl", preset="tiny", device="cpu")
    w, h = qwen25.input_size(photo)
    assert qwen25.box_convention == "absolute"
    assert qwen25.box_in_prompt(box, photo) == [round(960 * w / 1920), round(270 * h / 1080), w, h]
    assert load_vlm("tiny:qwen2-vl", preset="tiny", device="cpu").box_in_prompt(box, photo) == [500, 250, 1000, 1000]
    llava = load_vlm("tiny:llava", preset="tiny", device="cpu")
    # LLaVA sees the photo padded to a 1920x1920 square (centred: 420 px above it), as its grounding data did
    assert llava.box_convention == "normalized" and llava.box_in_prompt(box, photo) == [0.5, 0.359, 1.0, 0.781]


def _retrieved(db_concepts):
    return [RetrievedConcept(c, 0.9, "region", BOXES[c.name]) for c in db_concepts]


def test_grounded_prompt_boxes_and_marks(tmp_path, tiny_embedder):
    with ConceptDB(tmp_path / "g.db", embedder=tiny_embedder) as db:
        concepts = [db.add("u", name, [Image.new("RGB", (8, 8), colour)], category="toy")
                    for name, colour in COLOURS.items()]
    photo = scene()
    builder = PromptBuilder(special_tokens=["<image>"])
    boxes = Grounding("boxes", box_text=lambda b: str(list(b)), note="A box is in pixels.")
    prompt = builder.build("Who is here?", photo, _retrieved(concepts), grounding=boxes)
    system = prompt.messages[0]["content"][0]["text"]
    assert '- <bo> ("toy") [in the photo at [0, 0, 60, 60]]:' in system and "A box is in pixels." in system
    assert prompt.marked is None
    marked = builder.build("Who is here?", photo, _retrieved(concepts), grounding=Grounding("marks"))
    system = marked.messages[0]["content"][0]["text"]
    assert [f"<{n}> (\"toy\") [mark {i}]" in system for i, n in enumerate(COLOURS, 1)] == [True] * 4
    sent = [p["image"] for p in marked.messages[-1]["content"] if p["type"] == "image"]
    assert sent == [marked.marked] and marked.marked is not photo
    # the outline is drawn on the copy (the box edge changed colour), the photo itself is untouched
    from pipelines.marks import PALETTE

    assert marked.marked.getpixel((0, 30)) == PALETTE[0] and marked.marked.getpixel((70, 30)) == PALETTE[1]
    assert photo.getpixel((0, 30)) == COLOURS["bo"] and marked.marked.getpixel((30, 40)) == COLOURS["bo"]
    both = builder.build("Who is here?", photo, _retrieved(concepts), grounding=Grounding("marks", original=True))
    texts = [p["text"] for p in both.messages[-1]["content"] if p["type"] == "text"]
    assert texts[:2] == ["The user's photo:", "The user's photo with numbered marks:"]
    images_first = PromptBuilder(interleaved=False).build("Who?", photo, _retrieved(concepts),
                                                          grounding=Grounding("marks", original=True))
    content = images_first.messages[-1]["content"]
    assert [p["type"] for p in content] == ["image", "image", "text", "text"]
    assert content[2]["text"] == "Image 1: the user's photo. Image 2: the user's photo with numbered marks."
    # a concept without a box (a mention) has no mark; the budget's cut concepts get none either
    few = PromptBuilder(budget=PromptBudget(max_concepts=2))
    cut = few.build("Q", photo, [RetrievedConcept(concepts[0], 1.0, "mention"), *_retrieved(concepts[1:])],
                    grounding=Grounding("marks"))
    assert "[mark 1]" in cut.messages[0]["content"][0]["text"] and "[mark 2]" not in cut.messages[0]["content"][0]["text"]


@pytest.fixture
def four(tmp_path, tiny_embedder):
    db = ConceptDB(tmp_path / "four.db", embedder=tiny_embedder)
    photo = scene()
    for name in COLOURS:
        db.add("u", name, [photo.crop(BOXES[name])], category="toy", info=f"{name} is a toy")
    yield db, photo
    db.close()


@pytest.mark.parametrize("model", ["tiny:qwen2.5-vl", "tiny:llava"])
def test_multi_concept_options_end_to_end(four, model, tiny_cache):
    """Every option through the real tiny VLM: regions with assignment, boxes, marks (with the original), and
    verification, whose checks are bounded and timed."""
    from pipelines.vlm import PersonalizedVLMPipeline

    db, photo = four
    pipe = PersonalizedVLMPipeline(db, vlm=model, preset="tiny", device="cpu", max_new_tokens=2, min_score=-1.0,
                                   k=4, detector=KnownBoxes(list(BOXES.values())), regions=True, assign=True)
    prompt, candidates, _ = pipe.prepare(photo, "Who is in this photo?", user="u")
    regions = [r for r in candidates if r.box is not None]
    assert len({r.concept.id for r in regions}) == len(regions) == 4  # four regions, four different concepts
    boxed = pipe.variant(boxes=True)
    prompt, _, _ = boxed.prepare(photo, "Who is in this photo?", user="u")
    system = prompt.messages[0]["content"][0]["text"]
    assert system.count("[in the photo at [") == 4 and "A box [x0, y0, x1, y1]" in system
    marks = pipe.variant(marks=True, original=True)
    answer = marks(photo, "Who is in this photo?", user="u")
    assert [p["image"] for p in answer.messages[-1]["content"] if p["type"] == "image"] == ["<image 130x130>"] * 2
    asked = []
    checking = pipe.variant(verify=True, max_checks=2)
    checking.generate = lambda messages, **kw: asked.append(messages) or ("Yes." if len(asked) == 1 else "No")
    prompt, kept, timings = checking.prepare(photo, "Who is in this photo?", user="u")
    assert timings["verify_checks"] == 2 and timings["verify_ms"] >= 0 and len(kept) == 1
    images = [p for p in asked[0][0]["content"] if p["type"] == "image"]
    assert len(images) == 2 and images[1]["image"].size == (60, 60)  # the region's crop beside the reference
    with pytest.raises(Exception, match="not both"):
        pipe.variant(boxes=True, marks=True)
    with pytest.raises(Exception, match="needs `marks`"):
        pipe.variant(original=True)
    real = pipe.variant(verify=True, max_checks=1)(photo, "Who is in this photo?", user="u")  # the real VLM checks
    assert real.timings["verify_checks"] == 1


@pytest.mark.parametrize("size", [2, 4])
def test_each_option_is_a_row_of_the_evaluation_on_repics_sets(size, tmp_path, tiny_cache):
    """RePIC's 2- and 4-concept query templates and database in its layout, every multi-concept option a row of
    its own (through the real tiny detector), scored by RePIC's own rule."""
    import json

    from pipelines.peers import datasets
    from pipelines.peers.run import run
    from pipelines.peers.scoring import score_file
    from pipelines.vlm import PersonalizedVLMPipeline

    root = tmp_path / "RePIC"
    names = list(COLOURS)[:size]
    db_dir = root / f"data/database_tot/database_{size}_concepts"
    db_dir.mkdir(parents=True)
    photo = scene()
    concept_dict = {}
    for name in names:
        photo.crop(BOXES[name]).save(db_dir / f"{name}.jpg")
        concept_dict[f"<{name}>"] = {"name": name, "image": f"./data/database_tot/database_{size}_concepts/{name}.jpg",
                                     "info": f"{name} info", "category": "toy"}
    (db_dir / "database_mod.json").write_text(json.dumps({"concept_dict": concept_dict, "path_to_concept": {}}))
    (root / "data/query").mkdir(parents=True)
    photo.save(root / "data/query/scene.jpg")
    gold = [f"<{n}>" for n in names]
    queries = {"./data/query/scene.jpg": [gold] if size == 4 else gold}
    (root / "q.json").write_text(json.dumps(queries))
    bench = datasets.repic(root, root / "q.json", db_dir / "database_mod.json")
    assert [i.scorer for i in bench.items] == [f"repic-{size}"]
    methods = ["retrieval", "retrieval:regions", "retrieval:regions,assign", "retrieval:regions,assign,boxes",
               "retrieval:regions,assign,marks,original", "retrieval:regions,assign,verify,max_checks=2",
               "oracle"]
    with ConceptDB(tmp_path / "e.db", preset="tiny", device="cpu") as db:
        from pipelines.peers.run import register

        register(db, "u", bench.concepts)
        pipe = PersonalizedVLMPipeline(db, preset="tiny", device="cpu", max_new_tokens=3)
        report = run(pipe, "u", bench, methods, out=tmp_path / "out", progress=False)
    assert list(report["results"]) == methods
    for method in methods:
        metrics = report["results"][method][f"caption-{size}"]
        written = json.loads((tmp_path / "out" / f"{method.replace(':', '_').replace(',', '_')}-caption-{size}.json")
                             .read_text())
        assert score_file(f"repic-{size}", written) == {k: v for k, v in metrics.items() if k != "scorer"}
        assert metrics["slots"] == size


# ------------------------------------------------------------------------------------------ instance embedder


def test_tiny_dinov2_through_the_real_loader(tiny_cache):
    """The tiny DINOv2 loads through AutoModel / AutoImageProcessor.from_pretrained as facebook/dinov2-base
    does, with its processor's rule: bicubic resize of the short side, centre crop (borders of a crop lost, so
    the embedder pads each image to a square first: tests/test_square_inputs.py)."""
    from mmpersona.models import load_instance_embedder

    emb = load_instance_embedder(preset="tiny", device="cpu")
    assert (emb.name, emb.dim, type(emb.model).__name__) == ("tiny:dinov2+square", 32, "Dinov2Model")
    assert type(emb.processor).__name__.startswith("BitImageProcessor")
    vectors = emb.embed_images([scene(), scene().crop(BOXES["bo"]), Image.new("RGB", (300, 40), (9, 9, 9))])
    assert vectors.shape == (3, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # the processor alone drops a border the centre crop cuts; the embedder (padding first) keeps it
    a = Image.new("RGB", (64, 64), (200, 30, 30))
    b = a.copy()
    ImageDraw.Draw(b).rectangle((0, 0, 63, 2), fill=(0, 0, 255))
    pixels = emb.processor(images=[a, b], return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (56, 56) and bool((pixels[0] == pixels[1]).all())
    va, vb = emb.embed_images([a, b])
    assert not np.allclose(va, vb, atol=1e-4)


def test_fused_scores_follow_the_documented_rule(tmp_path):
    """CLIP likes <bo> best, the instance embedder <mam>; fused = (1 - w) CLIP + w instance decides, and a
    concept outside the instance list takes that list's lowest score."""
    from pipelines.retrieval import Retriever

    red, blue = (205, 35, 30), (35, 60, 195)
    clip = ColourEmbedder({red: [1, 0, 0, 0], blue: [0.8, 0.6, 0, 0]})
    inst = ColourEmbedder({red: [0, 0, 1, 0], blue: [0, 0, 0.2, 0.98]})
    inst.name = "instance-table"
    with ConceptDB(tmp_path / "f.db", embedder=clip) as db:
        db.add("u", "bo", [Image.new("RGB", (8, 8), red)])
        db.add("u", "mam", [Image.new("RGB", (8, 8), blue)])
        photo = Image.new("RGB", (8, 8), red)  # CLIP: bo 1.0, mam 0.8
        plain = Retriever(db).by_image("u", photo, k=2)
        assert [r.concept.name for r in plain] == ["bo", "mam"]
        fused = Retriever(db, instance=inst, instance_weight=0.5)
        # the instance embedder sees the photo as mam's: instance bo 0.2, mam 1.0
        fused.instance_vectors = lambda images: inst.embed_images([Image.new("RGB", (8, 8), blue)] * len(images))
        got = fused.by_image("u", photo, k=2)
        # bo: 0.5 * 1.0 + 0.5 * 0.2 = 0.6; mam: 0.5 * 0.8 + 0.5 * 1.0 = 0.9
        assert [r.concept.name for r in got] == ["mam", "bo"]
        assert [round(r.score, 4) for r in got] == [0.9, 0.6]
        assert fused.ensure_instance_vectors("u") == 0  # vectors computed on first use, kept in the database
        assert set(db.store.vectors("u", db.store.find("u", "bo").id)) == {"colour-table", "instance-table"}


def test_instance_vectors_lazily_once_per_change_and_by_reindex(four, tiny_cache, tmp_path, monkeypatch):
    """The instance embedder's vectors are computed on the first query, not again until the user's concepts
    change, then only for what is new; `concepts reindex` computes the missing ones; other users untouched."""
    import json
    import os
    import subprocess
    import sys

    from pipelines.vlm import PersonalizedVLMPipeline

    db, photo = four
    db.add("other", "zed", [photo.crop(BOXES["kiki"])])
    pipe = PersonalizedVLMPipeline(db, vlm="tiny:qwen2.5-vl", preset="tiny", device="cpu", max_new_tokens=2,
                                   instance=True, regions=True, assign=True,
                                   detector=KnownBoxes(list(BOXES.values())), min_score=-1.0)
    import mmpersona.instance as instance_module

    computed = []
    ensure = instance_module.ensure_vectors
    monkeypatch.setattr(instance_module, "ensure_vectors",
                        lambda *a, **kw: computed.append(ensure(*a, **kw)) or computed[-1])
    pipe(photo, "Who is here?", user="u")
    assert computed == [4]  # the four reference images, once, on the first query
    pipe(photo, "Who is here?", user="u")
    assert computed == [4]  # nothing changed: not even a listing
    db.add("u", "extra", [Image.new("RGB", (20, 20), (1, 2, 3))])
    pipe(photo, "Who is here?", user="u")
    assert computed == [4, 1]  # only the new concept's image
    assert "tiny:dinov2+square" not in db.store.vectors("other", db.store.find("other", "zed").id)
    db.close()
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "mmpersona", "--preset", "tiny", "--device", "cpu", "--db",
                          str(tmp_path / "four.db"), "--user", "other", "--json", "concepts", "reindex"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["computed"] == {"tiny:clip": 0, "tiny:dinov2+square": 1}


def test_app_draws_each_region_concepts_box_label_and_score(four, tiny_cache, tmp_path):
    """The chat with "find each concept" on: the photo comes back with each region-retrieved concept's box,
    label and score drawn (inline, as the other outputs)."""
    import base64
    import io

    import gradio_app
    from pipelines.marks import PALETTE

    db, photo = four
    app = gradio_app.App("tiny", tmp_path / "four.db", device="cpu")
    app.region_pipe.retriever.detector = KnownBoxes(list(BOXES.values()))
    app.region_pipe.min_score = -1.0
    path = tmp_path / "scene.png"
    photo.save(path)
    *_, (chat, rows, thumbs, boxes, status, _, _, _, _) = list(app.chat("u", str(path), "Who is here?", [], regions=True))
    assert 'data-boxes="4"' in boxes and all(f"&lt;{n}&gt;" in boxes for n in COLOURS)  # labels in the alt text
    drawn = Image.open(io.BytesIO(base64.b64decode(boxes.split("base64,")[1].split('"')[0])))
    assert drawn.size == photo.size
    pixel = drawn.convert("RGB").getpixel((0, 30))  # on bo's box edge: an outline colour (WebP-compressed)
    assert min(sum(abs(a - b) for a, b in zip(pixel, colour, strict=True)) for colour in PALETTE[:4]) < 30
    assert sorted(row[0] for row in rows if row[3]) == sorted(f"<{n}>" for n in COLOURS)
    *_, (_, _, _, plain, _, _, _, _, _) = list(app.chat("u", str(path), "Who is here?", []))
    assert plain == ""
