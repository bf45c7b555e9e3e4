"""Each detector family on its own terms, through the real classes (tiny OWLv2 and tiny Grounding DINO):
its own default thresholds (OWLv2 0.1; Grounding DINO 0.35 box and 0.25 text, IDEA's recommendation), and labels
beyond its text encoder's limit (Grounding DINO reads every label from one prompt of at most 256 tokens; OWL
models take each label as a query of at most 16 tokens) still detected rather than cut off."""

import logging

import pytest
import torch
from PIL import Image, ImageDraw

from mmpersona.models import load_detector
from mmpersona.models.loaders import Detection


@pytest.fixture(scope="module")
def detectors():
    from mmpersona.models.tiny import ensure_tiny

    for name in ("owlv2", "grounding-dino"):
        ensure_tiny(name)
    return {"owlv2": load_detector("tiny:owlv2", device="cpu"),
            "grounding-dino": load_detector("tiny:grounding-dino", device="cpu")}


def scene() -> Image.Image:
    img = Image.new("RGB", (300, 200), (90, 160, 90))
    ImageDraw.Draw(img).rectangle((30, 30, 120, 150), fill=(200, 50, 50))
    ImageDraw.Draw(img).ellipse((170, 60, 280, 180), fill=(40, 60, 200))
    return img


LABELS = ["dog", "cat", "mug", "person", "plant", "red car", "bird", "tree"]


def test_grounding_dino_uses_its_own_default_thresholds(detectors):
    gd = detectors["grounding-dino"]
    default = gd.detect(scene(), LABELS)
    assert default and all(d.score > 0.35 for d in default), sorted(d.score for d in default)
    assert gd.default_threshold == 0.35 and gd.default_text_threshold == 0.25
    assert default == gd.detect(scene(), LABELS, threshold=0.35, text_threshold=0.25)
    # OWLv2's 0.1, which every caller passed before, lets through boxes Grounding DINO's authors would not keep
    loose = gd.detect(scene(), LABELS, threshold=0.1)
    assert any(d.score <= 0.35 for d in loose) and len(loose) > len(default)
    assert all(d.label in LABELS for d in loose)  # the labels as given, not the tokenizer's lower-cased pieces


def test_owl_keeps_its_default_and_callers_pass_none(detectors, tmp_path):
    from mmpersona import ConceptDB
    from mmpersona.models import load_embedder
    from mmpersona.models.tiny import ensure_tiny
    from pipelines.retrieval import Retriever

    owl = detectors["owlv2"]
    assert owl.detect(scene(), LABELS) == owl.detect(scene(), LABELS, threshold=0.1)
    ensure_tiny("clip")
    with ConceptDB(tmp_path / "c.db", embedder=load_embedder("tiny:clip", device="cpu")) as db:
        db.add("alice", "bo", [scene()], category="dog")
        db.add("alice", "mug", [scene()], category="mug")
        for detector in detectors.values():
            retriever = Retriever(db, detector)
            assert retriever.detector_threshold is None  # the detector family's own default
            expected = detector.detect(scene(), ["dog", "mug"], top_k=retriever.max_regions)
            assert sorted(retriever.regions("alice", scene()), key=repr) == sorted(expected, key=repr)
    assert owl.default_threshold == 0.1 and owl.default_text_threshold is None


def test_a_single_pass_keeps_the_libraries_scores_and_boxes(detectors):
    """Labels are read from the logits of each label's own tokens; scores and boxes stay exactly what
    transformers' post-processing gives."""
    gd = detectors["grounding-dino"]
    img = scene()
    inputs = gd.processor(images=img, text=". ".join(LABELS) + ".", return_tensors="pt")
    with torch.inference_mode():
        outputs = gd.model(**inputs)
    ref = gd.processor.post_process_grounded_object_detection(
        outputs, input_ids=inputs["input_ids"], threshold=0.35, text_threshold=0.25, target_sizes=[(200, 300)])[0]
    expected = sorted((round(s, 5), tuple(max(0, min(m, int(c))) for c, m in zip(b, (300, 200, 300, 200), strict=True)))
                      for s, b in zip(ref["scores"].tolist(), ref["boxes"].tolist(), strict=True))
    found = gd.detect(img, LABELS)
    got = sorted((round(d.score, 5), d.box) for d in found)
    assert got and set(got) <= set(expected)  # a box none of whose label tokens passes 0.25 has no label: dropped
    # the tiny tokenizer has bert-base-uncased's ids where the model reads them ([CLS] 101, "." 1012)
    assert inputs["input_ids"][0, :3].tolist() == [101, gd.processor.tokenizer.convert_tokens_to_ids("dog"), 1012]


