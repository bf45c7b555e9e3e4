"""The peers' evaluation sets read in their published layouts (fixtures written here in those layouts), and the
benchmark run end to end on the tiny preset: methods side by side, peer-format predictions, report, cache."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from pipelines.peers import datasets
from pipelines.peers.scoring import PredictionFormatError, score_file


def drawn(path, color, kind="ellipse"):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    getattr(ImageDraw.Draw(img), kind)((10, 10, 54, 54), fill=color)
    img.save(path)
    return path


COLORS = {"bo": ((205, 35, 30), "ellipse"), "mam": ((35, 60, 195), "rectangle")}


@pytest.fixture
def yollava_data(tmp_path):
    """yollava-data/ as distributed, RAP's recognition_test.json, both QA files and a RAP database.json."""
    root = tmp_path / "yollava-data"
    for name, (color, kind) in COLORS.items():
        for split in ("train", "test"):
            for i in range(2):
                drawn(root / split / name / f"{i}.png", tuple(c + 5 * i for c in color), kind)
    rows = []
    for folder in COLORS:
        for i in range(2):
            image = f"yollava-data/test/{folder}/{i}.png"
            q = "<image>\nIs <{}> in this image? Answer with a single word or phrase."
            rows.append({"image": image, "question": q.format(folder), "concept": folder, "type": "positive",
                         "correct_answer": True})
            rows += [{"image": image, "question": q.format(c), "concept": c, "type": "negative",
                      "correct_answer": c == folder} for c in COLORS]  # RAP repeats the own concept here
    (tmp_path / "recognition_test.json").write_text(json.dumps(rows))
    (tmp_path / "yollava-visual-qa.json").write_text(json.dumps({
        "bo": {"./yollava-data/test/bo/0.png": {"question": "What animal does <sks> resemble?",
                                                "options": {"A": "Cat", "B": "Dog"}, "correct_answer": "B"}},
        "mam": {"./yollava-data/test/mam/1.png": {"question": "What colour is sks?",
                                                  "options": {"A": "Blue", "B": "Red"}, "correct_answer": "A"}}}))
    (tmp_path / "yollava-text-only-qa.json").write_text(json.dumps({
        "bo": {"0": {"question": "What is sks's breed?", "option": {"A": "Corgi", "B": "Shiba inu"},
                     "correct_answer": "B"}}}))
    (tmp_path / "database.json").write_text(json.dumps({"concept_dict": {
        "<bo>": {"name": "bo", "image": "example_database/bo.png", "info": "a red shiba", "category": "dog"},
        "<mam>": {"name": "mam", "image": "example_database/mam.png", "info": "a blue mug", "category": "mug"}},
        "path_to_concept": {}}))
    return tmp_path


def test_yollava_reader(yollava_data):
    bench = datasets.yollava(yollava_data / "yollava-data", recognition=yollava_data / "recognition_test.json",
                             visual_qa=yollava_data / "yollava-visual-qa.json",
                             text_qa=yollava_data / "yollava-text-only-qa.json", database=yollava_data / "database.json")
    assert [(c.name, len(c.images), c.info) for c in bench.concepts] == [("bo", 2, "a red shiba"), ("mam", 2, "a blue mug")]
    by = {}
    for item in bench.items:
        by.setdefault(item.protocol, []).append(item)
    assert {k: len(v) for k, v in by.items()} == {"recognition": 12, "visual-qa": 2, "text-qa": 1}
    rec = by["recognition"][1]  # image of bo, asked about bo, RAP's "negative" duplicate with a true answer
    assert rec.question == "Is <bo> in this image? Answer with a single word or phrase."
    assert rec.image == (yollava_data / "yollava-data/test/bo/0.png").resolve() and rec.concepts == ["bo"]
    assert by["recognition"][2].concepts == ["bo"]  # asked about mam: the oracle still shows what the image holds
    vqa = by["visual-qa"][0]
    assert vqa.question == ("Question: What animal does <bo> resemble?\nOptions:\nA. Cat\nB. Dog\n"
                            "Please give a single character from the options above. \n")
    assert by["text-qa"][0].image is None and "What is <bo>'s breed?" in by["text-qa"][0].question
    generated = datasets.yollava(yollava_data / "yollava-data")  # without RAP's file: every image x concept
    assert len(generated.items) == 8 and sum(i.row["correct_answer"] for i in generated.items) == 4


def test_readers_refuse_escapes_and_malformed_files(yollava_data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "../../etc/passwd", "question": "q", "concept": "bo",
                                "correct_answer": True}]))
    with pytest.raises(PredictionFormatError, match="inside"):
        datasets.yollava(yollava_data / "yollava-data", recognition=bad)
    bad.write_text(json.dumps({"bo": {"0": {"question": "q", "options": "A"}}}))
    with pytest.raises(PredictionFormatError):
        datasets.yollava(yollava_data / "yollava-data", visual_qa=bad)
    with pytest.raises(PredictionFormatError, match="train/ and test/"):
        datasets.yollava(tmp_path / "nowhere")


@pytest.fixture
def repic_root(tmp_path):
    root = tmp_path / "RePIC"
    db = root / "data/database_tot/database_2_concepts"
    concept_dict = {}
    for name, (color, kind) in COLORS.items():
        drawn(db / f"{name}.jpg", color, kind)
        concept_dict[f"<{name}>"] = {"name": name, "image": f"./data/database_tot/database_2_concepts/{name}.jpg",
                                     "info": f"{name} info", "category": "thing"}
    (db / "database_mod.json").write_text(json.dumps({"concept_dict": concept_dict, "path_to_concept": {}}))
    queries = {}
    for i in range(2):
        img = drawn(root / f"data/query-image-2-concepts/bo_and_mam/bo_and_mam_{i}.jpg", (200, 40 + i, 40))
        queries[f"./{img.relative_to(root)}"] = ["<bo>", "<mam>"]
    (root / "data/query_tot").mkdir(parents=True)
    (root / "data/query_tot/2_concept_query_templates.json").write_text(json.dumps(queries))
    return root


