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

from .scoring import PredictionFormatError, csv_rows

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
    answer_key: str = "answer"  # where a dict row takes the answer (MMPB and MC-LLaVA: "prediction")

    def answered(self, answer: str) -> Any:
        if isinstance(self.row, dict):
            return {**self.row, self.answer_key: answer}
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


def locate(root: Path, rel: Any, what: str) -> Path:
    """An image path as a peer's file names it, found under `root`: `resolve_in`'s rule first; else the longest
    tail of the path that exists under `root` (MC-LLaVA's files name images as its scripts opened them, e.g.
    `../mcdataset/two_concept/multi/A_B/0.png`). Never outside `root`."""
    if isinstance(rel, str) and rel.strip():
        try:
            path = resolve_in(root, rel, what)
            if path.is_file():
                return path
        except PredictionFormatError:
            pass
        parts = [x for x in rel.replace("\\", "/").split("/") if x not in ("", ".")]
        base = root.resolve()
        for i in range(len(parts)):
            tail = parts[i:]
            if ".." in tail:
                continue
            path = base.joinpath(*tail).resolve()
            if path.is_file() and path.is_relative_to(base):
                return path
    raise PredictionFormatError(f"{what}: image {rel!r} is not found under {str(root)!r}")


def _component(value: Any, what: str) -> str:
    """A folder or file name a peer's file gives (a concept, attribute or scenario): one path component, never a
    path (`../x`, `a/b`) that could reach outside the dataset."""
    if not isinstance(value, str) or not value.strip() or value.strip() in (".", "..") \
            or any(sep in value for sep in ("/", "\\", "\x00")):
        raise PredictionFormatError(f"{what}: {value!r} is not a plain name (no path separators)")
    return value.strip()


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


# ------------------------------------------------------------------------------------------ MC-LLaVA

MC_LLAVA_TASKS = ("recognition", "choice", "vqa", "text", "caption", "grounding")
MC_LLAVA_SINGLE_LETTER = "\nIMPORTANT: Answer the question using a single letter."
MC_LLAVA_REC = "Can you see {} in this photo? Answer the question using a single word Yes or No."
MC_LLAVA_CAPTION = ("Can you see {} in the image? Don't answer the question but remember it, and only response a "
                    "detailed caption for the image. Your caption:")


def _concept_images(folder: Path) -> list[Path]:
    return [p for p in images_in(folder) if not p.stem.endswith("_mask")] if folder.is_dir() else []