def labels_past_the_limit() -> list[str]:
    colours = ["red", "blue", "green", "yellow", "white", "black", "brown", "pink"]
    things = ["dog", "cat", "mug", "chair", "table", "car", "bird", "tree", "lamp", "book", "phone", "bag",
              "shoe", "hat", "cup", "bike", "door", "plant"]
    return [f"{c} {t}" for t in things for c in colours]  # 144 labels


def test_grounding_dino_splits_labels_past_its_text_limit_into_passes(detectors):
    gd = detectors["grounding-dino"]
    labels = labels_past_the_limit()
    limit = gd.model.config.max_text_len
    one_prompt = gd.processor.tokenizer(". ".join(labels) + ".")["input_ids"]
    assert limit == 256 and len(one_prompt) > 2 * limit  # one prompt would lose more than half of them
    passes = []
    hook = gd.model.register_forward_pre_hook(lambda m, a, kw: passes.append(kw["input_ids"][0].tolist()),
                                              with_kwargs=True)
    try:
        found = gd.detect(scene(), labels, threshold=0.0)
    finally:
        hook.remove()
    assert len(passes) >= 3 and all(len(ids) <= limit for ids in passes)
    prompted = [gd.processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in passes]
    per_pass = [[p.strip() for p in text.replace(" . ", ".").split(".") if p.strip()] for text in prompted]
    flat = [label for group in per_pass for label in group]
    assert sorted(flat) == sorted(labels)  # every label in exactly one pass
    # detections from every part of the list, each with one of the labels as given
    assert all(d.label in labels for d in found)
    last = set(per_pass[-1])
    assert any(d.label in last for d in found)
    # the same object found in two passes is one detection, under the label that scores it best
    for i, a in enumerate(found):
        for b in found[i + 1:]:
            if a.label != b.label and a.box == b.box:
                pytest.fail(f"one box twice: {a} and {b}")


def test_passes_merge_each_box_under_its_best_label():
    from mmpersona.models.loaders import merge_passes

    a = [Detection("dog", 0.6, (0, 0, 100, 100)), Detection("cat", 0.5, (200, 0, 300, 100))]
    b = [Detection("puppy", 0.7, (1, 0, 100, 101)), Detection("mug", 0.4, (0, 150, 50, 200))]
    merged = merge_passes([a, b])
    assert merged == [Detection("puppy", 0.7, (1, 0, 100, 101)), Detection("cat", 0.5, (200, 0, 300, 100)),
                      Detection("mug", 0.4, (0, 150, 50, 200))]
    # within one pass nothing is merged (one pass is what the model gives, as before)
    assert merge_passes([a + [Detection("puppy", 0.3, (0, 0, 100, 100))]])[-1].label == "puppy"


def test_owl_labels_longer_than_a_query_are_shortened_not_fatal(detectors, caplog):
    owl = detectors["owlv2"]
    long = "a very small brown and white dog with a red collar sitting on the left side of the old wooden bench"
    assert len(owl.processor.tokenizer(long)["input_ids"]) > 16
    calls = []
    hook = owl.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with caplog.at_level(logging.WARNING, logger="mmpersona.models.loaders"):
            found = owl.detect(scene(), ["dog", long], threshold=0.0)
    finally:
        hook.remove()
    assert len(calls) == 1  # OWL takes every label as its own query: one pass whatever their number
    assert found and {d.label for d in found} <= {"dog", long} and long in {d.label for d in found}
    assert "16" in caplog.text and "a very small brown" in caplog.text
