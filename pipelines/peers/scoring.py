"""The peers' own scoring rules, reproduced exactly (see FORMATS.md in this folder for the sources).

Each scorer takes the peer's own prediction file contents (already parsed JSON) and returns a dict of metrics as
fractions; `format_*` renders them as the peer's script prints them, so a number here and a number in a paper
are the same number.
"""

from __future__ import annotations

import math
import re
import string
from pathlib import Path
from typing import Any

from mmpersona.errors import MmpersonaError


class PredictionFormatError(MmpersonaError, ValueError):
    """A prediction file that is not in the format its scorer reads."""


# ------------------------------------------------------------------------------------------ RAP's QA (eval_qa.py)


def rap_normalize_answer(text: str) -> str:
    """RAP-MLLM eval/eval_qa.py `normalize_answer`: lowercase, drop punctuation, drop the articles a/an/the,
    collapse whitespace. (So "A" normalises to "" — an answer of "A", "the" or nothing matches gold "A".)"""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_rap_qa(rows: Any) -> dict[str, Any]:
    """RAP's VQA-*.json / TQA-*.json outputs: a list of {answer, correct_answer, ...}; micro-averaged exact match
    of the normalised strings."""
    if not isinstance(rows, list) or not rows:
        raise PredictionFormatError("a RAP QA prediction file is a non-empty list of {answer, correct_answer} objects")
    scores = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("answer"), str) \
                or not isinstance(row.get("correct_answer"), str):
            raise PredictionFormatError(f"row {i}: expected 'answer' and 'correct_answer' strings")
        scores.append(rap_normalize_answer(row["answer"]) == rap_normalize_answer(row["correct_answer"]))
    return {"accuracy": sum(scores) / len(scores), "items": len(scores)}


# ------------------------------------------------------------------------------------------ recognition


def score_yollava_recognition(rows: Any) -> dict[str, Any]:
    """Yo'LLaVA's test-sks-acc.py rule on RAP's recognition output (a list of {concept, correct_answer: bool,
    answer, ...}): a prediction counts only if the stripped answer is exactly "Yes" or "No" (case-sensitive);
    any other answer is dropped from numerator and denominator. Positive accuracy over items whose gold answer is
    true, negative over those whose gold is false, weighted = their mean (Yo'LLaVA's train.py balanced
    accuracy). `dropped` counts the answers that were neither."""
    if not isinstance(rows, list) or not rows:
        raise PredictionFormatError("a recognition prediction file is a non-empty list of objects")
    counts = {True: [0, 0], False: [0, 0]}  # gold -> [correct, counted]
    dropped = 0
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("answer"), str) \
                or not isinstance(row.get("correct_answer"), bool):
            raise PredictionFormatError(f"row {i}: expected an 'answer' string and a boolean 'correct_answer'")
        said = row["answer"].strip()
        if said not in ("Yes", "No"):
            dropped += 1
            continue
        gold = row["correct_answer"]
        counts[gold][1] += 1
        counts[gold][0] += (said == "Yes") == gold
    pos = counts[True][0] / counts[True][1] if counts[True][1] else None
    neg = counts[False][0] / counts[False][1] if counts[False][1] else None
    weighted = (pos + neg) / 2 if pos is not None and neg is not None else None
    return {"positive_accuracy": pos, "negative_accuracy": neg, "weighted_accuracy": weighted,
            "positives": counts[True][1], "negatives": counts[False][1], "dropped": dropped}


# ------------------------------------------------------------------------------------------ RePIC captions

REPIC_PUNCT_STRIP = ".,!?;:()[]{}\"'-"


def _strip_brackets(token: str) -> str:
    return token[1:-1] if token.startswith("<") and token.endswith(">") else token


def repic_tokens(caption: str, *, lower: bool) -> list[str]:
    """RePIC evaluation/eval_*.py `tokenize_caption`: drop "</s>", split on whitespace, trim REPIC_PUNCT_STRIP
    from both ends of each token (not <, >, * or a curly apostrophe); lower-cased in the single- and 4-concept
    scorers, not in the 2-concept one."""
    caption = caption.replace("</s>", "")
    if lower:
        caption = caption.lower()
    return [w.strip(REPIC_PUNCT_STRIP) for w in caption.split() if w.strip(REPIC_PUNCT_STRIP)]


REPIC_SETTINGS = {"single": True, "2": False, "4": True}  # setting -> lower-cased


