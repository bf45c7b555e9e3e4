"""LCMP (Long-Context MLLM Personalization, from TAME: github.com/ronpay/TAME, `data/`), read in its published
layout and run through the toolkit's memory: `mmpersona eval bench lcmp ROOT`.

The layout: one folder per concept (`data/concept_pet/cat_1`, `data/concept_person/...`, `data/concept_obj/...`;
`data/concept/<id>` links to them), each with `profile.yaml` (its `name`), `history.yaml` (the user's turns in
order: `turn`, `log_type` knowledge or event, `user_input` with an `[IMAGE]` placeholder, `assistant_response`,
`image_id`), `easy_question.yaml` and `hard_question.yaml` (each question: `id`, `type`, `question`,
`evaluation_criteria` {`ideal_answer`, `key_points`}, four `options`, the right option's text as `answer`,
`image_id`) and `img/` (`base.*`, the concept's photo, and `{image_id}.*`). YAML is read with `safe_load`; an
image id is a plain file name (no path).

The run, per concept, as its own user (histories are per concept): the concept is registered from its base photo
under its profile's name; the history is told turn by turn through the pipeline's memory step (`pipe.remember`,
the user's auto-accept on: the chat model reads each turn; the rule extractor for the tiny models), each turn also
kept in a conversation; then each question is asked about its photo with the four options lettered, and the
answer's first letter A-D is its choice. `context`: "memory" (the memory entries the turn selects, as in a
normal chat), or "history" (also the history's last turns as chat history, as a continued kept conversation
has them: `RESUMED_TURNS`).

Scored: `choice_accuracy` (the letter of the right option; a missing letter counts as wrong and is counted in
`no_choice`; TAME's evaluator draws a random letter instead), per difficulty; and, without trusting the VLM,
`evidence_in_prompt`: the share of questions whose memory section (and chat history, with `context="history"`)
holds at least half of the right option's content words, and what that context costs in characters. `predictions.jsonl` is in TAME's evaluator's input format (`concept_id`, `question_id`,
`difficulty`, `answer`, `choice`), so `evaluator/evaluator.py` scores it as it scores TAME's own runs (its
free-text and key-point scores need its LLM judge).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpersona.errors import MmpersonaError

LETTERS = "ABCD"
_IMAGE_ID = re.compile(r"^[\w.\-]{1,200}$")
_CATEGORY = {"concept_pet": "pet", "concept_person": "person", "concept_obj": "object"}


class LcmpFormatError(MmpersonaError, ValueError):
    """An LCMP folder that does not hold what its layout says."""


@dataclass
class LcmpQuestion:
    id: int
    difficulty: str  # easy | hard
    type: str
    question: str
    options: list[str]
    answer: str  # the right option's text
    image: Path | None
    ideal_answer: str = ""

    @property
    def right(self) -> str | None:
        """The right option's letter (None: the answer is none of the options, as in one of LCMP's items)."""
        return LETTERS[self.options.index(self.answer)] if self.answer in self.options else None


@dataclass
class LcmpConcept:
    id: str
    name: str
    category: str
    photo: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # text, response, image (Path | None), kind
    questions: list[LcmpQuestion] = field(default_factory=list)


def _yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError as e:
        from mmpersona.errors import MissingDependencyError

        raise MissingDependencyError("reading LCMP needs PyYAML: pip install pyyaml") from e
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LcmpFormatError(f"{path}: {str(e).splitlines()[0]}") from e


def _image(folder: Path, image_id: Any, where: str) -> Path | None:
    if image_id in (None, ""):
        return None
    if not isinstance(image_id, str) or not _IMAGE_ID.match(image_id) or image_id.startswith("."):
        raise LcmpFormatError(f"{where}: image_id {image_id!r} is not a plain file name")
    found = sorted(p for p in (folder / "img").glob(f"{image_id}.*") if p.is_file())
    if not found:
        raise LcmpFormatError(f"{where}: no image img/{image_id}.* in {folder}")
    return found[0]


def _name(folder: Path) -> str:
    """The profile's `name` (read by line when the profile is not valid YAML: one of LCMP's is not)."""
    try:
        profile = _yaml(folder / "profile.yaml")
        if isinstance(profile, dict) and isinstance(profile.get("name"), str) and profile["name"].strip():
            return profile["name"].strip()
    except LcmpFormatError:
        pass
    m = re.search(r'^name:\s*"?([^"\n]+?)"?\s*$', (folder / "profile.yaml").read_text(encoding="utf-8"), re.M)
    if m is None:
        raise LcmpFormatError(f"{folder / 'profile.yaml'}: no name")
    return m.group(1)


def read_concept(folder: Path) -> LcmpConcept:
    folder = Path(folder)
    photos = sorted(p for p in (folder / "img").glob("base.*") if p.is_file())
    if not photos:
        raise LcmpFormatError(f"{folder}: no img/base.* photo of the concept")
    concept = LcmpConcept(folder.name, _name(folder), _CATEGORY.get(folder.resolve().parent.name, ""), photos[0])
    history = _yaml(folder / "history.yaml")
    if not isinstance(history, list):
        raise LcmpFormatError(f"{folder / 'history.yaml'} must be a list of turns")
    for i, turn in enumerate(sorted(history, key=lambda t: t.get("turn", 0) if isinstance(t, dict) else 0)):
        where = f"{folder / 'history.yaml'}[{i}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("user_input"), str):
            raise LcmpFormatError(f"{where} must be a turn with a user_input")
        concept.history.append({"text": turn["user_input"], "response": str(turn.get("assistant_response") or ""),
                                "image": _image(folder, turn.get("image_id"), where),
                                "kind": str(turn.get("log_type") or "")})
    for difficulty in ("easy", "hard"):
        path = folder / f"{difficulty}_question.yaml"
        items = _yaml(path)
        if not isinstance(items, list):
            raise LcmpFormatError(f"{path} must be a list of questions")
        for j, q in enumerate(items):
            where = f"{path}[{j}]"
            options = q.get("options") if isinstance(q, dict) else None
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(options, list) \
                    or len(options) != 4 or not all(isinstance(o, str) for o in options):
                raise LcmpFormatError(f"{where} must be a question with four options")
            criteria = q.get("evaluation_criteria") if isinstance(q.get("evaluation_criteria"), dict) else {}
            concept.questions.append(LcmpQuestion(int(q.get("id", j + 1)), difficulty, str(q.get("type") or ""),
                                                  q["question"], options, str(q.get("answer") or ""),
                                                  _image(folder, q.get("image_id"), where),
                                                  str(criteria.get("ideal_answer") or "")))
    return concept


def read_lcmp(root: str | Path) -> list[LcmpConcept]:
    """Every concept under `root` (the repository, its `data/`, or one group folder), each once (the
    `data/concept` links are followed to the same folders), by id."""
    root = Path(root)
    if not root.is_dir():
        raise LcmpFormatError(f"{root} is not a folder")
    folders = {}
    for history in sorted(root.rglob("history.yaml")):
        folder = history.parent
        folders.setdefault(folder.resolve(), folder)
    if not folders:
        raise LcmpFormatError(f"{root} holds no LCMP concept (folders with history.yaml)")
    concepts = [read_concept(f.resolve()) for f in folders.values()]
    return sorted(concepts, key=lambda c: c.id)


def _asked(q: LcmpQuestion) -> str:
    text = " ".join(q.question.replace("[IMAGE]", " ").split())
    options = "\n".join(f"{letter}. {o}" for letter, o in zip(LETTERS, q.options, strict=True))
    return f"{text}\nOptions:\n{options}\nAnswer with the letter of the right option (A, B, C or D)."


def choice_of(answer: str) -> str | None:
    """The first option letter the answer gives ("B", "(b)", "B." or "Answer: B")."""
    m = re.search(r"\b([ABCD])\b", answer or "")
    return m.group(1) if m else None


def run_lcmp(pipe: Any, root: str | Path, *, context: str = "memory", extractor: str = "model",
             limit: int | None = None, out: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Tell each concept's history and ask its questions (module docs); writes report.json, report.md and
    predictions.jsonl into `out` when given. `extractor`: "model" (the pipeline's memory step) or "verbatim"
    (each user turn kept whole as a fact about the concept: the memory layer's selection measured apart from
    extraction). `limit`: only the first N concepts."""
    from tqdm.auto import tqdm

    from concept_db.types import MAX_MEMORY_TEXT
    from mmpersona.images import load_image

    from ..memory import AUTO_ACCEPT_SETTING, words
    from ..vlm import RESUMED_TURNS, resumed_history

    if context not in ("memory", "history"):
        raise MmpersonaError(f"unknown LCMP context {context!r}; valid: memory, history")
    if extractor not in ("model", "verbatim"):
        raise MmpersonaError(f"unknown LCMP extractor {extractor!r}; valid: model, verbatim")
    concepts = read_lcmp(root)[:limit]
    db, rows = pipe.db, []
    for c in tqdm(concepts, desc="LCMP concepts", disable=not progress):
        user = f"lcmp-{c.id}"
        db.erase_user(user)
        concept = db.add(user, c.name, [c.photo], category=c.category)
        db.store.set_setting(user, AUTO_ACCEPT_SETTING, True)
        kept = db.store.start_conversation(user, f"LCMP {c.id}")
        for turn in c.history:
            said = " ".join(turn["text"].replace("[IMAGE]", " ").split())
            if extractor == "verbatim":
                db.store.add_memory(user, said[:MAX_MEMORY_TEXT], concept_id=concept.id, source="lcmp verbatim")
            else:
                pipe.remember(user, said, source=f"lcmp {turn['kind']}")
            db.store.add_turn(user, kept.id, said, turn["response"],
                              image=turn["image"].read_bytes() if turn["image"] else None)
        # as a continued kept conversation has it (`ChatSession`)
        history = resumed_history(db.store.turns(user, kept.id, last=RESUMED_TURNS)) if context == "history" else []
        for q in c.questions:
            answer = pipe(load_image(q.image) if q.image else None, _asked(q), user=user, history=history)
            system = answer.messages[0]["content"][0]["text"] if answer.messages else ""
            block = system[system.find("What the user has told you"):] if answer.memory else ""
            told = " ".join(p["text"] for m in history for p in m["content"])  # the chat history, when given
            needed = set(words(q.answer))
            held = needed & set(words(block + " " + told))
            choice = choice_of(answer.answer)
            rows.append({"concept_id": c.id, "question_id": q.id, "difficulty": q.difficulty, "type": q.type,
                         "answer": answer.answer, "choice": choice or "", "right": q.right,
                         "correct": choice is not None and choice == q.right,
                         "evidence_in_prompt": bool(needed) and len(held) >= len(needed) / 2,
                         "memory_used": len(answer.memory), "context_chars": len(block) + len(told)})
    report = _scores(rows)
    report.update(concepts=len(concepts), context=context, extractor=extractor, vlm=pipe.vlm.spec.id)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({**report, "questions": rows}, indent=1), encoding="utf-8")
        (out / "report.md").write_text(markdown(report), encoding="utf-8")
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for r in rows:  # TAME's evaluator's input
                f.write(json.dumps({k: r[k] for k in ("concept_id", "question_id", "difficulty", "answer",
                                                      "choice")}) + "\n")
    return report


