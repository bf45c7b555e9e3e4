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