def score_repic_captions(rows: Any, setting: str) -> dict[str, Any]:
    """RePIC's caption concept precision / recall / F1 (evaluation/eval_single_concept.py,
    eval_multi_2_concept.py, eval_multi_4_concept.py) on its prediction format: a list of
    [image_path, gt_concepts, caption, ...] (RAP's caption.py writes the same first three fields).

    Counts are pooled over every ground-truth slot in the file. The candidate pool is every name that is ground
    truth somewhere in the file. For each gold name: found in the caption's tokens (as `<name>` or `name`) ->
    correct; else, if any other pool name is present -> a miss ("MISS"); else nothing predicted. Precision =
    correct / (correct + misses), recall = correct / slots."""
    if setting not in REPIC_SETTINGS:
        raise PredictionFormatError(f"unknown RePIC setting {setting!r}; valid: {', '.join(REPIC_SETTINGS)}")
    lower = REPIC_SETTINGS[setting]
    if not isinstance(rows, list) or not rows:
        raise PredictionFormatError("a RePIC prediction file is a non-empty list of [image, concepts, caption] rows")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) < 3 or not isinstance(row[1], list) or not isinstance(row[2], str) \
                or not all(isinstance(c, str) for c in row[1]):
            raise PredictionFormatError(f"row {i}: expected [image_path, [concepts], caption, ...]")
        records.append((row[1], row[2]))
    pool = sorted({c for gt, _ in records for c in gt})
    norm = (lambda s: s.lower()) if lower else (lambda s: s)
    pool_norm = [norm(c) for c in pool]
    predictions: list[str | None] = []
    targets: list[str] = []
    if setting == "single":  # eval_single_concept.py reads only the first gold name of each row
        records = [(gt[:1], caption) for gt, caption in records]
        pool = sorted({gt[0] for gt, _ in records if gt})
        pool_norm = [norm(c) for c in pool]
    for gt, caption in records:
        tokens = set(repic_tokens(caption, lower=lower))
        present = {_strip_brackets(c) for c in pool_norm if c in tokens or _strip_brackets(c) in tokens}
        gt_unbracketed = [_strip_brackets(norm(g)) for g in gt]
        if setting == "single":  # there, "another concept" is one whose lower-cased bare name differs
            others = {_strip_brackets(c.lower()) for c in pool} - set(gt_unbracketed)
        else:
            others = {_strip_brackets(norm(c)) for c in pool if c not in gt}
        for g in gt_unbracketed:
            if g in present:
                predictions.append(g)
            elif present & others:
                predictions.append("MISS")
            else:
                predictions.append(None)
        targets += [_strip_brackets(g).lower() for g in gt]
    correct = sum(p is not None and p != "MISS" and p.lower() == t for p, t in zip(predictions, targets, strict=True))
    predicted = sum(p is not None for p in predictions)
    precision = correct / predicted if predicted else 0.0
    recall = correct / len(targets)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "slots": len(targets), "correct": correct,
            "misses": predictions.count("MISS"), "setting": setting}


# ------------------------------------------------------------------------------------------ MMPB

MMPB_YES = {"yes", "y", "yeah", "yep", "sure", "affirmative", "ok", "okay"}
MMPB_NO = {"no", "n", "nope", "nah", "negative"}
_MMPB_REFUSALS = ["Sorry, I can't help with images of people yet.", "I can't process this file.",
                  "I'm sorry, but without the image provided", "Cannot determine the answer"]


def mmpb_yes_no(text: Any) -> str:
    """MMPB's `normalize_yes_no`: the first word, lower-cased and stripped of punctuation, mapped to yes / no
    (any other first word is kept as it is, so "The answer is yes" is not a yes)."""
    text = str(text).lower().strip()
    first = re.sub(r"[^\w\s]", "", text.split()[0]) if text else ""
    return "yes" if first in MMPB_YES else "no" if first in MMPB_NO else first


def mmpb_choice(answer: Any, choices: dict[str, str]) -> str:
    """VLMEvalKit's `can_infer` as MMPB scores with it (no LLM judge): exactly one option letter standing alone
    after `.()[],:;!*#{}` become spaces; else a lone `Z` (or a known refusal) -> Z; else exactly one option's
    text inside the lower-cased answer; else Z (MMPB's "Failed in Prefetch")."""
    answer = str(answer)
    if "Failed to obtain answer via API" not in answer:
        if any(refusal in answer for refusal in _MMPB_REFUSALS):
            return "Z"
        mod = answer
        for ch in ".()[],:;!*#{}":
            mod = mod.replace(ch, " ")
        splits = [x.strip() for x in mod.split()]
        found = [c for c in choices if c in splits]
        if len(found) == 1:
            return found[0]
        if not found and "Z" in splits:
            return "Z"
    lowered = answer.lower()
    texts = [k for k, v in choices.items() if str(v).lower() in lowered]
    return texts[0] if len(texts) == 1 else "Z"