def _scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def part(sel: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(sel) or 1
        return {"questions": len(sel), "choice_accuracy": round(sum(r["correct"] for r in sel) / n, 4),
                "no_choice": sum(not r["choice"] for r in sel),
                "evidence_in_prompt": round(sum(r["evidence_in_prompt"] for r in sel) / n, 4),
                "memory_entries_per_question": round(sum(r["memory_used"] for r in sel) / n, 2),
                "context_chars_per_question": round(sum(r["context_chars"] for r in sel) / n, 1)}

    return {"overall": part(rows), "easy": part([r for r in rows if r["difficulty"] == "easy"]),
            "hard": part([r for r in rows if r["difficulty"] == "hard"])}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# LCMP: {report['concepts']} concepts, context {report['context']}, extractor {report['extractor']}",
             "", f"VLM: {report['vlm']}", "",
             "| split | questions | choice accuracy | no letter | evidence in the prompt | memory entries / question "
             "| memory + history characters / question |", "|---|---|---|---|---|---|---|"]
    for split in ("overall", "easy", "hard"):
        p = report[split]
        lines.append(f"| {split} | {p['questions']} | {p['choice_accuracy']} | {p['no_choice']} | "
                     f"{p['evidence_in_prompt']} | {p['memory_entries_per_question']} | "
                     f"{p['context_chars_per_question']} |")
    return "\n".join(lines) + "\n"
