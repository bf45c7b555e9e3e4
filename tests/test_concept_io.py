"""Import / export round trips (RAP database.json, Yo'LLaVA folder, our archive) on the tiny embedder."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from concept_db import InvalidConceptError
from mmpersona import ConceptDB
from mmpersona.concept_io import ImportFormatError


def drawn(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (64, 64), tuple(int(c) for c in rng.integers(150, 255, 3)))
    ImageDraw.Draw(img).ellipse((8, 8, 50, 50), fill=tuple(int(c) for c in rng.integers(0, 120, 3)))
    return img


@pytest.fixture
def db(tmp_path, tiny_embedder):
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as database:
        yield database


def rap_database(root, concepts: dict[str, int]):
    """A folder laid out as RAP writes it: <root>/<name>/<i>.png and database.json with root-prefixed paths."""
    root.mkdir(parents=True, exist_ok=True)
    concept_dict, path_to_concept = {}, {}
    for name, n in concepts.items():
        (root / name).mkdir()
        rels = []
        for i in range(n):
            drawn(hash((name, i)) % 1000).save(root / name / f"{i}.png")
            rels.append(f"{root.name}/{name}/{i}.png")
        concept_dict[f"<{name}>"] = {"name": name, "image": rels, "info": f"{name} info", "category": "pet"}
        path_to_concept.update({r: f"<{name}>" for r in rels})
    (root / "database.json").write_text(json.dumps({"concept_dict": concept_dict, "path_to_concept": path_to_concept}))
    return root


def test_rap_import_and_retrieval(db, tmp_path):
    root = rap_database(tmp_path / "example_database", {"bo": 2, "mam": 1})
    report = db.import_concepts("alice", root / "database.json", "rap", progress=False)
    assert sorted(report.added) == ["bo", "mam"] and report.skipped == []
    bo = db.get("alice", "<bo>")
    assert (bo.category, bo.info, len(bo.images)) == ("pet", "bo info", 2)
    assert db.search_image("alice", root / "bo" / "1.png", k=1)[0].concept.name == "bo"


def test_rap_single_image_string_and_folder_relative_paths(db, tmp_path):
    root = tmp_path / "db"
    (root / "x").mkdir(parents=True)
    drawn(1).save(root / "x" / "a.png")
    (root / "database.json").write_text(json.dumps(
        {"concept_dict": {"<x>": {"name": "x", "image": "x/a.png", "info": "", "category": "toy"}}}))
    assert db.import_concepts("alice", root, "rap", progress=False).added == ["x"]


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"concepts": {}}), "'concept_dict'"),
    (json.dumps({"concept_dict": {"<a>": {"image": ["../outside.png"]}}}), "points outside"),
    (json.dumps({"concept_dict": {"<a>": {"image": ["/etc/passwd"]}}}), "must be relative"),
    (json.dumps({"concept_dict": {"<a>": {"image": 3}}}), "path or a list"),
    (json.dumps({"concept_dict": {}, "path_to_concept": {"db/a.png": "<ghost>"}}), "not in concept_dict"),
])
def test_rap_malformed_writes_nothing(db, tmp_path, content, needle):
    root = tmp_path / "db"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")
    (root / "database.json").write_text(content)
    with pytest.raises(ImportFormatError, match=needle):
        db.import_concepts("alice", root, "rap", progress=False)
    assert db.list("alice") == []


def test_rap_bad_items_skipped_and_reported(db, tmp_path):
    root = rap_database(tmp_path / "example_database", {"good": 1, "broken": 1})
    (root / "broken" / "0.png").write_bytes(b"\x89PNG truncated")
    data = json.loads((root / "database.json").read_text())
    data["concept_dict"]["<a/b>"] = {"name": "a/b", "image": [], "info": "", "category": ""}
    (root / "database.json").write_text(json.dumps(data))
    report = db.import_concepts("alice", root, "rap", progress=False)
    assert report.added == ["good"]
    reasons = dict(report.skipped)
    assert "truncated or corrupt" in reasons["<broken>"] or "not a recognised" in reasons["<broken>"]
    assert "path separators" in reasons["<a/b>"]
    with pytest.raises(InvalidConceptError):
        db.import_concepts("bob", root, "rap", strict=True, progress=False)
    assert db.list("bob") == []


def test_folder_import(db, tmp_path):
    root = tmp_path / "yollava"
    for name, n in {"bo": 3, "mam": 2}.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            drawn(i + 10 * len(name)).save(root / name / f"{i}.jpg")
    (root / "bo" / "notes.txt").write_text("not an image")
    report = db.import_concepts("alice", root, "folder", progress=False)
    assert sorted(report.added) == ["bo", "mam"]
    assert ("bo/notes.txt", "not an image file") in report.skipped
    assert len(db.get("alice", "bo").images) == 3


def test_duplicate_names_skipped(db, tmp_path):
    root = rap_database(tmp_path / "example_database", {"bo": 1})
    db.import_concepts("alice", root, "rap", progress=False)
    report = db.import_concepts("alice", root, "rap", progress=False)
    assert report.added == [] and "already has a concept" in report.skipped[0][1]


def test_archive_round_trip_is_lossless(db, tmp_path, tiny_embedder):
    from safetensors.numpy import save

    root = rap_database(tmp_path / "example_database", {"bo": 2, "mam": 1})
    db.import_concepts("alice", root, "rap", progress=False)
    bo = db.update("alice", "bo", aliases=["shiba"], attributes={"breed": "shiba"})
    db.store.put_tensor("alice", bo.id, "tokens", save({"rows": np.arange(8, dtype=np.float32).reshape(2, 4)}),
                        model="tiny:qwen2-vl", fingerprint="f00")
    archive = tmp_path / "alice.zip"
    assert db.export_concepts("alice", archive, "archive") == 2

    with ConceptDB(tmp_path / "other.db", embedder="tiny:clip", preset="tiny") as other:
        # the archive's vectors are checked against the embedder in use (name and dimension) and kept as they
        # are: nothing is embedded again
        def no_embedding(*args, **kwargs):
            raise AssertionError("an archive with complete vectors was embedded again")

        other.embedder.embed_images = no_embedding
        report = other.import_concepts("alice", archive, "archive", progress=False)
        assert sorted(report.added) == ["bo", "mam"]
        for c in db.list("alice"):
            restored = other.get("alice", c.id)
            assert restored == c
            for h in c.images:
                assert other.store.image_bytes("alice", h) == db.store.image_bytes("alice", h)
            a, b = db.store.vectors("alice", c.id), other.store.vectors("alice", c.id)
            assert a.keys() == b.keys()
            for e in a:
                assert a[e][0] == b[e][0] and np.array_equal(a[e][1], b[e][1])
        t = other.store.get_tensor("alice", bo.id, "tokens")
        assert (t.model, t.fingerprint) == ("tiny:qwen2-vl", "f00")
        assert t.data == db.store.get_tensor("alice", bo.id, "tokens").data


def test_archive_corruption_detected(db, tmp_path):
    root = rap_database(tmp_path / "example_database", {"bo": 1})
    db.import_concepts("alice", root, "rap", progress=False)
    archive = tmp_path / "a.zip"
    db.export_concepts("alice", archive)
    tampered = tmp_path / "t.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:-10] + b"0123456789" if info.filename.startswith("images/") else data)
    with pytest.raises(ImportFormatError, match="does not match its hash"):
        db.import_concepts("bob", tampered, "archive", progress=False)
    (tmp_path / "junk.zip").write_bytes(b"PK not a zip")
    with pytest.raises(ImportFormatError, match="not a readable archive"):
        db.import_concepts("bob", tmp_path / "junk.zip", "archive", progress=False)
    assert db.list("bob") == []


def test_rap_and_folder_export_reimport(db, tmp_path):
    root = rap_database(tmp_path / "example_database", {"bo": 2, "mam": 1})
    db.import_concepts("alice", root, "rap", progress=False)
    out = tmp_path / "exported_db"
    assert db.export_concepts("alice", out, "rap") == 2
    data = json.loads((out / "database.json").read_text())
    assert set(data["concept_dict"]) == {"<bo>", "<mam>"}
    assert all(p.startswith("exported_db/") for p in data["path_to_concept"])
    assert sorted(db.import_concepts("bob", out, "rap", progress=False).added) == ["bo", "mam"]
    folder = tmp_path / "folder_export"
    db.export_concepts("alice", folder, "folder")
    assert sorted(db.import_concepts("carol", folder, "folder", progress=False).added) == ["bo", "mam"]
    with pytest.raises(ImportFormatError, match="valid: rap, folder, archive"):
        db.export_concepts("alice", folder, "csv")