def _mmpb_row(row: dict[str, Any]) -> dict[str, Any]:
    # MMPB lower-cases column names except single capital letters (the options)
    return {(k if len(k) == 1 and k.isupper() else k.lower()): v for k, v in row.items()}


def _present(value: Any) -> bool:
    return value is not None and value == value and str(value).strip() != ""  # NaN != NaN


def score_mmpb(rows: Any) -> dict[str, Any]:
    """MMPB's `evaluate` on its prediction table (the xlsx MMPB writes, as a list of row objects: exported to
    JSON, or read from CSV): `inconsistency` rows are multiple choice (`mmpb_choice` against the answer
    letter), `awareness` and `overconcept` rows Yes/No (`mmpb_yes_no` of prediction and answer). Accuracy is
    the mean hit overall and per category, attribute, l2-category and MMPB's combinations of them (its keys,
    e.g. "preference + awareness + travel", "recognition + +human + overconcept + Homo")."""
    if not isinstance(rows, list) or not rows:
        raise PredictionFormatError("an MMPB prediction file is a non-empty list of rows")
    hits: dict[str, list[int]] = {}

    def add(key: str, hit: int) -> None:
        hits.setdefault(key, []).append(hit)

    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            raise PredictionFormatError(f"row {i}: expected an object of MMPB's columns")
        row = _mmpb_row(raw)
        missing = [k for k in ("l2-category", "category", "answer", "prediction") if k not in row]
        if missing:
            raise PredictionFormatError(f"row {i}: missing MMPB column {missing[0]!r}")
        l2 = str(row["l2-category"])
        if l2 == "inconsistency":
            choices = {c: row[c] for c in string.ascii_uppercase if c in row and _present(row[c])}
            hit = int(mmpb_choice(row["prediction"], choices) == str(row["answer"]))
        else:
            hit = int(mmpb_yes_no(row["prediction"]) == mmpb_yes_no(row["answer"]))
        category, attribute = str(row["category"]), str(row.get("attribute", ""))
        add("Overall", hit)
        add(category, hit)
        add(attribute, hit)
        add(l2, hit)
        add(f"{category} + {l2}", hit)
        add(f"{category} + {attribute}", hit)
        if _present(row.get("concept")):
            add(f"{category} + {l2} + {row['concept']}", hit)
        if _present(row.get("target")):
            add(f"{category} + +{attribute} + {l2} + {row['target']}", hit)
    return {"accuracy": sum(hits["Overall"]) / len(hits["Overall"]), "items": len(hits["Overall"]),
            "groups": {k: sum(v) / len(v) for k, v in hits.items()}}


# ------------------------------------------------------------------------------------------ MC-LLaVA (eval/eval.py)

#: the four lists MC-LLaVA's eval/eval.py prints after a run (its only output), by the names it prints them under
MC_LLAVA_LISTS = {"queries": "Quaries:", "predictions": "Predictions:", "ground_truths": "Ground truths:",
                  "conversation_types": "Conversation types:"}


def bleu_chars(reference: str, candidate: str) -> float:
    """MC-LLaVA's `calculate_bleu`: NLTK's `sentence_bleu([list(reference)], list(candidate), weights=(0.7, 0.3),
    smoothing_function=SmoothingFunction().method1)`, on characters, reproduced without NLTK: clipped 1- and
    2-gram precisions (denominator at least 1), a zero numerator smoothed to 0.1 / denominator, the brevity
    penalty exp(1 - r/c) when the candidate is shorter, and 0 when no character matches at all."""
    from collections import Counter

    ref, hyp = list(reference), list(candidate)
    logs = []
    for n, weight in ((1, 0.7), (2, 0.3)):
        grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matched = sum(min(c, ref_grams[g]) for g, c in grams.items())
        total = max(1, sum(grams.values()))
        if n == 1 and matched == 0:
            return 0.0
        logs.append(weight * math.log((matched if matched else 0.1) / total))
    if not hyp:
        return 0.0
    penalty = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return penalty * math.exp(math.fsum(logs))


