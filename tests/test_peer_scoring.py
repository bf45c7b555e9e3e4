"""The peers' scoring rules on prediction files written by hand in the peers' own formats, with the scores worked
out by hand from the rules their scripts implement (pipelines/peers/FORMATS.md)."""

import json
import os
import subprocess
import sys

import pytest

from pipelines.peers.scoring import (PredictionFormatError, format_repic, rap_normalize_answer, repic_tokens,
                                     score_file, score_rap_qa, score_repic_captions, score_yollava_recognition)

# ------------------------------------------------------------------------------------------ RePIC

TWO = [  # [image, gold, caption, question] as RePIC's caption_eval_multi_2.py writes them
    ["./q/Anya_and_Bond_1.jpg", ["<Anya>", "<Bond>"], "<Anya> is petting <Bond>.</s>", "Give a caption."],
    # <Bond>'s keeps its apostrophe-s (only .,!?;:()[]{}"'- are trimmed, and only at the ends): Bond not found;
    # another pool name (<Bluey>) is present -> a miss for Bond
    ["./q/Anya_and_Bond_2.jpg", ["<Anya>", "<Bond>"], "<Anya> hugs <Bond>'s friend <Bluey>!", "q"],
    # case-sensitive in the 2-concept scorer: "anya" is not "Anya"; nothing else present -> no prediction
    ["./q/Anya_and_Bond_3.jpg", ["<Anya>", "<Bond>"], "anya and bond play.", "q"],
    ["./q/Bluey_and_Bingo_1.jpg", ["<Bluey>", "<Bingo>"], "(Bluey) and <Bingo>, two dogs", "q"],
]


def test_repic_two_concepts_by_hand():
    m = score_repic_captions(TWO, "2")
    # slots: 8. correct: Anya, Bond (row 1); Anya (row 2); Bluey, Bingo (row 4) = 5. misses: Bond (row 2) = 1.
    assert (m["slots"], m["correct"], m["misses"]) == (8, 5, 1)
    assert m["precision"] == pytest.approx(5 / 6) and m["recall"] == pytest.approx(5 / 8)
    assert m["f1"] == pytest.approx(2 * (5 / 6) * (5 / 8) / (5 / 6 + 5 / 8))
    assert format_repic("x.json", m) == f"file: {'x.json':<60}  metric (P/R/F1):  83.3 /  62.5 /  71.4"


def test_repic_four_concepts_lower_case_and_spaces():
    rows = [["./g.jpg", ["<thor>", "<ironman>", "<black widow>", "<hulk>"],
             "<Thor>, <Hulk> and <Black Widow> with <Hawkeye>", "q"],
            ["./g.jpg", ["<thor>", "<ironman>", "<hawkeye>", "<hulk>"], "Thor and ironman. ", "q"]]
    m = score_repic_captions(rows, "4")
    # row 1: thor, hulk found (lower-cased); ironman and "black widow" (a name with a space never matches a
    # single token) missing while other pool names (hawkeye) are present -> 2 misses.
    # row 2: thor, ironman found; hawkeye and hulk missing, no other pool name present -> nothing predicted.
    assert (m["correct"], m["misses"], m["slots"]) == (4, 2, 8)
    assert m["precision"] == pytest.approx(4 / 6) and m["recall"] == pytest.approx(4 / 8)


def test_repic_single_concept_uses_the_first_gold_name():
    rows = [["a.jpg", ["<Backpack>"], "A photo of <backpack> on a bench", "q"],
            ["b.jpg", ["<mug>"], "my <Backpack> next to a cup", "q"],  # another pool name: a miss
            ["c.jpg", ["<mug>", "<extra>"], "nothing here", "q"]]       # only row[1][0] counts
    m = score_repic_captions(rows, "single")
    assert (m["slots"], m["correct"], m["misses"]) == (3, 1, 1)
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == pytest.approx(1 / 3)


def test_repic_tokens():
    assert repic_tokens("<Anya>, (Bond)! **<Thor>** x</s>", lower=False) == ["<Anya>", "Bond", "**<Thor>**", "x"]
    assert repic_tokens("<A>", lower=True) == ["<a>"]


# ------------------------------------------------------------------------------------------ RAP QA, recognition


def test_rap_qa_normalisation_and_its_quirk():
    assert rap_normalize_answer("The answer: B.") == "answer b"
    assert rap_normalize_answer("A") == "" == rap_normalize_answer("the")  # "a" is an article to this rule
    rows = [{"answer": "B", "correct_answer": "B"}, {"answer": "B.", "correct_answer": "B"},
            {"answer": "A", "correct_answer": "A"}, {"answer": "", "correct_answer": "A"},  # quirk: counts
            {"answer": "A. Dog", "correct_answer": "A"}, {"answer": "A", "correct_answer": "B"}]
    assert score_rap_qa(rows) == {"accuracy": 4 / 6, "items": 6}


