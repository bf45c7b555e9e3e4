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
    blocks = (out / "report.md").read_text().split("\n\n")
    assert blocks[2].startswith("| method |") and len(blocks[2].splitlines()) == 5  # header, rule, 3 methods
    assert blocks[3].startswith("Against vanilla") and [line.split(" |")[0] for line in blocks[4].splitlines()[2:]] \
        == ["| oracle", "| retrieval"]
    assert set(report["against_vanilla"]) == {"oracle", "retrieval"}
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


# ------------------------------------------------------------------------------------------ MC-LLaVA, MMPB, MyVLM

@pytest.fixture
def mc_llava_root(tmp_path):
    """MC-LLaVA's dataset layout for one two-concept scenario (bo_mam), image keys written as its scripts open
    them (relative to the eval folder: ../mcdataset/...)."""
    root = tmp_path / "mcdataset"
    case = root / "two_concept"
    root.mkdir()
    (root / "scenarios.json").write_text(json.dumps(["bo_mam"]))
    (root / "concept_type.json").write_text(json.dumps({"bo": "two_concept", "mam": "two_concept"}))
    for name, (color, kind) in COLORS.items():
        for i in range(2):
            drawn(case / "concept/train" / name / f"{i}.png", color, kind)
            drawn(case / "concept/train" / name / f"{i}_mask.png", (255, 255, 255))
            drawn(case / "concept/test" / name / f"{i}.png", tuple(c + 3 * i for c in color), kind)
        test = case / "concept/test" / name
        key = f"../mcdataset/two_concept/concept/test/{name}/0.png"
        (test / "choice.json").write_text(json.dumps({key: {"Human": f"What is <{name}>? A. a dog B. a mug",
                                                            "AI": "A" if name == "bo" else "B"}}))
        (test / "vqa.json").write_text(json.dumps({key: {"Human": f"What colour is <{name}>?", "AI": "It is red."}}))
        (test / "qa.json").write_text(json.dumps([{"question": f"Is <{name}> a dog? A. yes B. no", "answer": "A"}]))
    multi = case / "multi/bo_mam"
    multi.mkdir(parents=True)
    for i in range(2):  # 0.png shows both concepts, 1.png only <bo>
        img = Image.new("RGB", (96, 64), (240, 240, 240))
        ImageDraw.Draw(img).ellipse((4, 10, 44, 54), fill=COLORS["bo"][0])
        if i == 0:
            ImageDraw.Draw(img).rectangle((52, 10, 92, 54), fill=COLORS["mam"][0])
        img.save(multi / f"{i}.png")
    keys = [f"../mcdataset/two_concept/multi/bo_mam/{i}.png" for i in range(2)]
    qa = [{"Human": f"Question {j}? A. x B. y", "AI": "A"} for j in range(3)]
    (multi / "choice.json").write_text(json.dumps({keys[0]: qa}))
    (multi / "vqa.json").write_text(json.dumps({keys[1]: [{"Human": "Who is left?", "AI": "<bo> is."}]}))
    (multi / "qa.json").write_text(json.dumps([{"question": "Do <bo> and <mam> live together? A. yes B. no",
                                                "answer": "A"}]))
    (multi / "position.json").write_text(json.dumps({"1.png": {"bo": "left", "mam": None},
                                                     "0.png": {"bo": "left", "mam": "right"}}))
    (multi / "vqa_position.json").write_text(json.dumps({keys[0]: [{"Human": "Where is <mam>? A. left B. right",
                                                                    "AI": "B"}]}))
    return root