def _mc_llava_lists(data: Any) -> tuple[list[Any], list[Any], list[str]]:
    """(predictions, ground truths, conversation types) of an MC-LLaVA output: the dict of its four printed lists
    (`read_predictions` turns eval.py's printout into one)."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in
                                             ("predictions", "ground_truths", "conversation_types")):
        raise PredictionFormatError("an MC-LLaVA output holds the lists eval.py prints: queries, predictions, "
                                    "ground_truths and conversation_types")
    preds, gts, types = data["predictions"], data["ground_truths"], data["conversation_types"]
    if not (len(preds) == len(gts) == len(types)) or not preds:
        raise PredictionFormatError(f"MC-LLaVA lists must be non-empty and of one length, got {len(preds)} "
                                    f"predictions, {len(gts)} ground truths, {len(types)} conversation types")
    if not all(isinstance(p, str) for p in preds) or not all(isinstance(t, str) for t in types):
        raise PredictionFormatError("MC-LLaVA predictions and conversation types must be strings")
    return preds, gts, types


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0  # eval.py prints 0 for an empty group


def _by_type(types: list[str], values: list[float], order: tuple[str, ...]) -> dict[str, float]:
    return {t: _mean([v for v, k in zip(values, types, strict=True) if k == t]) for t in order}


def score_mc_llava_rec(data: Any) -> dict[str, Any]:
    """eval.py `analyze_rec` (mode rec): the raw answer must equal "Yes" / "No" exactly. Accuracy, recall (over
    gold Yes), no recall (over gold No), per si_sq / mi_sq / mi_mq and in total; weighted = (recall + no recall)
    / 2, the figure train_joint.py selects checkpoints by."""
    preds, gts, types = _mc_llava_lists(data)
    hit = [float(p == g) for p, g in zip(preds, gts, strict=True)]
    groups = {}
    for t in ("si_sq", "mi_sq", "mi_mq"):
        groups[f"accuracy {t}"] = _mean([h for h, k in zip(hit, types, strict=True) if k == t])
        groups[f"recall {t}"] = _mean([h for h, k, g in zip(hit, types, gts, strict=True) if k == t and g == "Yes"])
        groups[f"no recall {t}"] = _mean([h for h, k, g in zip(hit, types, gts, strict=True) if k == t and g == "No"])
    recall = _mean([h for h, g in zip(hit, gts, strict=True) if g == "Yes"])
    no_recall = _mean([h for h, g in zip(hit, gts, strict=True) if g == "No"])
    return {"accuracy": _mean(hit), "recall": recall, "no_recall": no_recall, "weighted": (recall + no_recall) / 2,
            "items": len(hit), "groups": groups}


def score_mc_llava_choice(data: Any) -> dict[str, Any]:
    """eval.py `analyze_choice` (modes choice and vg): exact string equality, e.g. "A." is not "A"; accuracy per
    si_sq / mi_sq / mi_mq and in total."""
    preds, gts, types = _mc_llava_lists(data)
    hit = [float(p == g) for p, g in zip(preds, gts, strict=True)]
    return {"accuracy": _mean(hit), "items": len(hit),
            "groups": {f"accuracy {t}": v for t, v in _by_type(types, hit, ("si_sq", "mi_sq", "mi_mq")).items()}}


def score_mc_llava_text(data: Any) -> dict[str, Any]:
    """eval.py `analyze_text_choice` (mode text): exact string equality; accuracy for single-concept (s) and
    multi-concept (m) questions and in total."""
    preds, gts, types = _mc_llava_lists(data)
    hit = [float(p == g) for p, g in zip(preds, gts, strict=True)]
    return {"accuracy": _mean(hit), "items": len(hit),
            "groups": {f"accuracy {t}": v for t, v in _by_type(types, hit, ("s", "m")).items()}}


def score_mc_llava_vqa(data: Any) -> dict[str, Any]:
    """eval.py `analyze_vqa` (mode vqa): the mean character-level BLEU (`bleu_chars`) per type and in total."""
    preds, gts, types = _mc_llava_lists(data)
    if not all(isinstance(g, str) for g in gts):
        raise PredictionFormatError("MC-LLaVA VQA ground truths must be strings")
    scores = [bleu_chars(g, p) for p, g in zip(preds, gts, strict=True)]
    return {"bleu": _mean(scores), "items": len(scores),
            "groups": {f"bleu {t}": v for t, v in _by_type(types, scores, ("si_sq", "mi_sq", "mi_mq")).items()}}


def score_mc_llava_caption(data: Any) -> dict[str, Any]:
    """eval.py `analyze_caption` (mode caption): single-concept images (si) count 1 when the gold `<name>` is a
    substring of the caption (case-sensitive); multi-concept images (mi) count the share of their gold names
    (bare, from position.json) that are substrings. Recall per type and in total (the sum over all images)."""
    preds, gts, types = _mc_llava_lists(data)
    counts = []
    for i, (p, g, t) in enumerate(zip(preds, gts, types, strict=True)):
        if t == "si" and isinstance(g, str):
            counts.append(float(g in p))
        elif t == "mi" and isinstance(g, list) and all(isinstance(w, str) for w in g):
            counts.append(sum(w in p for w in g) / len(g) if g else 0.0)
        elif t in ("si", "mi"):
            raise PredictionFormatError(f"item {i}: a {t} ground truth must be a "
                                        f"{'name' if t == 'si' else 'list of names'}, got {g!r}")
        else:
            counts.append(0.0)  # eval.py counts another type in the total's denominator only
    return {"recall": _mean(counts), "items": len(counts),
            "groups": {f"recall {t}": v for t, v in _by_type(types, counts, ("si", "mi")).items()}}


def parse_mc_llava_log(text: str) -> dict[str, list[Any]]:
    """The four lists from the printout of MC-LLaVA's eval.py (each printed as a Python list on the line after its
    title), read with `ast.literal_eval` (literals only, never code)."""
    import ast

    lines = text.splitlines()
    out: dict[str, list[Any]] = {}
    for key, title in MC_LLAVA_LISTS.items():
        at = next((i for i, line in enumerate(lines) if line.strip() == title), None)
        if at is None or at + 1 >= len(lines):
            continue
        try:
            value = ast.literal_eval(lines[at + 1].strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise PredictionFormatError(f"the list after {title!r} is not a Python literal ({type(e).__name__})") from e
        if not isinstance(value, list):
            raise PredictionFormatError(f"expected a list after {title!r}")
        out[key] = value
    if not out:
        raise PredictionFormatError("no MC-LLaVA printout found (expected the lines 'Predictions:', 'Ground truths:' "
                                    "and 'Conversation types:', each followed by a list)")
    return out


def assemble_mc_llava(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Our answered MC-LLaVA items as the four lists eval.py prints."""
    return {"queries": [r["query"] for r in rows], "predictions": [r["prediction"] for r in rows],
            "ground_truths": [r["ground_truth"] for r in rows], "conversation_types": [r["type"] for r in rows]}