def mc_llava(root: str | Path, *, scenarios: list[str] | None = None,
             tasks: tuple[str, ...] = MC_LLAVA_TASKS) -> Benchmark:
    """MC-LLaVA's dataset (`scenarios.json`, `concept_type.json`, `<two|three>_concept/{concept/{train,test},multi}`),
    asked as its eval/eval.py asks it, scenario by scenario (`scenarios`: names like "Alex_Gloria_Marty"; default
    all), one protocol per eval.py mode:

    - recognition (mode rec): each concept asked about its own 5 test images (si_sq) and the scenario's multi images
      (mi_sq), all names at once about the multi images (mi_mq), all "Yes"; each concept asked about the other
      concepts' test images (si_sq, "No"). (eval.py's `--more_negative` draws from Python's `random` over
      `os.listdir` order, which no reader can replay; it is left out.)
    - choice / vqa: the concepts' and the scenario's `choice.json` / `vqa.json` (the code's reading: vqa.json holds
      the visual questions); a multi image's first two questions are mi_sq, the rest mi_mq; choice questions get
      eval.py's single-letter instruction.
    - text (mode text): the concepts' (s) and the scenario's (m) text-only `qa.json`.
    - caption: every test image, gold `<name>` (si), and the multi images, gold the names `position.json` places in
      that image (mi; read by image, where eval.py pairs the two lists by position).
    - grounding (mode vg): the scenario's `vqa_position.json`, single-letter answers.

    Concepts registered: each concept's `concept/train/<name>/*.png` (masks left out). Answers are scored by
    `mc-llava-<mode>` on the four lists eval.py prints (`scoring.assemble_mc_llava`)."""
    root = Path(root).resolve()  # images are matched by path: one spelling of each
    types = _json(root / "concept_type.json", "concept_type.json") if (root / "concept_type.json").is_file() else None
    if not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values()):
        raise PredictionFormatError(f"{str(root)!r}: an MC-LLaVA dataset has concept_type.json "
                                    "({concept: two_concept | three_concept})")
    unknown = [t for t in tasks if t not in MC_LLAVA_TASKS]
    if unknown:
        raise PredictionFormatError(f"unknown MC-LLaVA task {unknown[0]!r}; valid: {', '.join(MC_LLAVA_TASKS)}")
    if scenarios is None:
        listed = _json(root / "scenarios.json", "scenarios.json") if (root / "scenarios.json").is_file() else None
        if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
            raise PredictionFormatError(f"{str(root)!r}: scenarios.json must list scenario names")
        scenarios = listed
    bench = Benchmark("mc-llava", root, [])
    seen: set[str] = set()
    scorer = {"recognition": "mc-llava-rec", "choice": "mc-llava-choice", "vqa": "mc-llava-vqa",
              "text": "mc-llava-text", "caption": "mc-llava-caption", "grounding": "mc-llava-choice"}

    def add(task: str, scenario: str, image: Path | None, query: str, gold: Any, kind: str, shown: list[str],
            asked: str | None = None) -> None:
        n = len(bench.items)
        bench.items.append(Item(_item_id("mc-llava", task, scenario, n, query), task, scorer[task], image,
                                asked or query, shown, {"query": query, "ground_truth": gold, "type": kind},
                                answer_key="prediction"))

    for scenario in scenarios:
        scenario = _component(scenario, "scenario")
        names = scenario.split("_")
        missing = [n for n in names if n not in types]
        if missing:
            raise PredictionFormatError(f"scenario {scenario!r}: {missing[0]!r} is not in concept_type.json")
        for n in names:
            _component(types[n], f"concept_type.json[{n!r}]")
        case = root / types[names[0]]
        multi = case / "multi" / scenario
        if not multi.is_dir():
            raise PredictionFormatError(f"scenario {scenario!r}: no folder {str(multi)!r}")
        for name in names:
            if name not in seen:
                seen.add(name)
                bench.concepts.append(Concept(name, _concept_images(root / types[name] / "concept/train" / name)))
        test = {n: _concept_images(root / types[n] / "concept/test" / n) for n in names}
        multi_images = _concept_images(multi)
        positions = _json(multi / "position.json", "position.json") if (multi / "position.json").is_file() else {}
        in_image: dict[Path, list[str]] = {}
        if isinstance(positions, dict):
            for ref, where in positions.items():
                if isinstance(where, dict):
                    in_image[locate(multi, ref, f"{scenario} position.json")] = [k for k, v in where.items()
                                                                                 if v is not None]
        handles = [f"<{n}>" for n in names]

        def shown_in(image: Path, multi: Path = multi, in_image: dict = in_image, names: list = names) -> list[str]:
            """What the oracle injects: the concepts the image holds (position.json's, for a multi image)."""
            if image.parent == multi:
                return [n for n in in_image.get(image, names) if n in names]
            return [image.parent.name]

        if "recognition" in tasks:
            for name in names:
                for image in test[name]:
                    add("recognition", scenario, image, MC_LLAVA_REC.format(f"<{name}>"), "Yes", "si_sq", [name])
                for image in multi_images:
                    add("recognition", scenario, image, MC_LLAVA_REC.format(f"<{name}>"), "Yes", "mi_sq",
                        shown_in(image))
            for image in multi_images:
                add("recognition", scenario, image, MC_LLAVA_REC.format(" and ".join(handles)), "Yes", "mi_mq",
                    shown_in(image))
            for name in names:
                for other in names:
                    for image in test[other] if other != name else []:
                        add("recognition", scenario, image, MC_LLAVA_REC.format(f"<{name}>"), "No", "si_sq", [other])
        for task in ("choice", "vqa"):
            if task not in tasks:
                continue
            tail = MC_LLAVA_SINGLE_LETTER if task == "choice" else ""
            for name in names:
                folder = root / types[name] / "concept/test" / name
                data = _json(folder / f"{task}.json", f"{name} {task}.json")
                if not isinstance(data, dict):
                    raise PredictionFormatError(f"{str(folder / (task + '.json'))!r}: expected {{image: {{Human, AI}}}}")
                for ref, qa in data.items():
                    if not isinstance(qa, dict) or not isinstance(qa.get("Human"), str) or "AI" not in qa:
                        raise PredictionFormatError(f"{name} {task}.json[{ref!r}]: expected Human and AI")
                    add(task, scenario, locate(folder, ref, f"{name} {task}.json"), qa["Human"] + tail, qa["AI"],
                        "si_sq", [name])
            data = _json(multi / f"{task}.json", f"{scenario} {task}.json")
            if not isinstance(data, dict):
                raise PredictionFormatError(f"{str(multi / (task + '.json'))!r}: expected {{image: [{{Human, AI}}]}}")
            for ref, pairs in data.items():
                image = locate(multi, ref, f"{scenario} {task}.json")
                for i, qa in enumerate(pairs if isinstance(pairs, list) else [None]):
                    if not isinstance(qa, dict) or not isinstance(qa.get("Human"), str) or "AI" not in qa:
                        raise PredictionFormatError(f"{scenario} {task}.json[{ref!r}][{i}]: expected Human and AI")
                    add(task, scenario, image, qa["Human"] + tail, qa["AI"], "mi_sq" if i < 2 else "mi_mq",
                        shown_in(image))
        if "text" in tasks:
            sources = [(root / types[n] / "concept/test" / n / "qa.json", "s", [n]) for n in names]
            for path, kind, shown in [*sources, (multi / "qa.json", "m", names)]:
                data = _json(path, "qa.json")
                if not isinstance(data, list):
                    raise PredictionFormatError(f"{str(path)!r}: expected a list of {{question, answer}}")
                for i, qa in enumerate(data):
                    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or "answer" not in qa:
                        raise PredictionFormatError(f"{str(path)!r}[{i}]: expected question and answer")
                    add("text", scenario, None, qa["question"] + MC_LLAVA_SINGLE_LETTER, qa["answer"], kind, shown)
        if "caption" in tasks:
            query = MC_LLAVA_CAPTION.format(", ".join(handles))
            for name in names:
                for image in test[name]:
                    add("caption", scenario, image, query, f"<{name}>", "si", [name])
            for image in multi_images:
                add("caption", scenario, image, query, in_image.get(image, []), "mi", shown_in(image))
        if "grounding" in tasks and (multi / "vqa_position.json").is_file():
            data = _json(multi / "vqa_position.json", "vqa_position.json")
            for ref, pairs in (data.items() if isinstance(data, dict) else []):
                image = locate(multi, ref, f"{scenario} vqa_position.json")
                for qa in pairs if isinstance(pairs, list) else []:
                    if not isinstance(qa, dict) or not isinstance(qa.get("Human"), str) or "AI" not in qa:
                        raise PredictionFormatError(f"{scenario} vqa_position.json[{ref!r}]: expected Human and AI")
                    add("grounding", scenario, image, qa["Human"] + MC_LLAVA_SINGLE_LETTER, qa["AI"], "mi_sq",
                        shown_in(image))
    return bench


