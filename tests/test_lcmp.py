"""TAME's LCMP in its published layout (`pipelines/peers/lcmp.py`), on a small folder written here in that layout
(our own texts and photos), and through `mmpersona eval bench lcmp`."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from pipelines.peers.lcmp import LcmpFormatError, choice_of, read_lcmp


def lcmp_folder(root, *, broken_profile: bool = False):
    """data/concept_pet/rex_1 (and the data/concept/rex_1 link), in LCMP's layout."""
    folder = root / "data" / "concept_pet" / "rex_1"
    (folder / "img").mkdir(parents=True)
    for i, name in enumerate(("base", "turn_1_photo", "q_1", "q_2")):
        Image.new("RGB", (48, 48), (40 * i + 20, 120, 200 - 40 * i)).save(folder / "img" / f"{name}.png")
    profile = 'concept_id: rex_1\nname: "Rex"\nspecies: "Canine"\n'
    (folder / "profile.yaml").write_text(profile + ("behavior: [unclosed\n" if broken_profile else ""))
    (folder / "history.yaml").write_text(
        "- turn: 2\n  log_type: knowledge\n  user_input: \"Rex loves tennis balls.\"\n"
        "  assistant_response: \"Noted.\"\n  image_prompt: null\n  image_id: null\n"
        "- turn: 1\n  log_type: knowledge\n  user_input: \"This is my dog Rex. [IMAGE] He is a beagle.\"\n"
        "  assistant_response: \"Hello Rex!\"\n  image_prompt: x\n  image_id: turn_1_photo\n")
    question = ("- id: {id}\n  type: Long Term\n  question: \"{q} [IMAGE]\"\n  image_prompt: x\n"
                "  evaluation_criteria:\n    ideal_answer: \"{a}\"\n    key_points: [\"{a}\"]\n"
                "  options: [\"Socks\", \"{a}\", \"Sticks\", \"Nothing\"]\n  answer: \"{a}\"\n  image_id: q_{id}\n")
    (folder / "easy_question.yaml").write_text(question.format(id=1, q="What does Rex love?", a="Tennis balls"))
    (folder / "hard_question.yaml").write_text(question.format(id=2, q="What breed is he?", a="A beagle"))
    (root / "data" / "concept").mkdir()
    os.symlink("../concept_pet/rex_1", root / "data" / "concept" / "rex_1")
    return folder


def test_lcmp_is_read_in_its_layout(tmp_path):
    folder = lcmp_folder(tmp_path, broken_profile=True)
    (rex,) = read_lcmp(tmp_path)  # the link and the folder: one concept
    assert (rex.id, rex.name, rex.category, rex.photo.name) == ("rex_1", "Rex", "pet", "base.png")
    assert [t["text"] for t in rex.history] == ["This is my dog Rex. [IMAGE] He is a beagle.",
                                                "Rex loves tennis balls."]  # in turn order
    assert rex.history[0]["image"].name == "turn_1_photo.png" and rex.history[1]["image"] is None
    assert [(q.difficulty, q.right, q.image.name) for q in rex.questions] == [("easy", "B", "q_1.png"),
                                                                             ("hard", "B", "q_2.png")]
    (folder / "easy_question.yaml").write_text((folder / "easy_question.yaml").read_text()
                                               .replace("image_id: q_1", "image_id: ../../secret"))
    with pytest.raises(LcmpFormatError, match="not a plain file name"):
        read_lcmp(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LcmpFormatError, match="no LCMP concept"):
        read_lcmp(tmp_path / "empty")


@pytest.mark.parametrize("answer, letter", [("B", "B"), ("(c) a beagle", None), ("Answer: D.", "D"),
                                            ("I think it is A, tennis", "A"), ("", None), ("BAD", None)])
def test_the_choice_is_the_first_option_letter(answer, letter):
    assert choice_of(answer) == letter


def test_lcmp_through_the_cli_with_the_toolkits_memory(tmp_path, tiny_cache):
    """The history is told through the memory step and kept as a conversation; each question is asked with its
    photo and lettered options; the report and TAME's evaluator's predictions are written; what the user said
    about the answer is in the memory section of its prompt."""
    from test_cli import run_cli

    lcmp_folder(tmp_path / "tame")
    out = tmp_path / "run"
    report = json.loads(run_cli("--preset", "tiny", "--device", "cpu", "--json", "eval", "bench", "lcmp",
                                str(tmp_path / "tame"), "--max-new-tokens", "2", "--out", str(out)).stdout)
    assert report["concepts"] == 1 and report["overall"]["questions"] == 2 and report["context"] == "memory"
    rows = json.loads((out / "report.json").read_text())["questions"]
    assert [(r["question_id"], r["right"]) for r in rows] == [(1, "B"), (2, "B")]
    assert rows[0]["evidence_in_prompt"] and rows[0]["memory_used"] >= 1  # "Rex loves tennis balls." was used
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [set(p) for p in predictions] == [{"concept_id", "question_id", "difficulty", "answer", "choice"}] * 2
    history = json.loads(run_cli("--preset", "tiny", "--device", "cpu", "--json", "eval", "bench", "lcmp",
                                 str(tmp_path / "tame"), "--context", "history", "--extractor", "verbatim",
                                 "--max-new-tokens", "2", "--out", str(tmp_path / "run2")).stdout)
    assert (history["context"], history["extractor"], history["overall"]["questions"]) == ("history", "verbatim", 2)
    assert history["overall"]["evidence_in_prompt"] == 1.0  # every turn told is in the chat history
    assert history["overall"]["context_chars_per_question"] > report["overall"]["context_chars_per_question"]
    bad = run_cli("--preset", "tiny", "eval", "bench", "lcmp", str(tmp_path / "nothing"), check=False)
    assert bad.returncode == 2 and "not a folder" in bad.stderr