def format_repic(name: str, m: dict[str, Any]) -> str:
    """The line RePIC's scorers print."""
    return f"file: {name:<60}  metric (P/R/F1): {m['precision'] * 100:5.1f} / {m['recall'] * 100:5.1f} / " \
           f"{m['f1'] * 100:5.1f}"


def read_predictions(path: str | Path) -> Any:
    """A prediction file: JSON (any peer), CSV (MMPB's table exported from its xlsx: one object per row), or the
    printout of MC-LLaVA's eval.py (`.log` / `.txt`)."""
    from mmpersona.safe_io import UnsafeInputError, parse_json, read_limited

    path = Path(path)
    try:
        data = read_limited(path, 1 << 30, "prediction file")
        if path.suffix.lower() in (".log", ".txt"):  # MC-LLaVA's eval.py printout
            try:
                return parse_mc_llava_log(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise PredictionFormatError(f"{str(path)!r} is not UTF-8 text") from e
        if path.suffix.lower() == ".csv":
            return csv_rows(data, path)
        return parse_json(data, repr(str(path)))
    except UnsafeInputError as e:
        raise PredictionFormatError(str(e)) from e


def csv_rows(data: bytes, path: Path) -> list[dict[str, str]]:
    """A UTF-8 CSV table (a BOM allowed, as Excel writes one) as one object per row."""
    import csv
    import io

    try:
        return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise PredictionFormatError(f"{str(path)!r} is not a readable UTF-8 CSV file ({e})") from e


SCORERS = {
    "rap-qa": score_rap_qa,
    "yollava-recognition": score_yollava_recognition,
    "repic-single": lambda rows: score_repic_captions(rows, "single"),
    "repic-2": lambda rows: score_repic_captions(rows, "2"),
    "repic-4": lambda rows: score_repic_captions(rows, "4"),
    "mmpb": score_mmpb,
    "mc-llava-rec": score_mc_llava_rec,
    "mc-llava-choice": score_mc_llava_choice,
    "mc-llava-text": score_mc_llava_text,
    "mc-llava-vqa": score_mc_llava_vqa,
    "mc-llava-caption": score_mc_llava_caption,
}

#: how a protocol's answered rows become the peer's file (the default: the list of rows itself)
ASSEMBLE = {name: assemble_mc_llava for name in SCORERS if name.startswith("mc-llava")}


def score_file(fmt: str, rows: Any) -> dict[str, Any]:
    """Score another system's released outputs in that system's own format (one of `SCORERS`)."""
    if fmt not in SCORERS:
        raise PredictionFormatError(f"unknown prediction format {fmt!r}; valid: {', '.join(SCORERS)}")
    return SCORERS[fmt](rows)
