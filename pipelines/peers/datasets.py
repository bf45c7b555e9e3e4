"""Readers for the peers' evaluation sets in their published layouts (FORMATS.md says which file is which).

A reader returns a `Benchmark`: the concepts to register (name, reference images, info, category) and the
items to ask, each knowing how to write its answer into the peer's own prediction format, so that the peer's
scorer (`scoring.py`) reads what we produce exactly as it reads the peer's released outputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpersona.safe_io import UnsafeInputError, parse_json, read_limited

from ..calibrate import images_in, positives_from_folder

from .scoring import PredictionFormatError

RAP_RECOGNITION = "Is <{name}> in this image? Answer with a single word or phrase."
RAP_QA_TAIL = "Please give a single character from the options above. \n"
#: the prompts RePIC's released caption files cycle through, by item index
REPIC_CAPTION_PROMPTS = ["Give a personalized caption of this image.", "Give a caption of the image.",
                         "Can you provide a personalized caption of this photo?", "Provide a caption of the given image."]


@dataclass
class Concept:
    name: str  # bare handle
    images: list[Path]
    info: str = ""
    category: str = ""


@dataclass
class Item:
    """One question of a protocol. `scorer` names the peer rule that scores the protocol's rows."""

    id: str
    protocol: str  # recognition | visual-qa | text-qa | caption-<n>
    scorer: str
    image: Path | None
    question: str
    concepts: list[str]  # ground truth (bare names), what the oracle injects
    row: Any  # the peer's output row, with the answer left to fill in

    def answered(self, answer: str) -> Any:
        if isinstance(self.row, dict):
            return {**self.row, "answer": answer}
        return [*self.row[:2], answer, *self.row[2:]]


@dataclass
class Benchmark:
    name: str
    root: Path
    concepts: list[Concept]
    items: list[Item] = field(default_factory=list)


def _json(path: str | Path, what: str) -> Any:
    try:
        return parse_json(read_limited(path, 256 << 20, what), repr(str(path)))
    except UnsafeInputError as e:
        raise PredictionFormatError(str(e)) from e


def resolve_in(root: Path, rel: Any, what: str) -> Path:
    """A peer's relative image path (`./yollava-data/test/bo/4.png`, `yollava-data/...`, `test/bo/4.png`): from
    the root's parent when it starts with the root's own name, else from the root; never outside the root
    (the rule of RAP's database.json: `concept_io.resolve_relative`)."""
    from mmpersona.concept_io import ImportFormatError, resolve_relative

    if not isinstance(rel, str) or not rel.strip():
        raise PredictionFormatError(f"{what}: an image path must be a non-empty string, got {rel!r}")
    try:
        return resolve_relative(root, rel, what)
    except ImportFormatError as e:
        raise PredictionFormatError(f"{what}: image path {rel!r} must stay inside {str(root)!r}") from e