# ------------------------------------------------------------------------------------------ MMPB

MMPB_DESCRIPTIONS = ("simple", "moderate", "detailed", "super_detailed")


def mmpb(root: str | Path, *, description: str = "moderate", csv_path: str | Path | None = None) -> Benchmark:
    """MMPB in its on-disk release layout (the archives on its Hugging Face page, or what its
    `scripts/hf_to_mmpb_all.py` writes from the Parquet release): `dataset.csv` (one row per question, image paths
    relative to the root) and `<attribute>/train/<name>/*.png`, the concept's reference images.

    Each concept (`name`) is registered with its train images and, as info, its `description_<description>` and its
    `preference` (MMPB's default injection: the moderate description, then the preference). The question is asked
    as MMPB's `build_prompt` asks it ("\n{question}\n", plus "Options:" for inconsistency rows), with MMPB's
    `<sks>` written as the concept's handle. Protocols: MMPB's two categories (recognition, preference), scored
    by `mmpb` on the table with a `prediction` column."""
    root = Path(root)
    if description not in MMPB_DESCRIPTIONS:
        raise PredictionFormatError(f"unknown MMPB description {description!r}; valid: {', '.join(MMPB_DESCRIPTIONS)}")
    table = Path(csv_path) if csv_path is not None else root / "dataset.csv"
    if csv_path is None and (root.suffix == ".parquet" or (root.is_dir() and not table.is_file()
                                                             and any(root.rglob("*.parquet")))):
        root, table = mmpb_from_parquet(root)
    if not table.is_file():
        raise PredictionFormatError(f"{str(table)!r}: an MMPB dataset has dataset.csv (its on-disk release layout) "
                                    "or the Parquet files of its Hugging Face release")
    try:
        rows = csv_rows(read_limited(table, 256 << 20, "dataset.csv"), table)
    except UnsafeInputError as e:
        raise PredictionFormatError(str(e)) from e
    needed = ("index", "question", "image_path", "answer", "attribute", "category", "l2-category", "name")
    bench = Benchmark("mmpb", root, [])
    concepts: dict[str, Concept] = {}
    for i, row in enumerate(rows):
        missing = [k for k in needed if not (row.get(k) or "").strip()]
        if missing:
            raise PredictionFormatError(f"{str(table)!r} row {i + 1}: missing MMPB column {missing[0]!r}")
        name = _component(row["name"], f"row {i + 1} name")
        handle = f"<{name}>"
        if name not in concepts:
            info = " ".join(x for x in (row.get(f"description_{description}", ""), row.get("preference", "")) if x)
            attribute = _component(row["attribute"], f"row {i + 1} attribute")
            concepts[name] = Concept(name, _concept_images(root / attribute / "train" / name),
                                     info.replace("<sks>", handle).strip(), row["attribute"])
        query = f"\n{row['question']}\n"
        if row["l2-category"] == "inconsistency":
            options = {c: row[c] for c in "ABCD" if (row.get(c) or "").strip()}
            if options:
                query += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        bench.items.append(Item(_item_id("mmpb", row["index"]), row["category"], "mmpb",
                                locate(root, row["image_path"], f"row {row['index']}"),
                                query.replace("<sks>", handle), [name], dict(row), answer_key="prediction"))
    bench.concepts = list(concepts.values())
    return bench


