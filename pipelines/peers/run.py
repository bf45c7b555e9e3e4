"""Run a peer benchmark with several methods side by side, score each with the peer's own rule, and report.

Per method, every item is answered (answers cached in `answers.jsonl` per (method, item, model), so an
interrupted run goes on where it stopped), the answers are written in the peer's own prediction format
(`<method>-<protocol>.json`, which the peer's own script reads), scored by `scoring.SCORERS`, and the run ends
with `report.json`, `report.md` (one row per method) and `report.png` (one group of bars per protocol).
"""

from __future__ import annotations

import json
import logging
import platform
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from mmpersona.errors import MmpersonaError

from .datasets import Benchmark, Concept
from .scoring import ASSEMBLE, SCORERS

logger = logging.getLogger(__name__)

#: the table's columns for each scorer; the last is the headline metric of the plot
COLUMNS = {"yollava-recognition": ["positive_accuracy", "negative_accuracy", "weighted_accuracy"],
           "rap-qa": ["accuracy"], "repic-single": ["precision", "recall", "f1"], "repic-2": ["precision", "recall", "f1"],
           "repic-4": ["precision", "recall", "f1"], "mmpb": ["accuracy"],
           "mc-llava-rec": ["accuracy", "recall", "no_recall", "weighted"], "mc-llava-choice": ["accuracy"],
           "mc-llava-text": ["accuracy"], "mc-llava-vqa": ["bleu"], "mc-llava-caption": ["recall"]}
HEADLINE = {scorer: columns[-1] for scorer, columns in COLUMNS.items()}


def register(db, user: str, concepts: Sequence[Concept], *, skip: Sequence[str] = ()) -> int:
    """Register concepts for `user` (one already there, or named in `skip`, is left out); returns how many."""
    added = 0
    for c in concepts:
        if c.name not in skip and c.images and db.store.find(user, c.name) is None:
            db.add(user, c.name, c.images, category=c.category, info=c.info)
            added += 1
    return added


class AnswerCache:
    """answers.jsonl: one line per (method, item id, model and generation settings) answered; read back on the
    next run."""

    def __init__(self, path: Path | None):
        self.path, self.answers = path, {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.answers[(entry["method"], entry["item"], entry["model"])] = entry["answer"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interruption

    def get(self, method: str, item: str, model: str) -> str | None:
        return self.answers.get((method, item, model))

    def put(self, method: str, item: str, model: str, answer: str) -> None:
        self.answers[(method, item, model)] = answer
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"method": method, "item": item, "model": model, "answer": answer}) + "\n")


#: the methods a benchmark run compares: `PersonalizedVLMPipeline.answer_as`'s, and the learned-token modes
#: (tokens: learned concepts only, Yo'LLaVA; hybrid: learned tokens where a concept has them, text for the rest)
METHODS = ("vanilla", "oracle", "retrieval", "tokens", "hybrid")


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """`method[:option,option=value,...]`: a method and the pipeline options of its row (`variant`'s), e.g.
    `retrieval:regions`, `retrieval:regions,assign,marks`, `retrieval:k=1,min_score=0.25`, `oracle:max_images=1`,
    `hybrid:regions`. A switch (regions, assign, boxes, marks, original, verify) alone means on."""
    from pipelines.vlm import PersonalizedVLMPipeline

    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise MmpersonaError(f"unknown method {name!r}; valid: {', '.join(METHODS)} (each may take options: "
                             "retrieval:regions,k=1)")
    options: dict[str, Any] = {}
    for part in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = part.partition("=")
        if key not in PersonalizedVLMPipeline.OPTIONS or key == "mode":
            raise MmpersonaError(f"{spec!r}: unknown option {key!r}; valid: "
                                 f"{', '.join(o for o in PersonalizedVLMPipeline.OPTIONS if o != 'mode')}")
        try:
            if key in PersonalizedVLMPipeline.FLAGS:
                if eq and value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(value)
                options[key] = not eq or value.lower() in ("1", "true", "yes", "on")
            elif key == "min_score":
                options[key] = float(value)
            else:
                options[key] = int(value)
        except ValueError as e:
            raise MmpersonaError(f"{spec!r}: option {key!r} needs "
                                 f"{'on or off' if key in PersonalizedVLMPipeline.FLAGS else 'a number'}, "
                                 f"got {value!r}") from e
    if name in ("tokens", "hybrid"):
        options["mode"] = name
    return name, options


