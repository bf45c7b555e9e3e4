"""Property-based tests (hypothesis) on names, info text and the RAP import format."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concept_db import InvalidConceptError, normalize_name, open_store
from mmpersona.concept_io import ImportFormatError, read_rap


@given(st.text(max_size=80))
def test_normalize_name_is_safe_and_idempotent(text):
    try:
        name = normalize_name(text)
    except InvalidConceptError:
        return
    assert name and name == name.strip() and len(name) <= 64
    assert "/" not in name and "\\" not in name and ".." not in name and "<" not in name and ">" not in name
    assert all(ord(c) >= 32 and ord(c) != 127 for c in name)
    assert normalize_name(name) == name == normalize_name(f"<{name}>")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=1, max_size=30), info=st.text(max_size=300))
def test_any_name_and_info_round_trip_or_fail_cleanly(db_url, name, info):
    with open_store(db_url) as store:
        try:
            c = store.add("u", name, info=info, images=[b"img"])
        except InvalidConceptError:
            assert store.count("u") == 0  # a refused add writes nothing
            return
        try:
            assert store.get("u", c.id).info == info
            assert store.find("u", name).id == c.id
        finally:
            store.erase_owner("u")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=json_values)
def test_rap_reader_never_crashes_on_arbitrary_json(tmp_path, data):
    root = tmp_path / "db"
    root.mkdir(exist_ok=True)
    (root / "database.json").write_text(json.dumps(data))
    try:
        pending = read_rap(root)
    except ImportFormatError:
        return
    for item in pending:  # whatever it accepted stays inside the folder
        for path in item.images:
            assert path.resolve().is_relative_to(root.resolve())


@pytest.mark.parametrize("rel", ["../x.png", "db/../../x.png", "/abs.png", "db/sub/../../../x.png"])
def test_rap_paths_never_leave_the_folder(tmp_path, rel):
    root = tmp_path / "db"
    root.mkdir()
    (root / "database.json").write_text(json.dumps({"concept_dict": {"<a>": {"image": [rel]}}}))
    with pytest.raises(ImportFormatError):
        read_rap(root)


# ------------------------------------------------------------------------------------------ archive manifests


def _valid_manifest():
    import hashlib

    data = b"\x89PNG not really"
    h = hashlib.sha256(data).hexdigest()
    entry = {"id": "0" * 32, "name": "bo", "category": "dog", "info": "i", "aliases": ["shiba"],
             "attributes": {"a": 1}, "created": 1.0, "updated": 2.0, "version": 1,
             "images": [{"hash": h, "file": f"images/{h}.png"}],
             "embeddings": {"tiny:clip": {"images": [h], "key": "k"}},
             "tensors": [{"name": "t", "model": "m", "fingerprint": "f", "file": "tensors/0"}]}
    return {"format": "mmpersona-concepts", "version": 1, "concepts": [entry]}, {f"images/{h}.png": data}


PATHS = [("concepts",), ("concepts", 0), *[("concepts", 0, k) for k in _valid_manifest()[0]["concepts"][0]],
         ("concepts", 0, "images", 0), ("concepts", 0, "images", 0, "hash"), ("concepts", 0, "images", 0, "file"),
         ("concepts", 0, "embeddings", "tiny:clip"), ("concepts", 0, "embeddings", "tiny:clip", "images"),
         ("concepts", 0, "tensors", 0), ("concepts", 0, "tensors", 0, "model"), ("version",), ("format",)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(PATHS), json_values | st.floats(allow_nan=True)), min_size=1,
                        max_size=3))
def test_archive_reader_never_crashes_on_malformed_manifests(tmp_path, changes):
    """A valid manifest with fields replaced by arbitrary JSON: a clean `ImportFormatError` or a result, never
    another exception (which the CLI would print as a traceback)."""
    import zipfile

    from mmpersona.concept_io import read_archive

    manifest, files = _valid_manifest()
    for path, value in changes:
        target = manifest
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("tensors/0", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        zf.writestr("manifest.json", json.dumps(manifest))
    try:
        read_archive(archive, embedder=lambda: ("tiny:clip", 4))
    except ImportFormatError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4))
def test_folder_import_of_any_names_fails_cleanly_or_imports(tmp_path, tiny_embedder, names):
    from mmpersona import ConceptDB
    from mmpersona.errors import MmpersonaError

    root = tmp_path / f"f{abs(hash(tuple(names)))}"
    root.mkdir()
    for name in names:
        try:
            (root / name).mkdir(exist_ok=True)
            (root / name / "0.png").write_bytes(b"not an image")
        except (OSError, ValueError):
            continue  # not a name this file system takes
    with ConceptDB(tmp_path / "f.db", embedder=tiny_embedder) as db:
        try:
            report = db.import_concepts("u", root, "folder", progress=False)
        except MmpersonaError:
            return
        assert report.added == []  # no image was readable
        assert db.list("u") == []