MMPB_COLUMNS = ["index", "question", "A", "B", "C", "D", "image_path", "answer", "attribute", "category", "l2-category",
                "concept", "target", "name", "preference", "description_simple", "description_moderate",
                "description_detailed", "description_super_detailed"]


def _mmpb_answer(row: dict[str, Any]) -> str:
    """MMPB's Parquet answer code as its CSV writes it (`hf_to_mmpb_all.format_answer`): 0-3 -> A-D when the row
    has options, else 4 -> Yes, 5 -> No."""
    answer = row.get("answer")
    if answer is None:
        return ""
    if any(row.get(c) is not None for c in "ABCD"):
        return {0: "A", 1: "B", 2: "C", 3: "D"}.get(int(answer), "")
    return {4: "Yes", 5: "No"}.get(int(answer), str(answer))


def mmpb_from_parquet(source: Path, out: Path | None = None) -> tuple[Path, Path]:
    """MMPB's Hugging Face release (Parquet: images as {bytes, path} structs in `image_path` and
    `injection_image_1..5`) laid out on disk as its `scripts/hf_to_mmpb_all.py` lays it out: the images written
    once under `out` (default: the mmpersona cache, one folder per release), `<attribute>/train/<name>/<i>.png`
    from the injection images, and `dataset.csv` with the answer codes written as letters / Yes / No. Returns
    (root, dataset.csv). Needs pyarrow (`pip install "mmpersona[eval]"`)."""
    import csv
    import hashlib

    from mmpersona.paths import cache_dir
    from mmpersona.safe_io import ArchiveLimits

    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise PredictionFormatError("reading MMPB's Parquet release needs pyarrow: pip install \"mmpersona[eval]\" "
                                    "(or lay it out with MMPB's scripts/hf_to_mmpb_all.py and pass that folder)") from e
    files = [source] if source.is_file() else sorted(source.rglob("*.parquet"))
    key = hashlib.sha256("\x1f".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                      for f in files).encode()).hexdigest()[:16]
    root = out or cache_dir() / "mmpb" / key
    table = root / "dataset.csv"
    if table.is_file():
        return root, table  # laid out before
    limit = ArchiveLimits().max_member_bytes
    tmp = root / "dataset.csv.partial"
    root.mkdir(parents=True, exist_ok=True)
    done_names: set[tuple[str, str]] = set()
    counters: dict[tuple[str, ...], int] = {}

    def image_bytes(value: Any, what: str) -> bytes | None:
        data = value.get("bytes") if isinstance(value, dict) else value
        if data is None:
            return None
        if not isinstance(data, bytes) or len(data) > limit:
            raise PredictionFormatError(f"{what}: expected image bytes of at most {limit} bytes")
        return data

    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MMPB_COLUMNS)
        writer.writeheader()
        for file in files:
            try:
                batches = pq.ParquetFile(file).iter_batches(batch_size=64)
                for batch in batches:
                    for row in batch.to_pylist():
                        if not all(isinstance(row.get(k), str) and row[k].strip()
                                   for k in ("attribute", "name", "category")):
                            raise PredictionFormatError(f"{str(file)!r}: a row without attribute, name or category")
                        attribute, name = Path(row["attribute"]).name, Path(row["name"].strip()).name
                        if (attribute, name) not in done_names:
                            done_names.add((attribute, name))
                            for i in range(1, 6):
                                data = image_bytes(row.get(f"injection_image_{i}"), f"{name} injection_image_{i}")
                                if data is not None:
                                    target = root / attribute / "train" / name / f"{i - 1}.png"
                                    target.parent.mkdir(parents=True, exist_ok=True)
                                    target.write_bytes(data)
                        # the test image's place as MMPB's converter names it (only the folder matters here)
                        parts = (attribute, "test", name, Path(str(row.get("category"))).name,
                                 *([Path(row["concept"].strip()).name] if (row.get("concept") or "").strip() else []))
                        n = counters[parts] = counters.get(parts, -1) + 1
                        rel = Path(*parts) / f"{n}.png"
                        data = image_bytes(row.get("image_path"), f"row {row.get('index')} image_path")
                        if data is None:
                            raise PredictionFormatError(f"{str(file)!r}: row {row.get('index')} has no image")
                        (root / rel).parent.mkdir(parents=True, exist_ok=True)
                        (root / rel).write_bytes(data)
                        writer.writerow({**{k: "" if row.get(k) is None else str(row[k]) for k in MMPB_COLUMNS},
                                         "image_path": rel.as_posix(), "answer": _mmpb_answer(row),
                                         "name": name})
            except (OSError, ValueError, TypeError) as e:
                if isinstance(e, PredictionFormatError):
                    raise
                raise PredictionFormatError(f"{str(file)!r} is not a readable MMPB Parquet file ({e})") from e
    tmp.replace(table)
    return root, table