def learn_all(pipe, user: str, bench: Benchmark, steps: int, progress: bool) -> int:
    """Learn tokens for every benchmark concept that has none yet (stored in the database); returns how many."""
    from pipelines.tokens import TENSOR_NAME, LearnConfig, learn_concept

    learned = 0
    for c in bench.concepts:
        concept = pipe.db.store.find(user, c.name)
        if concept is None or TENSOR_NAME in pipe.db.store.list_tensors(user, concept.id):
            continue
        learn_concept(pipe.vlm, pipe.db, user, c.name, config=LearnConfig(steps=steps), progress=progress)
        learned += 1
    pipe.vlm.unload_tokens()
    return learned


def run(pipe, user: str, bench: Benchmark, methods: Sequence[str], *, out: Path | None = None,
        limit: int | None = None, progress: bool = True, seed: int = 0,
        distractors: Sequence[Concept] = (), sizes: Sequence[int] | None = None,
        learn_steps: int = 40) -> dict[str, Any]:
    """Answer and score every item of `bench` with each method; writes the report files under `out`.

    With `distractors` (other concepts, e.g. another dataset's), the database size is a variable: for each of
    `sizes` (ascending; default 0 and all of them) that many distractors are registered beside the benchmark's
    concepts and every method runs again, its results labelled `method@N`."""
    import torch
    from tqdm.auto import tqdm

    from mmpersona import __version__, load_image
    from pipelines.vlm import ANSWER_METHODS

    parsed = {m: parse_method(m) for m in methods}
    runners = {m: pipe.variant(**options) if options else pipe for m, (_, options) in parsed.items()}
    learning = any(name in ("tokens", "hybrid") for name, _ in parsed.values())
    learned = learn_all(pipe, user, bench, learn_steps, progress) if learning else 0
    items = bench.items[:limit] if limit else bench.items
    if not items:
        raise MmpersonaError(f"{bench.name}: no items to evaluate")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    model = pipe.vlm.spec.id if getattr(pipe.vlm, "spec", None) is not None else str(pipe.vlm)
    # an answer is reused only for the same model, generation length and seed
    answered_by = f"{model}|max_new_tokens={pipe.max_new_tokens}|seed={seed}"
    cache = AnswerCache(out / "answers.jsonl" if out is not None else None)
    decoded: OrderedDict[Path, Any] = OrderedDict()  # items come grouped by image: decode each image once

    def image_of(path: Path | None) -> Any:
        if path is None:
            return None
        if path not in decoded:
            decoded[path] = load_image(path)
            if len(decoded) > 32:
                decoded.popitem(last=False)
        return decoded[path]

    if distractors:
        sizes = sorted(set(sizes if sizes is not None else (0, len(distractors))))
        if sizes[0] < 0 or sizes[-1] > len(distractors):
            raise MmpersonaError(f"--sizes must lie between 0 and the {len(distractors)} distractors given")
    runs = [(None, m) for m in methods] if not distractors else [(n, m) for n in sizes for m in methods]
    results: dict[str, dict[str, Any]] = {}
    concepts_in_db: dict[str, int] = {}
    registered = 0
    for size, method in runs:
        label = method if size is None else f"{method}@{size}"
        if size is not None and size > registered:
            # a distractor with a benchmark concept's name is left out: it would be ambiguous
            register(pipe.db, user, distractors[registered:size], skip={c.name for c in bench.concepts})
            registered = size
        concepts_in_db[label] = pipe.db.store.count(user)
        rows: dict[tuple[str, str], list[Any]] = {}
        for item in tqdm(items, desc=f"{bench.name} {label}", disable=not progress):
            answer = cache.get(label, item.id, answered_by)
            if answer is None:
                torch.manual_seed(seed)
                name = parsed[method][0]
                # tokens / hybrid: retrieval, in that learned-token mode
                answer = runners[method].answer_as(name if name in ANSWER_METHODS else "retrieval",
                                                   image_of(item.image), item.question, user=user,
                                                   concepts=item.concepts).answer
                cache.put(label, item.id, answered_by, answer)
            rows.setdefault((item.protocol, item.scorer), []).append(item.answered(answer))
        results[label] = {}
        for (protocol, scorer), answered in rows.items():
            written = ASSEMBLE.get(scorer, list)(answered)  # the peer's own file
            metrics = SCORERS[scorer](written)
            results[label][protocol] = {"scorer": scorer, **metrics}
            if out is not None:
                (out / f"{_file_safe(label)}-{protocol}.json").write_text(json.dumps(written, indent=1),
                                                                         encoding="utf-8")
    report = {"benchmark": bench.name, "dataset": str(bench.root), "model": model, "user": user,
              "methods": list(methods), "items": len(items), "limit": limit, "seed": seed,
              "learn_steps": learn_steps if learning else None, "concepts_learned": learned,
              "mmpersona": __version__, "python": platform.python_version(),
              "note": ("tiny random models: these numbers are noise, the run only shows the harness works"
                       if model.startswith("tiny:") else ""),
              "concepts_in_database": concepts_in_db, "results": results,
              "against_vanilla": against_vanilla(results)}
    if out is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (out / "report.md").write_text(markdown(report), encoding="utf-8")
        plot(report, out / "report.png")
    return report