def _item_id(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def _rap_info(database: str | Path | None) -> dict[str, dict[str, str]]:
    """name -> {info, category} from a RAP database.json (concept_dict keyed by `<name>`)."""
    if database is None:
        return {}
    data = _json(database, "RAP database")
    if not isinstance(data, dict) or not isinstance(data.get("concept_dict"), dict):
        raise PredictionFormatError(f"{str(database)!r}: expected a RAP database.json with a 'concept_dict'")
    out = {}
    for key, entry in data["concept_dict"].items():
        if isinstance(entry, dict):
            out[key.strip("<>")] = {"info": str(entry.get("info", "")), "category": str(entry.get("category", ""))}
    return out


# ------------------------------------------------------------------------------------------ Yo'LLaVA


def yollava(root: str | Path, *, recognition: str | Path | None = None, visual_qa: str | Path | None = None,
            text_qa: str | Path | None = None, database: str | Path | None = None) -> Benchmark:
    """Yo'LLaVA's `yollava-data/` (train/<concept>/*.png registered, test/<concept>/*.png asked about), with:

    - recognition: RAP's `recognition_test.json` when given (as distributed with RAP-MLLM), else the same
      questions generated (every test image x every concept, RAP's wording, one item per pair);
    - visual_qa / text_qa: `yollava-visual-qa.json` (`options`) and `yollava-text-only-qa.json` (`option`), asked
      with RAP's VQA.py / TQA.py prompt;
    - database: a RAP database.json for the concepts' info and category (Yo'LLaVA has none of its own).
    """
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise PredictionFormatError(f"{str(root)!r}: a Yo'LLaVA dataset has train/ and test/ concept folders")
    meta = _rap_info(database)
    concepts = [Concept(p.name, images_in(p), **meta.get(p.name, {}))
                for p in sorted((root / "train").iterdir()) if p.is_dir()]
    names = [c.name for c in concepts]
    bench = Benchmark("yollava", root, concepts)
    if recognition is not None:
        rows = _json(recognition, "recognition_test.json")
        if not isinstance(rows, list):
            raise PredictionFormatError(f"{str(recognition)!r}: expected a list of recognition items")
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("image", "question", "concept")) \
                    or not isinstance(row.get("correct_answer"), bool):
                raise PredictionFormatError(f"{str(recognition)!r}[{i}]: expected image, question, concept and a "
                                            "boolean correct_answer")
            question = row["question"].replace("<image>\n", "").replace("<image>", "").strip()
            image = resolve_in(root, row["image"], f"item {i}")
            # the oracle injects the concept the image shows (its test folder), whatever is asked about
            shown = [image.parent.name] if image.parent.name in names else []
            bench.items.append(Item(_item_id("recognition", i, row["image"], row["concept"]), "recognition",
                                    "yollava-recognition", image, question, shown, dict(row)))
    else:
        for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
            for image in images_in(folder):
                rel = f"{root.name}/test/{folder.name}/{image.name}"
                for name in names:
                    row = {"image": rel, "question": "<image>\n" + RAP_RECOGNITION.format(name=name), "concept": name,
                           "type": "positive" if name == folder.name else "negative",
                           "correct_answer": name == folder.name}
                    bench.items.append(Item(_item_id("recognition", rel, name), "recognition", "yollava-recognition",
                                            image, RAP_RECOGNITION.format(name=name),
                                            [folder.name] if folder.name in names else [], row))
    for path, protocol, key in ((visual_qa, "visual-qa", "options"), (text_qa, "text-qa", "option")):
        if path is None:
            continue
        data = _json(path, protocol)
        if not isinstance(data, dict):
            raise PredictionFormatError(f"{str(path)!r}: expected {{concept: {{image or id: question}}}}")
        for name, entries in data.items():
            if not isinstance(entries, dict):
                raise PredictionFormatError(f"{str(path)!r}[{name!r}]: expected an object of questions")
            for ref, q in entries.items():
                opts = q.get(key) if isinstance(q, dict) else None
                if not isinstance(opts, dict) or not isinstance(q.get("question"), str) \
                        or not isinstance(q.get("correct_answer"), str):
                    raise PredictionFormatError(f"{str(path)!r}[{name!r}][{ref!r}]: expected question, {key} and "
                                                "correct_answer")
                # Yo'LLaVA writes <sks>, RAP's copy sks: both become the handle (RAP's own replace would turn
                # <sks> into <<name>>)
                text = q["question"].replace("<sks>", f"<{name}>").replace("sks", f"<{name}>") \
                    .replace(f"<<{name}>>", f"<{name}>")
                prompt = "Question: " + text + "\nOptions:\n" + "".join(f"{k}. {v}\n" for k, v in opts.items()) \
                    + RAP_QA_TAIL
                image = resolve_in(root, ref, f"{protocol} {name}") if protocol == "visual-qa" else None
                bench.items.append(Item(_item_id(protocol, name, ref), protocol, "rap-qa", image, prompt, [name],
                                        {"img_path": ref, "question": prompt, "option": opts,
                                         "correct_answer": q["correct_answer"]}))
    return bench


# ------------------------------------------------------------------------------------------ RePIC


def repic(root: str | Path, queries: str | Path, database: str | Path) -> Benchmark:
    """RePIC's multi-concept captioning: a query template file (`data/query_tot/*_query_templates.json`:
    image -> gold names, or -> a list of gold-name lists) and its database (`database_mod.json`, RAP's format,
    image paths relative to the RePIC folder `root`). One caption item per gold list, RePIC's prompts cycled."""
    root = Path(root)
    data = _json(queries, "query templates")
    if not isinstance(data, dict):
        raise PredictionFormatError(f"{str(queries)!r}: expected {{image: [names]}} or {{image: [[names], ...]}}")
    db = _json(database, "RePIC database")
    if not isinstance(db, dict) or not isinstance(db.get("concept_dict"), dict):
        raise PredictionFormatError(f"{str(database)!r}: expected a RAP-format database with a 'concept_dict'")
    concepts = []
    for key, entry in db["concept_dict"].items():
        if not isinstance(entry, dict):
            raise PredictionFormatError(f"{str(database)!r}[{key!r}]: expected an object")
        images = entry.get("image", [])
        images = [images] if isinstance(images, str) else images
        concepts.append(Concept(key.strip("<>"), [resolve_in(root, p, key) for p in images],
                                str(entry.get("info", "")), str(entry.get("category", ""))))
    bench = Benchmark("repic", root, concepts)
    n = 0
    for image, gold in data.items():
        lists = gold if gold and all(isinstance(g, list) for g in gold) else [gold]
        for names in lists:
            if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
                raise PredictionFormatError(f"{str(queries)!r}[{image!r}]: gold concepts must be lists of names")
            prompt = REPIC_CAPTION_PROMPTS[n % len(REPIC_CAPTION_PROMPTS)]
            size = len(names)
            scorer = {1: "repic-single", 2: "repic-2"}.get(size, "repic-4")
            bench.items.append(Item(_item_id("caption", image, names, n), f"caption-{size}", scorer,
                                    resolve_in(root, image, "query"), prompt, [x.strip("<>") for x in names],
                                    [image, names, prompt]))
            n += 1
    return bench


def concept_folders(root: str | Path) -> list[Concept]:
    """Concepts from a folder of per-concept folders of images (Yo'LLaVA's train/ layout, or any such folder):
    the distractors of `--distractors`."""
    return [Concept(name, images) for name, images in positives_from_folder(root).items() if images]
