"""Hostile input: forged and squatting archives, zip bombs, malformed files, lookalike handles, bad bytes in
CLI arguments. Each is refused with a clear error (the CLI: `error: ...`, exit 2) and writes nothing, or is
imported without touching anyone else. The full-size corpus: `python scripts/reliability.py hostile`."""

import sys
import zipfile

import pytest

import scripts
from concept_db import DuplicateConceptError, InvalidConceptError, open_store
from mmpersona import ConceptDB
from mmpersona.concept_io import ImportFormatError, read_archive
from mmpersona.safe_io import ArchiveLimits, SafeZip, UnsafeInputError, json_depth, parse_json

corpus = scripts.load("hostile_corpus")


@pytest.fixture
def db(tmp_path, tiny_embedder):
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as database:
        yield database


def scores(matches):
    return [(m.concept.name, m.score, m.image) for m in matches]


# ------------------------------------------------------------------------------------------ cross-user


def test_forged_archive_vector_never_reaches_another_user(db, tmp_path, tiny_embedder):
    x, y = corpus.png(1), corpus.png(2)
    with ConceptDB(tmp_path / "alone.db", embedder=tiny_embedder) as alone:  # alice with nobody else around
        alone.add("alice", "cat", [x])
        baseline = scores(alone.search_image("alice", y))
    forged = corpus.forged_vector_archive(tmp_path / "forged.zip", x, tiny_embedder.embed_images([y])[0],
                                          tiny_embedder.name)
    assert db.import_concepts("bob", forged, "archive", progress=False).added == ["forged"]
    db.add("alice", "cat", [x])
    assert scores(db.search_image("alice", y)) == baseline  # bit-identical: bob's forged vector was not reused
    assert baseline[0][1] < 0.9999
    # bob's own archive vector is trusted for bob alone (his search with Y finds his X at 1.0)
    assert db.search_image("bob", y)[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("embedder", ["tiny:clip", "openclip:ViT-L-14-336/openai"])
def test_an_archive_cannot_register_an_embedder(db, tmp_path, tiny_embedder, embedder):
    squat = corpus.squatting_archive(tmp_path / "squat.zip", corpus.png(3), embedder, dim=7)
    report = db.import_concepts("bob", squat, "archive", progress=False)
    assert report.added == ["squat"]  # imported, embedded afresh by the embedder in use
    assert db.store.embedder_dims() == {tiny_embedder.name: tiny_embedder.dim}
    db.add("alice", "dog", [corpus.png(4)])  # nobody else is locked out
    assert db.store.vectors("bob", db.get("bob", "squat").id).keys() == {tiny_embedder.name}


# ------------------------------------------------------------------------------------------ bombs and limits


def test_vector_bomb_is_refused_before_it_is_inflated(db, tmp_path):
    bomb = corpus.vector_bomb(tmp_path / "bomb.zip", corpus.png(5), 300 * corpus.MiB)
    assert bomb.stat().st_size < 2 * corpus.MiB
    with pytest.raises(ImportFormatError, match="compression-ratio"):
        db.import_concepts("bob", bomb, "archive", progress=False)
    with pytest.raises(ImportFormatError, match="header"):
        db.import_concepts("bob", corpus.header_bomb(tmp_path / "h.zip", corpus.png(5)), "archive", progress=False)
    assert db.list("bob") == []


def test_member_count_is_checked_from_the_end_record(tmp_path):
    archive = corpus.many_members(tmp_path / "many.zip", 60)
    with pytest.raises(ImportFormatError, match="61 members, over the limit of 50"):
        read_archive(archive, limits=ArchiveLimits(max_members=50))


def test_total_size_limit(tmp_path):
    image = corpus.png(6)
    archive = corpus.shared_image_archive(tmp_path / "a.zip", image, 1)
    with pytest.raises(ImportFormatError, match="MMPERSONA_MAX_ARCHIVE_BYTES"):
        read_archive(archive, limits=ArchiveLimits(max_total_bytes=len(image) - 1))


def test_an_image_named_by_many_concepts_is_read_once(db, tmp_path, monkeypatch):
    image = corpus.bmp(300, 200)
    archive = corpus.shared_image_archive(tmp_path / "shared.zip", image, 60)
    reads = []
    original = SafeZip.read
    monkeypatch.setattr(SafeZip, "read", lambda self, name, limit=None: reads.append(name) or original(self, name, limit))
    report = db.import_concepts("bob", archive, "archive", progress=False)
    assert len(report.added) == 60
    assert reads.count(corpus.image_entry(image)["file"]) == 1
    assert db.store._conn.execute("SELECT count(*) FROM images").fetchone()[0] == 1


def test_lying_sizes_and_bad_crc_are_clean_errors(db, tmp_path):
    for archive in (corpus.lying_size(tmp_path / "l.zip", corpus.png(7)), corpus.bad_crc(tmp_path / "c.zip", corpus.png(7))):
        with pytest.raises(ImportFormatError, match="corrupt|hash"):
            db.import_concepts("bob", archive, "archive", progress=False)
    assert db.list("bob") == []


def test_safe_unzip_refuses_bombs_before_writing(tmp_path):
    bomb = corpus.unzip_bomb(tmp_path / "bomb.zip", 200 * corpus.MiB)
    out = tmp_path / "out"
    out.mkdir()
    with SafeZip(bomb) as archive, pytest.raises(UnsafeInputError, match="over the limit of 67108864"):
        archive.extract_to(out)
    assert list(out.rglob("*")) == []  # checked for every member before the first byte was written
    ratio_bomb = corpus.unzip_bomb(tmp_path / "ratio.zip", 32 * corpus.MiB)  # within the size limit
    with SafeZip(ratio_bomb) as archive, pytest.raises(UnsafeInputError, match="compression-ratio"):
        archive.extract_to(out)
    assert list(out.rglob("*")) == []
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", b"x")
    with SafeZip(evil) as archive, pytest.raises(UnsafeInputError, match="outside"):
        archive.extract_to(out)
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("db/evil")
        info.external_attr = (0o120777 << 16)  # a symlink
        zf.writestr(info, "/etc/passwd")
    with SafeZip(link) as archive, pytest.raises(UnsafeInputError, match="link"):
        archive.extract_to(out)
    assert not (tmp_path / "escape.txt").exists() and list(out.rglob("*")) == []


def test_json_nesting_is_bounded_without_recursion():
    assert json_depth('{"a": [1, {"b": "[[[[["}]}') == 3
    with pytest.raises(UnsafeInputError, match="200000 deep"):
        parse_json(corpus.nested(200_000), "x")
    with pytest.raises(UnsafeInputError, match="UTF-8"):
        parse_json(b"\xff{}", "x")
    assert parse_json(b'{"a": [[1]]}', "x") == {"a": [[1]]}


# ------------------------------------------------------------------------------------------ the CLI, end to end


def cli(argv, capsys):
    """The console entry point in this process: returns (exit code, stderr); any traceback fails the test."""
    from mmpersona import cli as cli_module

    old = sys.argv
    sys.argv = ["mmpersona", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli_module.main()
    finally:
        sys.argv = old
    return exit_info.value.code, capsys.readouterr().err


def hostile_files(tmp_path):
    image = corpus.png(8)
    cases = {k: (p, "archive") for k, p in corpus.malformed_archives(tmp_path / "archives", image).items()}
    cases.update({k: (p, "rap") for k, p in corpus.malformed_raps(tmp_path / "raps", image).items()})
    cases["vector-bomb"] = (corpus.vector_bomb(tmp_path / "vb.zip", image, 64 * corpus.MiB), "archive")
    return cases


def test_every_malformed_file_is_a_clean_cli_error_that_writes_nothing(tmp_path, tiny_cache, capsys):
    db = tmp_path / "cli.db"
    base = ["-v", "--preset", "tiny", "--db", str(db), "--user", "bob"]
    code, err = cli([*base, "concepts", "add", "ok", "--image", str(tmp_path / "missing.png")], capsys)
    assert code == 2  # creates the database
    for key, (path, fmt) in hostile_files(tmp_path).items():
        code, err = cli([*base, "concepts", "import", str(path), "--format", fmt, "--strict"], capsys)
        lines = [line for line in err.splitlines() if not line.startswith(("INFO", "WARNING"))]
        assert code == 2 and lines and lines[-1].startswith("error: "), (key, err)
        assert "Traceback" not in err, (key, err)
    with open_store(str(db)) as store:
        assert store.count("bob") == 0


def test_undecodable_cli_arguments_are_refused(tmp_path, capsys):
    bad = b"bad\xff".decode("utf-8", "surrogateescape")  # how Python hands over non-UTF-8 argv bytes
    for argv in (["--db", str(tmp_path / "x.db"), "concepts", "add", bad, "--image", "x.png"],
                 ["--db", str(tmp_path / "x.db"), "--user", bad, "concepts", "list"]):
        code, err = cli(argv, capsys)
        assert code == 2 and "not valid UTF-8" in err
    assert not (tmp_path / "x.db").exists()


def test_lone_surrogates_are_refused_by_the_store(tmp_path):
    with open_store(str(tmp_path / "s.db")) as store:
        with pytest.raises(InvalidConceptError, match="surrogate"):
            store.add("u", "x", info="\ud800", images=[b"i"])
        with pytest.raises(InvalidConceptError):
            store.add("\udcff", "x", images=[b"i"])
        assert store.count("u") == 0


# ------------------------------------------------------------------------------------------ handles


@pytest.mark.parametrize("key", ["rtl-override", "zero-width-space", "line-separator", "nel", "no-break-space"])
def test_invisible_and_disguising_characters_are_refused(db_url, key):
    with open_store(db_url) as store:
        with pytest.raises(InvalidConceptError, match=r"U\+"):
            store.add("u", corpus.LOOKALIKE_NAMES[key], images=[b"i"])
        assert store.count("u") == 0


def test_nfc_and_lookalike_handles(db_url):
    with open_store(db_url) as store:
        cafe = store.add("u", "café", images=[b"c"])
        with pytest.raises(DuplicateConceptError):  # NFD spelling of the same handle
            store.add("u", corpus.LOOKALIKE_NAMES["nfd-cafe"], images=[b"d"])
        assert store.find("u", corpus.LOOKALIKE_NAMES["nfd-cafe"]).id == cafe.id
        bo = store.add("u", "bo", images=[b"b"])
        with pytest.raises(DuplicateConceptError, match="looks the same"):
            store.add("u", corpus.LOOKALIKE_NAMES["cyrillic-o"], images=[b"e"])
        with pytest.raises(DuplicateConceptError, match="looks the same"):
            store.update("u", cafe.id, aliases=["b\u03bf"])  # Greek omicron, as an alias of another concept
        store.update("u", bo.id, aliases=["b\u03bf"])  # a lookalike of its own name is harmless
        # the other way round: the lookalike first, then the ASCII handle
        store.add("u", "m\u0430m", images=[b"m"])  # Cyrillic а
        result = store.add_many("u", [corpus_new("mam")], skip_invalid=True)
        assert result.added == [] and "looks the same" in result.skipped[0][1]
        store.add("other-user", "mam", images=[b"m2"])  # another user's handles are theirs alone
        assert store.count("u") == 3


def corpus_new(name):
    from concept_db.types import NewConcept

    return NewConcept(name=name, images=[name.encode()])


def test_line_separators_are_escaped_in_the_prompt():
    from concept_db import Concept
    from pipelines.prompt import PromptBuilder
    from pipelines.retrieval import RetrievedConcept

    c = Concept(id="1", owner="u", name="bo", category="dog\u2028cat", info="line\u2028two\u0085three\u202eevil")
    block, _, _ = PromptBuilder().concept_block([RetrievedConcept(c, 1.0, "image")])
    assert not any(ch in block for ch in "\u2028\u0085\u202e")
    assert "\\u2028" in block and "\\u0085" in block and "\\u202e" in block
    assert len(block.splitlines()) == 1


def test_malformed_rap_files_are_refused_whole(tmp_path):
    from mmpersona.concept_io import read_rap

    for key, root in corpus.malformed_raps(tmp_path, corpus.png(9)).items():
        if key == "rap-lone-surrogate":  # well-formed JSON: the store refuses that info when it is written
            assert read_rap(root)[0].info == "\ud800"
            continue
        with pytest.raises(ImportFormatError):
            read_rap(root)


def test_malformed_archives_are_refused_whole(tmp_path):
    for key, path in corpus.malformed_archives(tmp_path, corpus.png(10)).items():
        if key == "manifest-lone-surrogate":
            assert read_archive(path)[0].info == "\ud800"  # refused when written (see above)
            continue
        with pytest.raises(ImportFormatError):
            read_archive(path, embedder=lambda: ("tiny:clip", 32))
