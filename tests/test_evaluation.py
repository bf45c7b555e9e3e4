"""Evaluation metrics on fixtures with known model outputs, calibration, and one run through the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mmpersona.errors import MmpersonaError
from pipelines.calibrate import calibrate, choose_threshold
from pipelines.evaluation import (RECOGNITION_QUESTION, evaluate, load_dataset, mentioned, parse_choice,
                                  parse_yes_no)


def drawn(color, kind="ellipse") -> Image.Image:
    img = Image.new("RGB", (64, 64), (235, 235, 225))
    getattr(ImageDraw.Draw(img), kind)((12, 12, 52, 52), fill=color)
    return img


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    layout = {"concepts/bo/1.png": (200, 30, 30), "concepts/mam/1.png": (30, 60, 200),
              "test/bo/a.png": (190, 40, 40), "test/bo/b.png": (210, 20, 30), "test/mam/a.png": (40, 70, 190),
              "test/negatives/n.png": (30, 160, 40)}
    for rel, color in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        drawn(color).save(root / rel)
    (root / "concepts.json").write_text(json.dumps({"bo": {"category": "dog", "info": "a shiba"}}))
    (root / "questions.json").write_text(json.dumps({"mcqa": [
        {"image": "test/bo/a.png", "question": "What animal is <bo>?", "options": {"A": "cat", "B": "dog"},
         "answer": "B", "concept": "bo"},
        {"image": "test/bo/b.png", "question": "Colour of <bo>?", "options": {"A": "blue", "B": "red"},
         "answer": "B", "concept": "bo"},
        {"image": "test/mam/a.png", "question": "Where is <mam>?", "options": {"A": "x", "B": "y", "C": "z",
                                                                             "D": "w"},
         "answer": "C", "concept": "mam"},
    ]}))
    return root


def scripted(root: Path, fillers_expected: int = 0):
    """A model whose outputs are fixed per (image, question): the expected metrics are worked out by hand."""
    calls = []

    def answer(image, question, history):
        calls.append((question, len(history)))
        rel = str(Path(image).relative_to(root))
        folder = Path(rel).parent.name
        if question.startswith("Is <"):
            if len(history) != fillers_expected:
                return "maybe"
            name = question[4:].split(">")[0]
            if rel == "test/bo/b.png" and name == "bo":
                return "No, I don't think so."  # a missed positive
            if folder == "negatives" and name == "mam":
                return "Yes."  # a false positive
            return "Yes" if folder == name else "no"
        if question.startswith("Describe this image"):
            return {"test/bo/a.png": "A photo of <bo> on grass.", "test/bo/b.png": "A dog with mam.",
                    "test/mam/a.png": "mam sleeping", "test/negatives/n.png": "An empty room."}[rel]
        if "Answer with the letter" in question:
            return {"test/bo/a.png": "B", "test/bo/b.png": "(A) because", "test/mam/a.png": "C or D"}[rel]
        return "a filler answer"

    answer.calls = calls
    return answer


def test_recognition_mcqa_caption_metrics(dataset):
    data = load_dataset(dataset)
    report = evaluate(scripted(dataset), data, ["recognition", "mcqa", "caption"])
    rec = report["recognition"]
    assert rec["per_concept"]["bo"]["positive_accuracy"] == 0.5
    assert rec["per_concept"]["bo"]["negative_accuracy"] == 1.0
    assert rec["per_concept"]["bo"]["weighted_accuracy"] == 0.75
    assert rec["per_concept"]["mam"]["negative_accuracy"] == pytest.approx(2 / 3)
    assert rec["overall"]["positive_accuracy"] == pytest.approx(2 / 3)
    assert rec["overall"]["negative_accuracy"] == pytest.approx(4 / 5)
    assert rec["overall"]["weighted_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert report["mcqa"]["overall"]["accuracy"] == pytest.approx(1 / 3)
    assert report["mcqa"]["per_concept"]["bo"]["accuracy"] == 0.5
    cap = report["caption"]["overall"]
    assert (cap["tp"], cap["fp"], cap["fn"]) == (2, 1, 1)
    assert cap["precision"] == pytest.approx(2 / 3) and cap["f1"] == pytest.approx(2 / 3)
    assert report["caption"]["per_concept"]["mam"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                                       "tp": 1, "fp": 1, "fn": 0}


def test_mmpb_asks_after_filler_turns(dataset):
    model = scripted(dataset, fillers_expected=2)
    report = evaluate(model, load_dataset(dataset), ["mmpb"], fillers=2)
    assert report["mmpb"]["filler_turns"] == 2
    assert report["mmpb"]["overall"]["weighted_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    queries = [n for q, n in model.calls if q == RECOGNITION_QUESTION.format(name="bo")]
    assert queries and set(queries) == {2}


def test_parsers():
    assert parse_yes_no("Yes, it is.") is True and parse_yes_no("no") is False
    assert parse_yes_no("It is not there") is False and parse_yes_no("Perhaps") is None
    assert parse_choice("B", "AB") == "B" and parse_choice("Answer: (C).", "ABCD") == "C"
    assert parse_choice("A or B", "AB") is None and parse_choice("I am unsure", "AB") is None
    assert mentioned("I see <Bo> and a Mam-like cat", ["bo", "mam"]) == {"bo", "mam"}
    assert mentioned("a bowl", ["bo"]) == set()
    assert mentioned("my shiba", ["bo"], {"bo": ["shiba"]}) == {"bo"}


def test_bad_dataset_and_protocol(tmp_path, dataset):
    with pytest.raises(MmpersonaError, match="needs a test/ folder"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(MmpersonaError, match="valid: recognition, mcqa, caption, mmpb"):
        evaluate(scripted(dataset), load_dataset(dataset), ["bleu"])
    (dataset / "questions.json").write_text("{nope")
    with pytest.raises(MmpersonaError, match="not valid JSON"):
        load_dataset(dataset)


def test_choose_threshold():
    scored = [(0.95, True), (0.9, True), (0.85, False), (0.8, True), (0.7, False), (0.6, False)]
    t, p, r, reached = choose_threshold(scored, n_positive=4, target=0.75)
    assert (t, reached) == (0.8, True) and p == 0.75 and r == 0.75
    t, p, r, reached = choose_threshold(scored, n_positive=4, target=1.0)
    assert t == 0.9 and p == 1.0 and r == 0.5
    t, _, _, reached = choose_threshold([(0.5, False)], n_positive=1, target=0.9)
    assert not reached and t > 0.5


def test_calibrate_stores_threshold(tmp_path, tiny_embedder):
    from mmpersona import ConceptDB
    from pipelines.vlm import THRESHOLD_SETTING

    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        db.add("alice", "bo", [drawn((200, 30, 30))])
        db.add("alice", "mug", [drawn((30, 60, 200), "rectangle")])
        result = calibrate(db, "alice", {"bo": [drawn((205, 35, 30))], "mug": [drawn((35, 60, 195), "rectangle")]},
                           [drawn((30, 160, 40), "rectangle")], target_precision=1.0)
        assert result.positives == 2 and result.negatives == 1
        assert db.store.get_setting("alice", THRESHOLD_SETTING) == result.threshold
        assert result.reached == (result.precision >= 1.0)


def test_eval_cli_end_to_end(dataset, tiny_cache, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "mmpersona", "--preset", "tiny", "--device", "cpu", "--json",
                           "eval", "run", str(dataset), "--protocol", "recognition", "--protocol", "caption",
                           "--max-new-tokens", "2", "--out", str(out)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads(out.read_text())
    assert set(report["recognition"]["per_concept"]) == {"bo", "mam"}
    assert report["recognition"]["overall"]["positives"] == 3 and report["recognition"]["overall"]["negatives"] == 5
    assert "f1" in report["caption"]["overall"]