def test_mc_llava_reader(mc_llava_root):
    bench = datasets.mc_llava(mc_llava_root)
    assert [(c.name, len(c.images)) for c in bench.concepts] == [("bo", 2), ("mam", 2)]  # masks left out
    by = {}
    for item in bench.items:
        by.setdefault(item.protocol, []).append(item)
    assert {k: len(v) for k, v in by.items()} == {"recognition": 14, "choice": 5, "vqa": 3, "text": 3,
                                                   "caption": 6, "grounding": 1}
    rec = [(i.row["type"], i.row["ground_truth"]) for i in by["recognition"]]
    # per concept: 2 own test images + 2 multi images (Yes); all names about the 2 multi images; 2 x 2 negatives
    assert rec.count(("si_sq", "Yes")) == 4 and rec.count(("mi_sq", "Yes")) == 4 and rec.count(("mi_mq", "Yes")) == 2
    assert rec.count(("si_sq", "No")) == 4
    assert by["recognition"][8].question == ("Can you see <bo> and <mam> in this photo? Answer the question using "
                                             "a single word Yes or No.")
    assert [i.row["type"] for i in by["choice"]] == ["si_sq", "si_sq", "mi_sq", "mi_sq", "mi_mq"]
    assert by["choice"][0].question.endswith("\nIMPORTANT: Answer the question using a single letter.")
    assert by["choice"][0].image == (mc_llava_root / "two_concept/concept/test/bo/0.png").resolve()
    caps = {i.image.name + i.image.parent.name: i.row["ground_truth"] for i in by["caption"]}
    assert caps["0.pngbo_mam"] == ["bo", "mam"] and caps["1.pngbo_mam"] == ["bo"]  # position.json, by image
    assert by["caption"][0].row["ground_truth"] == "<bo>"
    assert by["caption"][-1].concepts == ["bo"]  # the oracle injects what position.json places there
    assert by["text"][-1].image is None and by["text"][-1].row["type"] == "m"
    only = datasets.mc_llava(mc_llava_root, tasks=("grounding",))
    assert [i.protocol for i in only.items] == ["grounding"]
    with pytest.raises(PredictionFormatError, match="not in concept_type"):
        datasets.mc_llava(mc_llava_root, scenarios=["bo_nobody"])
    with pytest.raises(PredictionFormatError, match="not a plain name"):
        datasets.mc_llava(mc_llava_root, scenarios=["../../bo_mam"])
    (mc_llava_root / "two_concept/multi/bo_mam/vqa.json").write_text(json.dumps({"../../../etc/passwd": []}))
    with pytest.raises(PredictionFormatError, match="not found under"):
        datasets.mc_llava(mc_llava_root)