# ------------------------------------------------------------------------------------------ MyVLM


def myvlm(root: str | Path, *, database: str | Path | None = None, references: int = 1) -> Benchmark:
    """MyVLM's captioning data (`data_root/<concept>/{*.jpg, captions.json}`): each concept registered with its
    first `references` images (by name), captions asked about the rest with RePIC's prompts, in RAP's caption
    output format ([image, ["<name>"], caption, question]) and scored by `repic-single`, as RePIC scores MyVLM's
    concepts (MyVLM itself has no caption metric). `database`: a RAP database.json for the concepts' info and
    category (RAP's and RePIC's MyVLM databases)."""
    root = Path(root)
    if references < 1:
        raise PredictionFormatError(f"references must be at least 1, got {references}")
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and (p / "captions.json").is_file()] \
        if root.is_dir() else []
    if not folders:
        raise PredictionFormatError(f"{str(root)!r}: MyVLM's data root holds <concept>/ folders with captions.json")
    meta = _rap_info(database)
    bench = Benchmark("myvlm", root, [])
    n = 0
    for folder in folders:
        images = images_in(folder)
        if len(images) <= references:
            raise PredictionFormatError(f"{str(folder)!r}: {len(images)} image(s), none left to ask about after "
                                        f"{references} reference(s)")
        bench.concepts.append(Concept(folder.name, images[:references], **meta.get(folder.name, {})))
        for image in images[references:]:
            prompt = REPIC_CAPTION_PROMPTS[n % len(REPIC_CAPTION_PROMPTS)]
            rel = f"{root.name}/{folder.name}/{image.name}"
            bench.items.append(Item(_item_id("myvlm", rel), "caption-1", "repic-single", image, prompt,
                                    [folder.name], [rel, [f"<{folder.name}>"], prompt]))
            n += 1
    return bench