def test_repic_reader(repic_root):
    bench = datasets.repic(repic_root, repic_root / "data/query_tot/2_concept_query_templates.json",
                           repic_root / "data/database_tot/database_2_concepts/database_mod.json")
    assert [c.name for c in bench.concepts] == ["bo", "mam"] and bench.concepts[0].images[0].is_file()
    assert [i.scorer for i in bench.items] == ["repic-2", "repic-2"]
    assert [i.question for i in bench.items] == datasets.REPIC_CAPTION_PROMPTS[:2]
    assert bench.items[0].concepts == ["bo", "mam"]
    assert bench.items[0].answered("a caption")[1:3] == [["<bo>", "<mam>"], "a caption"]


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "mmpersona", "--preset", "tiny", "--device", "cpu", *args],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_yollava_bench_end_to_end_three_methods_and_cache(yollava_data, tiny_cache, tmp_path):
    out = tmp_path / "report"
    args = ["--json", "eval", "bench", "yollava", str(yollava_data / "yollava-data"),
            "--recognition", str(yollava_data / "recognition_test.json"),
            "--visual-qa", str(yollava_data / "yollava-visual-qa.json"),
            "--text-qa", str(yollava_data / "yollava-text-only-qa.json"),
            "--database", str(yollava_data / "database.json"), "--max-new-tokens", "2", "--out", str(out)]
    report = json.loads(cli(*args))
    assert report["methods"] == ["vanilla", "oracle", "retrieval"] and report["model"] == "tiny:qwen2.5-vl"
    assert "noise" in report["note"] and report["mmpersona"]
    for method in report["methods"]:
        assert set(report["results"][method]) == {"recognition", "visual-qa", "text-qa"}
        for protocol, metrics in report["results"][method].items():
            # the peer-format predictions score to the reported numbers (the same number, by the same rule)
            rows = json.loads((out / f"{method}-{protocol}.json").read_text())
            assert {k: v for k, v in score_file(metrics["scorer"], rows).items()} == \
                {k: v for k, v in metrics.items() if k != "scorer"}
    assert (out / "report.md").read_text().count("\n| ") == 4  # header + 3 methods
    assert (out / "report.png").stat().st_size > 0
    answered = (out / "answers.jsonl").read_text().count("\n")
    assert answered == 3 * 15
    again = json.loads(cli(*args))  # every answer comes from the cache: nothing generated twice
    assert (out / "answers.jsonl").read_text().count("\n") == answered
    assert again["results"] == report["results"]
    quick = json.loads(cli(*args[:-2], "--out", str(tmp_path / "quick"), "--limit", "3", "--method", "oracle"))
    assert quick["items"] == 3 and list(quick["results"]) == ["oracle"]
    longer = [a if a != "2" else "3" for a in args]  # another generation length: answered afresh
    json.loads(cli(*longer))
    assert (out / "answers.jsonl").read_text().count("\n") == 2 * answered


def test_repic_bench_and_score_agree(repic_root, tiny_cache, tmp_path):
    out = tmp_path / "r"
    report = json.loads(cli("--json", "eval", "bench", "repic", str(repic_root),
                            "--queries", str(repic_root / "data/query_tot/2_concept_query_templates.json"),
                            "--database", str(repic_root / "data/database_tot/database_2_concepts/database_mod.json"),
                            "--method", "oracle", "--max-new-tokens", "3", "--out", str(out)))
    metrics = report["results"]["oracle"]["caption-2"]
    scored = json.loads(cli("--json", "eval", "score", "repic-2", str(out / "oracle-caption-2.json")))
    assert scored[0]["f1"] == metrics["f1"] and scored[0]["slots"] == 4


def test_database_size_as_a_variable(yollava_data, tiny_cache, tmp_path):
    others = tmp_path / "others"
    for i, color in enumerate([(20, 200, 20), (200, 200, 20), (120, 20, 200)]):
        drawn(others / f"d{i}" / "0.png", color)
    drawn(others / "bo" / "0.png", (1, 2, 3))  # a benchmark name: skipped, it would be ambiguous
    out = tmp_path / "sizes"
    report = json.loads(cli("--json", "eval", "bench", "yollava", str(yollava_data / "yollava-data"),
                            "--method", "retrieval", "--method", "vanilla", "--distractors", str(others),
                            "--sizes", "0,4", "--limit", "2", "--max-new-tokens", "2", "--out", str(out)))
    assert list(report["results"]) == ["retrieval@0", "vanilla@0", "retrieval@4", "vanilla@4"]
    assert report["concepts_in_database"] == {"retrieval@0": 2, "vanilla@0": 2, "retrieval@4": 5, "vanilla@4": 5}
    assert (out / "retrieval@4-recognition.json").is_file()
    assert "retrieval@4" in (out / "report.md").read_text()


def test_learned_token_methods(yollava_data, tiny_cache, tmp_path):
    out = tmp_path / "tokens"
    report = json.loads(cli("--json", "eval", "bench", "yollava", str(yollava_data / "yollava-data"),
                            "--method", "tokens", "--method", "hybrid", "--learn-steps", "2", "--limit", "2",
                            "--max-new-tokens", "2", "--out", str(out)))
    assert list(report["results"]) == ["tokens", "hybrid"] and report["learn_steps"] == 2
    assert report["concepts_learned"] == 2  # both concepts learned first, then answered with their tokens
    assert report["results"]["tokens"]["recognition"]["scorer"] == "yollava-recognition"