def against_vanilla(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each method's headline metric minus vanilla's on the same protocol (and database size): whether concepts,
    retrieval or learned tokens did anything (Yo'LLaVA #13). Empty without a vanilla row."""
    out: dict[str, dict[str, float]] = {}
    for label, by_protocol in results.items():
        method, at, size = label.partition("@")
        base = results.get("vanilla" + (at + size if at else ""))
        if base is None or method == "vanilla":
            continue
        for protocol, entry in by_protocol.items():
            key = HEADLINE[entry["scorer"]]
            mine, theirs = entry.get(key), base.get(protocol, {}).get(key)
            if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)):
                out.setdefault(label, {})[protocol] = mine - theirs
    return out


def _file_safe(label: str) -> str:
    """A method label as a file name part: `retrieval:k=1,regions` -> `retrieval_k=1_regions`."""
    return "".join(ch if ch.isalnum() or ch in "=@.-" else "_" for ch in label)


def _fmt(v: Any) -> str:
    return f"{v * 100:.1f}" if isinstance(v, float) else "-" if v is None else str(v)


def markdown(report: dict[str, Any]) -> str:
    """One row per method, one column per (protocol, metric)."""
    protocols = sorted({p for r in report["results"].values() for p in r})
    columns = []
    for p in protocols:
        scorer = next(r[p]["scorer"] for r in report["results"].values() if p in r)
        columns += [(p, k) for k in COLUMNS[scorer]]
    lines = [f"# {report['benchmark']}: {report['model']} ({report['items']} items, mmpersona {report['mmpersona']})",
             ""]
    if report["note"]:
        lines += [f"_{report['note']}_", ""]
    lines.append("| method | " + " | ".join(f"{p} {k.replace('_', ' ')}" for p, k in columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")
    for method, r in report["results"].items():
        lines.append(f"| {method} | " + " | ".join(_fmt(r.get(p, {}).get(k)) for p, k in columns) + " |")
    deltas = report.get("against_vanilla") or {}
    if deltas:
        lines += ["", "Against vanilla (headline metric, points; > 0: the method helped):", "",
                  "| method | " + " | ".join(protocols) + " |", "|---" * (len(protocols) + 1) + "|"]
        for method, d in deltas.items():
            lines.append(f"| {method} | " + " | ".join(f"{d[p] * 100:+.1f}" if p in d else "-" for p in protocols)
                         + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars of each method's headline metric, one group per protocol (drawn with PIL: no plotting library)."""
    from PIL import Image, ImageDraw

    protocols = sorted({p for r in report["results"].values() for p in r})
    methods = list(report["results"])
    colours = [(70, 110, 200), (220, 120, 40), (60, 160, 90), (170, 60, 160), (120, 120, 120)]
    bar, gap, height, top = 26, 30, 240, 40
    width = 60 + len(protocols) * (len(methods) * bar + gap)
    img = Image.new("RGB", (max(width, 320), height + top + 60), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"{report['benchmark']} - {report['model']}", fill="black")
    base = top + height
    d.line((40, base, width, base), fill="black")
    for gi, p in enumerate(protocols):
        x0 = 50 + gi * (len(methods) * bar + gap)
        for mi, method in enumerate(methods):
            entry = report["results"][method].get(p)
            value = entry.get(HEADLINE[entry["scorer"]]) if entry else None
            if isinstance(value, float):
                h = int(value * height)
                d.rectangle((x0 + mi * bar, base - h, x0 + mi * bar + bar - 4, base), fill=colours[mi % len(colours)])
                d.text((x0 + mi * bar, base - h - 12), f"{value * 100:.0f}", fill="black")
        d.text((x0, base + 6), p, fill="black")
    for mi, method in enumerate(methods):
        d.rectangle((10 + mi * 110, base + 30, 22 + mi * 110, base + 42), fill=colours[mi % len(colours)])
        d.text((26 + mi * 110, base + 30), method, fill="black")
    img.save(path)