@pytest.fixture
def mmpb_root(tmp_path):
    """MMPB's on-disk release layout: dataset.csv and <attribute>/train/<name>/*.png."""
    import csv

    root = tmp_path / "MMPB"
    for name, attribute in (("bo", "animal"), ("mam", "object")):
        for i in range(2):
            drawn(root / attribute / "train" / name / f"{i}.png", *COLORS[name])
    test = drawn(root / "animal/test/bo/recognition/0.png", *COLORS["bo"])
    pref = drawn(root / "object/test/mam/preference/travel/likes0.png", (20, 160, 40))
    rows = [
        {"index": 0, "question": "Is <sks> in this image?", "image_path": str(test.relative_to(root)), "answer": "Yes",
         "attribute": "animal", "category": "recognition", "l2-category": "awareness", "name": "bo",
         "description_moderate": "<sks> is a red shiba.", "preference": "<sks> likes parks."},
        {"index": 1, "question": "Which would <sks> pick?", "A": "a beach", "B": "a mall",
         "image_path": str(pref.relative_to(root)), "answer": "A", "attribute": "object", "category": "preference",
         "l2-category": "inconsistency", "concept": "travel", "name": "mam",
         "description_moderate": "<sks> is a blue mug.", "preference": "<sks> loves beaches."},
    ]
    fields = ["index", "question", "A", "B", "C", "D", "image_path", "answer", "attribute", "category", "l2-category",
              "concept", "target", "name", "preference", "description_simple", "description_moderate",
              "description_detailed", "description_super_detailed", "prompt"]
    with (root / "dataset.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_mmpb_reader(mmpb_root):
    bench = datasets.mmpb(mmpb_root)
    assert [(c.name, len(c.images), c.info, c.category) for c in bench.concepts] == [
        ("bo", 2, "<bo> is a red shiba. <bo> likes parks.", "animal"),
        ("mam", 2, "<mam> is a blue mug. <mam> loves beaches.", "object")]
    rec, pref = bench.items
    assert (rec.protocol, rec.scorer, rec.question, rec.concepts) == ("recognition", "mmpb", "\nIs <bo> in this image?\n",
                                                                      ["bo"])
    assert pref.question == "\nWhich would <mam> pick?\nOptions:\nA. a beach\nB. a mall\n"
    assert score_file("mmpb", [rec.answered("Yes, it is."), pref.answered("B")])["accuracy"] == 0.5
    with pytest.raises(PredictionFormatError, match="description"):
        datasets.mmpb(mmpb_root, description="long")
    table = (mmpb_root / "dataset.csv").read_text()
    (mmpb_root / "dataset.csv").write_text(table.replace(",bo,", ",../../bo,"))
    with pytest.raises(PredictionFormatError, match="not a plain name"):
        datasets.mmpb(mmpb_root)


def test_myvlm_reader(tmp_path):
    root = tmp_path / "myvlm_data"
    for name, (color, kind) in COLORS.items():
        for i in range(3):
            drawn(root / name / f"{name}_{i}.jpg", color, kind)
        (root / name / "captions.json").write_text(json.dumps({f"{name}_1.jpg": [f"{name} on a table"]}))
    bench = datasets.myvlm(root, references=2)
    assert [(c.name, [p.name for p in c.images]) for c in bench.concepts] == [
        ("bo", ["bo_0.jpg", "bo_1.jpg"]), ("mam", ["mam_0.jpg", "mam_1.jpg"])]
    assert [(i.scorer, i.row[:2]) for i in bench.items] == [("repic-single", ["myvlm_data/bo/bo_2.jpg", ["<bo>"]]),
                                                          ("repic-single", ["myvlm_data/mam/mam_2.jpg", ["<mam>"]])]
    with pytest.raises(PredictionFormatError, match="none left"):
        datasets.myvlm(root, references=3)


def test_every_protocol_runs_with_every_method(yollava_data, repic_root, mc_llava_root, mmpb_root, tiny_cache,
                                               tmp_path):
    """Each reader's protocols, every method (and an option row), on the tiny preset end to end: one pipeline, one
    user per benchmark. The peer-format predictions written score to the reported numbers."""
    from mmpersona.conceptdb import ConceptDB
    from pipelines.peers.run import METHODS, register, run
    from pipelines.peers.scoring import SCORERS
    from pipelines.vlm import PersonalizedVLMPipeline

    myvlm_root = tmp_path / "myvlm_data"
    for name, (color, kind) in COLORS.items():
        for i in range(2):
            drawn(myvlm_root / name / f"{name}_{i}.jpg", color, kind)
        (myvlm_root / name / "captions.json").write_text("{}")
    benches = {
        "yollava": datasets.yollava(yollava_data / "yollava-data", visual_qa=yollava_data / "yollava-visual-qa.json",
                                    text_qa=yollava_data / "yollava-text-only-qa.json"),
        "repic": datasets.repic(repic_root, repic_root / "data/query_tot/2_concept_query_templates.json",
                                repic_root / "data/database_tot/database_2_concepts/database_mod.json"),
        "myvlm": datasets.myvlm(myvlm_root),
        "mc-llava": datasets.mc_llava(mc_llava_root),
        "mmpb": datasets.mmpb(mmpb_root),
    }
    methods = [*METHODS, "retrieval:k=1,max_images=1"]
    with ConceptDB(tmp_path / "e.db", preset="tiny", device="cpu") as db:
        pipe = PersonalizedVLMPipeline(db, preset="tiny", device="cpu", max_new_tokens=2)
        for user, bench in benches.items():
            register(db, user, bench.concepts)
            out = tmp_path / user
            report = run(pipe, user, bench, methods, out=out, progress=False, learn_steps=1)
            protocols = {i.protocol for i in bench.items}
            assert report["concepts_learned"] == len(bench.concepts)
            for method in methods:
                assert set(report["results"][method]) == protocols, (user, method)
                for protocol, metrics in report["results"][method].items():
                    label = method.replace(":", "_").replace(",", "_")
                    written = json.loads((out / f"{label}-{protocol}.json").read_text())
                    assert SCORERS[metrics["scorer"]](written) == {k: v for k, v in metrics.items() if k != "scorer"}
            assert set(report["against_vanilla"]) == set(methods) - {"vanilla"}
            assert db.store.count(user) == len(bench.concepts)  # no benchmark saw another's concepts


def test_method_options_are_rows_of_their_own(yollava_data, tiny_cache, tmp_path):
    from mmpersona.errors import MmpersonaError
    from pipelines.peers.run import parse_method

    assert parse_method("retrieval:regions,k=1,min_score=0.25") == ("retrieval", {"regions": True, "k": 1,
                                                                                  "min_score": 0.25})
    assert parse_method("hybrid:max_images=1") == ("hybrid", {"max_images": 1, "mode": "hybrid"})
    for bad, match in (("retrieval:colour=red", "unknown option"), ("retrieval:k=two", "needs a number"),
                       ("best", "unknown method"), ("retrieval:mode=tokens", "unknown option")):
        with pytest.raises(MmpersonaError, match=match):
            parse_method(bad)
    out = tmp_path / "opts"
    report = json.loads(cli("--json", "eval", "bench", "yollava", str(yollava_data / "yollava-data"),
                            "--method", "retrieval", "--method", "retrieval:regions,k=1", "--limit", "2",
                            "--max-new-tokens", "2", "--out", str(out)))
    assert list(report["results"]) == ["retrieval", "retrieval:regions,k=1"]
    assert (out / "retrieval_regions_k=1-recognition.json").is_file()
    cached = [json.loads(line)["method"] for line in (out / "answers.jsonl").read_text().splitlines()]
    assert cached.count("retrieval:regions,k=1") == 2  # cached under its own label, not the plain row's


def test_mmpb_parquet_release_is_laid_out_as_mmpbs_converter_does(tmp_path, monkeypatch):
    """The Hugging Face release (Parquet, images as {bytes, path} structs, answers as codes) read directly: the
    images written once into the cache, the answers as MMPB's CSV writes them."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("MMPERSONA_CACHE_DIR", str(tmp_path / "cache"))

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": "x.png"}

    rows = [{"index": 0, "question": "Is <sks> in this image?", "A": None, "B": None, "C": None, "D": None,
             "image_path": png((200, 30, 30)), "answer": 4, "attribute": "animal", "category": "recognition",
             "l2-category": "awareness", "concept": None, "target": None, "name": "bo ",
             "preference": "<sks> likes parks.", "description_moderate": "<sks> is a shiba.",
             **{f"injection_image_{i}": png((200, 30 + i, 30)) for i in range(1, 6)}},
            {"index": 1, "question": "Which would <sks> pick?", "A": "a beach", "B": "a mall", "C": None, "D": None,
             "image_path": png((20, 160, 40)), "answer": 1, "attribute": "animal", "category": "preference",
             "l2-category": "inconsistency", "concept": "travel", "target": None, "name": "bo",
             "preference": "<sks> likes parks.", "description_moderate": "<sks> is a shiba.",
             **{f"injection_image_{i}": None for i in range(1, 6)}}]
    release = tmp_path / "MMPB-hf" / "data"
    release.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), release / "train-00000-of-00001.parquet")
    bench = datasets.mmpb(tmp_path / "MMPB-hf")
    assert [(c.name, len(c.images), c.info) for c in bench.concepts] == [("bo", 5, "<bo> is a shiba. <bo> likes parks.")]
    assert [i.row["answer"] for i in bench.items] == ["Yes", "B"]  # codes 4 and 1 (with options)
    assert all(i.image.is_file() and str(i.image).startswith(str(tmp_path / "cache")) for i in bench.items)
    assert bench.items[1].question.endswith("Options:\nA. a beach\nB. a mall\n")
    again = datasets.mmpb(tmp_path / "MMPB-hf")  # laid out once: read back from the cache
    assert [i.image for i in again.items] == [i.image for i in bench.items]
    (release / "train-00000-of-00001.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(PredictionFormatError, match="not a readable MMPB Parquet"):
        datasets.mmpb(tmp_path / "MMPB-hf")
