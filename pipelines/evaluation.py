"""Evaluation of personalized answering with the published protocols, on a dataset folder.

Dataset layout (one folder):

    concepts/<name>/*.png     reference images, registered for the evaluation user (skipped with --use-db)
    concepts.json             optional {"<name>": {"category": "...", "info": "..."}}
    test/<name>/*.png         held-out images showing concept <name>
    test/negatives/*.png      images showing none of the concepts (optional)
    questions.json            optional {"mcqa": [...], "caption": [...]}; see below

Protocols:
- recognition (Yo'LLaVA): for every concept and every test image, "Is <name> in this image? Answer yes or no."
  Positive accuracy over images of that concept, negative accuracy over all others, weighted = their mean.
- mcqa: items {"image", "question", "options": {"A": "...", ...}, "answer": "A"}: accuracy of the chosen letter.
- caption (MyVLM / RAP): items {"image", "concepts": ["name", ...]} (default: every test image with its folder's
  concept): "Describe this image." and concept recall / precision / F1 of the handles or names in the caption.
- mmpb: recognition asked after `k` unrelated filler turns in the same chat (preference/recall over turns).

The answering model is a function `(image, question, history) -> str`, so the metrics are tested on fixtures
with known outputs; `pipeline_answerer` makes one from a `PersonalizedVLMPipeline`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mmpersona.errors import MmpersonaError

from .calibrate import images_in

PROTOCOLS = ("recognition", "mcqa", "caption", "mmpb")
RECOGNITION_QUESTION = "Is <{name}> in this image? Answer yes or no."
CAPTION_QUESTION = "Describe this image."
FILLERS = ["What colours do you see?", "Is it day or night?", "Describe the background briefly.",
           "How many objects are there?", "Is this photo indoors or outdoors?"]

Answerer = Callable[[Any, str, list], str]


@dataclass
class Dataset:
    root: Path
    concepts: dict[str, list[Path]]  # reference images
    meta: dict[str, dict[str, str]]
    tests: dict[str, list[Path]]  # held-out images per concept
    negatives: list[Path]
    questions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def load_dataset(root: str | Path) -> Dataset:
    """Read a dataset folder (layout in the module docs), with clear errors for what is missing or malformed."""
    root = Path(root)
    if not (root / "test").is_dir():
        raise MmpersonaError(f"{str(root)!r}: an evaluation dataset needs a test/ folder (see `mmpersona eval run --help`)")
    concepts = {p.name: images_in(p) for p in sorted((root / "concepts").iterdir()) if p.is_dir()} \
        if (root / "concepts").is_dir() else {}
    tests = {p.name: images_in(p) for p in sorted((root / "test").iterdir()) if p.is_dir() and p.name != "negatives"}
    negatives = images_in(root / "test" / "negatives") if (root / "test" / "negatives").is_dir() else []
    meta, questions = {}, {}
    for name, target in (("concepts.json", "meta"), ("questions.json", "questions")):
        f = root / name
        if f.is_file():
            try:
                value = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise MmpersonaError(f"{str(f)!r} is not valid JSON ({e})") from e
            if not isinstance(value, dict):
                raise MmpersonaError(f"{str(f)!r} must hold a JSON object")
            if target == "meta":
                meta = value
            else:
                questions = value
    return Dataset(root, concepts, meta, tests, negatives, questions)


# ------------------------------------------------------------------------------------------ parsing answers


def parse_yes_no(answer: str) -> bool | None:
    """True for yes, False for no, None when the answer says neither (counted as wrong)."""
    words = re.findall(r"[a-z]+", answer.lower())
    for w in words[:5]:
        if w in {"yes", "yeah", "yep", "correct", "true"}:
            return True
        if w in {"no", "nope", "not", "false"}:
            return False
    return None


def parse_choice(answer: str, options: Sequence[str]) -> str | None:
    """The option letter an answer picks: 'B', '(B)', 'B.' or 'Answer: B'; None if none or several."""
    letters = [o.upper() for o in options]
    found = re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", answer.strip()[:40])
    picked = [c for c in found if c in letters]
    return picked[0] if picked and len(set(picked)) == 1 else None


def mentioned(caption: str, names: Sequence[str], aliases: dict[str, Sequence[str]] | None = None) -> set[str]:
    """Which concept names a caption mentions, as `<name>` or as a whole word (aliases count too)."""
    text = caption.lower()
    out = set()
    for name in names:
        forms = [name, *(aliases or {}).get(name, [])]
        if any(f"<{f.lower()}>" in text or re.search(rf"(?<!\w){re.escape(f.lower())}(?!\w)", text) for f in forms):
            out.add(name)
    return out


# ------------------------------------------------------------------------------------------ protocols


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def recognition(answer: Answerer, data: Dataset, *, fillers: int = 0) -> dict[str, Any]:
    """Positive, negative and weighted accuracy per concept and overall (`fillers` > 0: MMPB-style)."""
    per: dict[str, Any] = {}
    totals = {"pos_ok": 0, "pos": 0, "neg_ok": 0, "neg": 0}
    all_images = [(c, p) for c, ps in data.tests.items() for p in ps] + [(None, p) for p in data.negatives]
    for name in data.tests:
        counts = {"pos_ok": 0, "pos": 0, "neg_ok": 0, "neg": 0}
        for owner, image in all_images:
            history: list = []
            for filler in FILLERS[:fillers] if fillers else []:
                history.append((filler, answer(image, filler, list(history))))
            said = parse_yes_no(answer(image, RECOGNITION_QUESTION.format(name=name), list(history)))
            if owner == name:
                counts["pos"] += 1
                counts["pos_ok"] += said is True
            else:
                counts["neg"] += 1
                counts["neg_ok"] += said is False
        per[name] = _accuracies(counts)
        for key in totals:
            totals[key] += counts[key]
    return {"per_concept": per, "overall": _accuracies(totals)}


def _accuracies(c: dict[str, int]) -> dict[str, Any]:
    pos, neg = _ratio(c["pos_ok"], c["pos"]), _ratio(c["neg_ok"], c["neg"])
    parts = [x for x in (pos, neg) if x is not None]
    return {"positive_accuracy": pos, "negative_accuracy": neg,
            "weighted_accuracy": sum(parts) / len(parts) if parts else None,
            "positives": c["pos"], "negatives": c["neg"]}


def mcqa(answer: Answerer, data: Dataset) -> dict[str, Any]:
    items = data.questions.get("mcqa", [])
    per: dict[str, dict[str, int]] = {}
    correct = 0
    for i, item in enumerate(items):
        try:
            image, question, options, gold = (data.root / item["image"], item["question"], item["options"],
                                              str(item["answer"]).upper())
        except (KeyError, TypeError) as e:
            raise MmpersonaError(f"questions.json mcqa[{i}] needs image, question, options and answer") from e
        prompt = question + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items()) + "\nAnswer with the letter."
        ok = parse_choice(answer(image, prompt, []), list(options)) == gold
        correct += ok
        stats = per.setdefault(item.get("concept", "-"), {"correct": 0, "total": 0})
        stats["correct"] += ok
        stats["total"] += 1
    return {"per_concept": {k: {**v, "accuracy": _ratio(v["correct"], v["total"])} for k, v in per.items()},
            "overall": {"accuracy": _ratio(correct, len(items)), "total": len(items)}}


def caption(answer: Answerer, data: Dataset, aliases: dict[str, Sequence[str]] | None = None) -> dict[str, Any]:
    items = data.questions.get("caption") or [{"image": str(p.relative_to(data.root)), "concepts": [name]}
                                              for name, ps in data.tests.items() for p in ps]
    items += [{"image": str(p.relative_to(data.root)), "concepts": []} for p in data.negatives
              if "caption" not in data.questions]
    names = sorted(set(data.tests) | set(data.concepts))
    tp = fp = fn = 0
    per: dict[str, dict[str, int]] = {n: {"tp": 0, "fp": 0, "fn": 0} for n in names}
    for item in items:
        gold = set(item.get("concepts", []))
        said = mentioned(answer(data.root / item["image"], CAPTION_QUESTION, []), names, aliases)
        for n in names:
            key = "tp" if n in said and n in gold else "fp" if n in said else "fn" if n in gold else None
            if key:
                per[n][key] += 1
        tp += len(said & gold)
        fp += len(said - gold)
        fn += len(gold - said)
    return {"per_concept": {n: _prf(**v) for n, v in per.items()}, "overall": _prf(tp, fp, fn)}


def _prf(tp: int, fp: int, fn: int) -> dict[str, Any]:
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    if p is None or r is None:
        f1 = None
    else:
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def evaluate(answer: Answerer, data: Dataset, protocols: Sequence[str] = PROTOCOLS, *, fillers: int = 3,
             aliases: dict[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Run the protocols; returns one JSON-ready report with per-concept and overall figures."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise MmpersonaError(f"unknown protocol {unknown[0]!r}; valid: {', '.join(PROTOCOLS)}")
    report: dict[str, Any] = {"dataset": str(data.root), "concepts": sorted(data.tests)}
    for protocol in protocols:
        if protocol == "recognition":
            report["recognition"] = recognition(answer, data)
        elif protocol == "mmpb":
            report["mmpb"] = {**recognition(answer, data, fillers=fillers), "filler_turns": fillers}
        elif protocol == "mcqa":
            report["mcqa"] = mcqa(answer, data)
        else:
            report["caption"] = caption(answer, data, aliases)
    return report


def pipeline_answerer(pipe, user: str, **generate_kwargs: Any) -> Answerer:
    """An answer function backed by a `PersonalizedVLMPipeline` (history as (question, answer) pairs)."""

    def answer(image: Any, question: str, history: list) -> str:
        turns = []
        for q, a in history:
            turns += [{"role": "user", "content": [{"type": "text", "text": q}]},
                      {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        return pipe(image, question, user=user, history=turns, **generate_kwargs).answer

    return answer


def register_concepts(db, user: str, data: Dataset) -> list[str]:
    """Register the dataset's reference concepts for `user` (existing names are kept as they are)."""
    added = []
    for name, images in data.concepts.items():
        if db.store.find(user, name) is None and images:
            meta = data.meta.get(name, {})
            db.add(user, name, images, category=meta.get("category", ""), info=meta.get("info", ""))
            added.append(name)
    return added