def test_yollava_recognition_exact_yes_no_and_dropped_answers():
    rows = [{"concept": "bo", "correct_answer": True, "answer": "Yes"},
            {"concept": "bo", "correct_answer": True, "answer": "No"},
            {"concept": "bo", "correct_answer": True, "answer": "Yes."},  # not exactly Yes/No: dropped
            {"concept": "mam", "correct_answer": False, "answer": " No "},
            {"concept": "mam", "correct_answer": False, "answer": "No"},
            {"concept": "mam", "correct_answer": False, "answer": "Yes"},
            {"concept": "mam", "correct_answer": False, "answer": "yes"}]  # case-sensitive: dropped
    m = score_yollava_recognition(rows)
    assert m["positive_accuracy"] == 1 / 2 and m["negative_accuracy"] == 2 / 3
    assert m["weighted_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert (m["positives"], m["negatives"], m["dropped"]) == (2, 3, 2)


@pytest.mark.parametrize("fmt, rows", [("repic-2", [["a", "not a list", "c"]]), ("rap-qa", [{"answer": 1}]),
                                       ("yollava-recognition", [{"answer": "Yes", "correct_answer": "yes"}]),
                                       ("repic-4", []), ("nope", [])])
def test_malformed_prediction_files(fmt, rows):
    with pytest.raises(PredictionFormatError):
        score_file(fmt, rows)


def test_eval_score_cli(tmp_path):
    f = tmp_path / "multi_captioning-retrieval-skip-ours-2_concepts.json"
    f.write_text(json.dumps(TWO))
    proc = subprocess.run([sys.executable, "-m", "mmpersona", "eval", "score", "repic-2", str(f)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == format_repic(f.name, score_repic_captions(TWO, "2"))
    bad = tmp_path / "bad.json"
    bad.write_text("[[")
    proc = subprocess.run([sys.executable, "-m", "mmpersona", "eval", "score", "repic-2", str(bad)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


# ------------------------------------------------------------------------------------------ MMPB


def test_mmpb_parsing_rules():
    from pipelines.peers.scoring import mmpb_choice, mmpb_yes_no

    opts = {"A": "a red ball", "B": "a blue mug", "C": "tea", "D": "coffee"}
    assert mmpb_choice("(B) a blue mug", opts) == "B"
    assert mmpb_choice("Answer: C.", opts) == "C"
    assert mmpb_choice("A or B", opts) == "Z"  # two letters, and two option texts: no answer
    assert mmpb_choice("I would pick coffee", opts) == "D"  # no letter: exactly one option's text
    assert mmpb_choice("Cannot determine the answer", opts) == "Z"
    assert mmpb_yes_no("Yes, it is.") == "yes" and mmpb_yes_no("nope") == "no"
    assert mmpb_yes_no("The answer is yes") == "the"  # only the first word counts
    assert mmpb_yes_no("") == ""


def test_mmpb_scores_and_groups(tmp_path):
    import csv

    from pipelines.peers.scoring import read_predictions, score_mmpb

    header = ["index", "question", "A", "B", "C", "D", "answer", "attribute", "category", "l2-category", "concept",
              "target", "prediction"]
    rows = [
        [0, "q", "", "", "", "", "Yes", "human", "preference", "awareness", "travel", "", "Yes."],
        [1, "q", "", "", "", "", "Yes", "human", "preference", "awareness", "travel", "", "I think yes"],
        [2, "q", "", "", "", "", "No", "animal", "recognition", "overconcept", "", "Homo", "no"],
        [3, "q", "cat", "dog", "", "", "B", "animal", "recognition", "inconsistency", "", "Single", "B. dog"],
    ]
    path = tmp_path / "model_MMPB.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    m = score_mmpb(read_predictions(path))
    assert m["accuracy"] == 3 / 4 and m["items"] == 4
    g = m["groups"]
    assert g["preference"] == 1 / 2 and g["recognition"] == 1.0 and g["awareness"] == 1 / 2
    assert g["preference + awareness + travel"] == 1 / 2
    assert g["recognition + +animal + overconcept + Homo"] == 1.0
    assert g["recognition + inconsistency"] == 1.0 and g["human"] == 1 / 2
    with pytest.raises(PredictionFormatError, match="prediction"):
        score_mmpb([{"l2-category": "awareness", "category": "x", "answer": "Yes"}])


# ------------------------------------------------------------------------------------------ MC-LLaVA

REC = {  # eval.py's four lists, mode rec
    "queries": ["Can you see <Alex> in this photo? ..."] * 6,
    "predictions": ["Yes", "Yes.", "No", "Yes", "No", "yes"],
    "ground_truths": ["Yes", "Yes", "Yes", "Yes", "No", "No"],
    "conversation_types": ["si_sq", "si_sq", "mi_sq", "mi_mq", "si_sq", "si_sq"],
}


def test_mc_llava_recognition_by_hand():
    m = score_file("mc-llava-rec", REC)
    # exact strings: "Yes." and "yes" are wrong. Yes items: 1, 0, 0, 1 -> recall 2/4; No items: 1, 0 -> 1/2
    assert m["recall"] == 0.5 and m["no_recall"] == 0.5 and m["weighted"] == 0.5
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["groups"]["accuracy si_sq"] == pytest.approx(2 / 4)  # Yes, Yes., No(gold No), yes
    assert m["groups"]["recall mi_mq"] == 1.0 and m["groups"]["no recall mi_sq"] == 0.0  # an empty group prints 0


def test_mc_llava_choice_text_and_caption_by_hand():
    choice = {"predictions": ["A", "A.", "B", "C"], "ground_truths": ["A", "A", "B", "D"],
              "conversation_types": ["si_sq", "si_sq", "mi_sq", "mi_mq"], "queries": ["q"] * 4}
    m = score_file("mc-llava-choice", choice)
    assert m["accuracy"] == 0.5 and m["groups"] == {"accuracy si_sq": 0.5, "accuracy mi_sq": 1.0,
                                                    "accuracy mi_mq": 0.0}
    text = {"predictions": ["B", "b"], "ground_truths": ["B", "B"], "conversation_types": ["s", "m"], "queries": ["q"] * 2}
    assert score_file("mc-llava-text", text)["groups"] == {"accuracy s": 1.0, "accuracy m": 0.0}
    caption = {"predictions": ["<Alex> runs", "alex runs", "Alex and Marty sit", "nobody"],
               "ground_truths": ["<Alex>", "<Alex>", ["Alex", "Gloria", "Marty"], ["Alex"]],
               "conversation_types": ["si", "si", "mi", "mi"], "queries": ["q"] * 4}
    m = score_file("mc-llava-caption", caption)
    # si: 1 + 0 (case-sensitive, with the brackets); mi: 2/3 + 0; total (1 + 2/3) / 4
    assert m["groups"] == {"recall si": 0.5, "recall mi": pytest.approx(1 / 3)}
    assert m["recall"] == pytest.approx((1 + 2 / 3) / 4)


def test_mc_llava_character_bleu_is_nltks():
    """`bleu_chars` against NLTK's own sentence_bleu, as MC-LLaVA calls it, on strings that reach every branch
    (empty candidate, no match, one character, longer than the reference)."""
    import warnings

    from hypothesis import given, settings, strategies as st
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    from pipelines.peers.scoring import bleu_chars

    @settings(max_examples=400, deadline=None)
    @given(st.text("abc d", max_size=12), st.text("abcde ", max_size=12))
    def check(reference, candidate):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = sentence_bleu([list(reference)], list(candidate), weights=(0.7, 0.3),
                                     smoothing_function=SmoothingFunction().method1)
        assert bleu_chars(reference, candidate) == pytest.approx(expected, abs=1e-12)

    check()
    m = score_file("mc-llava-vqa", {"predictions": ["a red dog", "x"], "ground_truths": ["a red dog", "blue"],
                                    "conversation_types": ["si_sq", "mi_sq"], "queries": ["q"] * 2})
    assert m["groups"]["bleu si_sq"] == pytest.approx(1.0) and m["groups"]["bleu mi_sq"] == 0.0


def test_mc_llava_printout_is_read_as_eval_py_prints_it(tmp_path):
    """eval.py's stdout, as a run leaves it in a log: the four lists, each on the line after its title."""
    log = tmp_path / "eval_rec.log"
    log.write_text("100%|##########| 6/6\n    Quaries: \n    " + repr(REC["queries"]) + "\n    Predictions: \n    "
                   + repr(REC["predictions"]) + "\n    Ground truths: \n    " + repr(REC["ground_truths"])
                   + "\n    Conversation types: \n    " + repr(REC["conversation_types"])
                   + "\n  Accuracy for si_sq: 0.5//4, ...\n")
    out = subprocess.run([sys.executable, "-m", "mmpersona", "--json", "eval", "score", "mc-llava-rec", str(log)],
                         capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["weighted"] == 0.5
    log.write_text("    Predictions: \n    __import__('os').system('true')\n")
    with pytest.raises(PredictionFormatError, match="not a Python literal"):
        from pipelines.peers.scoring import read_predictions

        read_predictions(log)
    with pytest.raises(PredictionFormatError, match="one length"):
        score_file("mc-llava-rec", {**REC, "predictions": REC["predictions"][:2]})
