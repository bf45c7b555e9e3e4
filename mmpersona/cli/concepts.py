"""`mmpersona concepts`: the concept database (and `erase-user`, which removes all of a user's data)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import MmpersonaError
from .settings import emit, open_db, settings

app = typer.Typer(help="The concept database: your concepts, their images and retrieval.", no_args_is_help=True)


def concept_line(c) -> str:
    extra = f" aka {', '.join('<' + a + '>' for a in c.aliases)}" if c.aliases else ""
    info = (c.info[:60] + "...") if len(c.info) > 60 else c.info
    return f"{c.handle:<20} {c.category or '-':<12} {len(c.images)} image(s){extra}  {info}"


@app.command("add")
def concepts_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The concept's handle, e.g. '<bo>' or bo."),
    image: list[Path] = typer.Option(..., "--image", help="A reference image (repeatable)."),
    category: str = typer.Option("", "--category", help="e.g. dog, person, mug."),
    info: str = typer.Option("", "--info", help="What the model should know about it."),
    alias: Optional[list[str]] = typer.Option(None, "--alias", help="Another handle for it (repeatable)."),
    box: Optional[str] = typer.Option(None, "--box", help="X0,Y0,X1,Y1: only this region of the one --image "
                                                          "(as a chat's concept proposal gives it)."),
) -> None:
    """Register a concept with its reference images (embedded once, stored by content hash)."""
    s = settings(ctx)
    with open_db(s) as db:
        if box is not None:
            from pipelines.introductions import accept

            from ..images import load_image

            if len(image) != 1:
                raise MmpersonaError("--box is a region of one photo: give exactly one --image")
            try:
                region = [int(v) for v in box.split(",")]
            except ValueError:
                raise MmpersonaError(f"--box is X0,Y0,X1,Y1 in pixels, got {box!r}") from None
            c = accept(db, s.user, {"name": name, "category": category, "info": info, "box": region,
                                    "aliases": alias or []}, load_image(image[0]))
        else:
            c = db.add(s.user, name, image, category=category, info=info, aliases=alias or [])
    emit(s, c.to_dict(), f"added {concept_line(c)}")


@app.command("list")
def concepts_list(
    ctx: typer.Context,
    category: Optional[str] = typer.Option(None, "--category"),
    limit: int = typer.Option(100, "--limit", min=0),
    offset: int = typer.Option(0, "--offset", min=0),
) -> None:
    """The user's concepts, by name."""
    s = settings(ctx)
    with open_db(s) as db:
        items = db.list(s.user, category=category, limit=limit, offset=offset)
        total = db.store.count(s.user)
    emit(s, {"user": s.user, "total": total, "concepts": [c.to_dict() for c in items]},
         "\n".join([concept_line(c) for c in items] + [f"{len(items)} of {total} concept(s) of {s.user!r}"]))


@app.command("show")
def concepts_show(ctx: typer.Context, name: str = typer.Argument(..., help="Name, alias or id.")) -> None:
    """Everything about one concept."""
    s = settings(ctx)
    with open_db(s) as db:
        c = db.get(s.user, name)
        tensors = db.store.list_tensors(s.user, c.id)
    data = {**c.to_dict(), "tensors": tensors}
    emit(s, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


@app.command("edit")
def concepts_edit(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Name, alias or id."),
    new_name: Optional[str] = typer.Option(None, "--name", help="Rename the concept."),
    category: Optional[str] = typer.Option(None, "--category"),
    info: Optional[str] = typer.Option(None, "--info"),
    alias: Optional[list[str]] = typer.Option(None, "--alias", help="Replace the aliases (repeatable)."),
    add_image: Optional[list[Path]] = typer.Option(None, "--add-image", help="Attach another image."),
) -> None:
    """Change a concept; the change is visible to the very next query."""
    s = settings(ctx)
    with open_db(s) as db:
        c = db.update(s.user, name, name=new_name, category=category, info=info, aliases=alias)
        if add_image:
            c = db.add_images(s.user, c.id, add_image)
    emit(s, c.to_dict(), f"updated {concept_line(c)}")


@app.command("rm")
def concepts_rm(ctx: typer.Context, name: str = typer.Argument(..., help="Name, alias or id.")) -> None:
    """Delete a concept with its embeddings, learned tensors and no-longer-used images."""
    s = settings(ctx)
    with open_db(s) as db:
        c = db.delete(s.user, name)
    emit(s, {"deleted": c.to_dict()}, f"deleted {c.handle}")


@app.command("search")
def concepts_search(
    ctx: typer.Context,
    image: Optional[Path] = typer.Option(None, "--image", help="Find concepts that look like this image."),
    text: Optional[str] = typer.Option(None, "--text", help="Find concepts matching a description."),
    k: int = typer.Option(5, "-k", min=1, help="How many concepts."),
    category: Optional[str] = typer.Option(None, "--category"),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Cosine similarity threshold."),
) -> None:
    """Retrieve the user's closest concepts (exact cosine search over their images)."""
    s = settings(ctx)
    if (image is None) == (text is None):
        raise MmpersonaError("concepts search needs exactly one of --image or --text")
    with open_db(s) as db:
        kwargs = {"k": k, "category": category, "min_score": min_score}
        hits = db.search_image(s.user, image, **kwargs) if image is not None else db.search_text(s.user, text,
                                                                                                   **kwargs)
    emit(s, {"user": s.user, "matches": [m.to_dict() for m in hits]},
         "\n".join(f"{m.score:.4f}  {concept_line(m.concept)}" for m in hits) or "no match")


@app.command("import")
def concepts_import(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="database.json (or its folder), a folder of folders, or an archive."),
    fmt: str = typer.Option(..., "--format", help="rap, folder or archive."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first bad item instead of skipping it."),
) -> None:
    """Bulk import; embeds in batches and reports what it skipped and why."""
    s = settings(ctx)
    with open_db(s) as db:
        report = db.import_concepts(s.user, path, fmt, strict=strict, progress=not s.json)
    lines = [f"imported {len(report.added)} concept(s) from {path}"]
    lines += [f"skipped {item}: {reason}" for item, reason in report.skipped]
    emit(s, report.to_dict(), "\n".join(lines))


@app.command("export")
def concepts_export(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="Archive file (.zip) or output folder."),
    fmt: str = typer.Option("archive", "--format", help="archive (lossless), rap or folder."),
) -> None:
    """Export the user's concepts."""
    s = settings(ctx)
    with open_db(s) as db:
        n = db.export_concepts(s.user, path, fmt)
    emit(s, {"exported": n, "path": str(path), "format": fmt}, f"exported {n} concept(s) to {path}")


def erase_user(
    ctx: typer.Context,
    yes: bool = typer.Option(False, "--yes", help="Confirm: this cannot be undone."),
) -> None:
    """Remove everything of --user: concepts, images, vectors, learned tensors, profile, artefacts, settings, memory."""
    s = settings(ctx)
    if not yes:
        raise typer.BadParameter(f"erasing all data of user {s.user!r} cannot be undone: add --yes", param_hint="--yes")
    with open_db(s) as db:
        n = db.erase_user(s.user)
    emit(s, {"user": s.user, "concepts_removed": n}, f"erased user {s.user!r} ({n} concept(s) and all other data)")


@app.command("migrate")
def concepts_migrate(
    ctx: typer.Context,
    source: str = typer.Option(..., "--from", help="Source database: a file path or postgresql:// URL."),
    target: str = typer.Option(..., "--to", help="Target database: a file path or postgresql:// URL."),
    users: Optional[list[str]] = typer.Option(None, "--only-user", help="Copy only this user (repeatable); "
                                              "default: every user."),
) -> None:
    """Copy everything (concepts, images, embeddings, learned tensors, profiles) to another database.

    Resumable (run it again after an interruption: what is there is skipped) and verified per user by counts
    and a content digest."""
    from concept_db.migrate import migrate

    s = settings(ctx)
    report = migrate(source, target, owners=users, progress=not s.json)
    lines = [f"{o.owner}: copied {sum(o.copied.values())} item(s); now "
             + ", ".join(f"{v} {k}" for k, v in o.counts.items()) + " (verified)" for o in report.owners]
    emit(s, report.to_dict(), "\n".join(lines) or "nothing to copy: the source has no users")


@app.command("reindex")
def concepts_reindex(
    ctx: typer.Context,
    instance: bool = typer.Option(True, "--instance/--no-instance",
                                  help="Also the instance embedder's vectors (DINOv2; --model instance=ID)."),
    face: bool = typer.Option(False, "--face/--no-face",
                              help="Also the face vectors of person concepts (dlib; pip install \"mmpersona[face]\")."),
) -> None:
    """Compute the vectors the user's reference images lack: the embedder's (after it changed) and the instance
    embedder's (for `--instance` retrieval); vectors already stored are kept."""
    from ..instance import ensure_vectors
    from ..models import load_instance_embedder

    s = settings(ctx)
    with open_db(s) as db:
        if not db.store.has_owner(s.user):
            raise MmpersonaError(f"user {s.user!r} has no concepts in this database (check --user)")
        done = {db.embedder.name: ensure_vectors(db, s.user, db.embedder, progress=not s.json)}
        if instance:
            inst = load_instance_embedder(s.overrides.get("instance"), preset=s.preset, device=s.device,
                                          dtype=s.dtype)
            done[inst.name] = ensure_vectors(db, s.user, inst, progress=not s.json)
        if face:
            from ..models import load_face_model

            model = load_face_model(s.overrides.get("face"), preset=s.preset)
            done[model.name] = ensure_vectors(db, s.user, model, progress=not s.json)
    emit(s, {"user": s.user, "computed": done},
         "\n".join(f"{name}: {n} vector(s) computed" for name, n in done.items()))


@app.command("calibrate")
def concepts_calibrate(
    ctx: typer.Context,
    positives: Path = typer.Option(..., "--positives", help="Folder of <concept name>/ sub-folders of held-out images."),
    negatives: Path = typer.Option(..., "--negatives", help="Folder of images showing none of the concepts."),
    precision: float = typer.Option(0.9, "--precision", help="Target precision of image retrieval."),
    face: bool = typer.Option(False, "--face/--no-face", help="Also the face threshold (person concepts; dlib)."),
) -> None:
    """Pick the user's retrieval threshold (and with --face the face threshold) for a target precision, and
    store it."""
    from pipelines.calibrate import calibrate, images_in, positives_from_folder

    s = settings(ctx)
    model = None
    if face:
        from ..models import load_face_model

        model = load_face_model(s.overrides.get("face"), preset=s.preset)
    with open_db(s) as db:
        result = calibrate(db, s.user, positives_from_folder(positives), images_in(negatives),
                           target_precision=precision, face=model)
    text = (f"threshold {result.threshold:.4f}: precision {result.precision:.3f}, recall {result.recall:.3f} "
            f"on {result.positives} positive / {result.negatives} negative images")
    if not result.reached:
        text += f" (target {precision} not reachable: the user's retrieval will abstain)"
    if result.face is not None:
        f = result.face
        text += (f"\nface threshold {f['threshold']:.4f}: precision {f['precision']:.3f}, recall {f['recall']:.3f} "
                 f"on {f['faces']} face(s)")
    emit(s, result.to_dict(), text)


@app.command("learn")
def concepts_learn(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The concept to learn (name, alias or id)."),
    together: Optional[list[str]] = typer.Option(None, "--with", help="Another concept learned jointly with it "
                                                                      "(repeatable; MC-LLaVA style)."),
    negatives: Optional[Path] = typer.Option(None, "--negatives", help="Folder of images without the concept "
                                                                      "(default: the user's other concepts)."),
    mine_negatives: Optional[Path] = typer.Option(None, "--mine-negatives",
                                                  help="Folder to mine hard negatives from: its images most like "
                                                       "each concept (CLIP), near-duplicates left out."),
    generate_negatives: int = typer.Option(0, "--generate-negatives", min=0,
                                           help="Hard negatives per concept made by the text-to-image model "
                                                "(\"a photo of a <category>\"), cached."),
    n_negatives: int = typer.Option(10, "--hard-negatives", min=1, help="Mined negatives per concept."),
    held_out: int = typer.Option(1, "--held-out", min=0,
                                 help="Images per concept (and of its negatives) kept out of training, on which "
                                      "recognition accuracy is reported before and after."),
    tokens: int = typer.Option(16, "--tokens", min=1, help="Latent tokens for the concept."),
    steps: int = typer.Option(100, "--steps", min=1, help="Training steps at most (early stopping may end sooner)."),
    lr: float = typer.Option(1e-2, "--lr", help="Learning rate of the new rows."),
) -> None:
    """Learn soft tokens for a concept (Yo'LLaVA style; several jointly with --with): only the new embedding
    rows are trained and stored. Reports recognition accuracy on held-out images before and after."""
    from pipelines import negatives as hard
    from pipelines.calibrate import images_in
    from pipelines.tokens import LearnConfig, learn_concepts

    from ..models import load_t2i

    s = settings(ctx)
    names = [name, *(together or [])]
    with open_db(s) as db:
        extra: dict[str, list] = {n: [] for n in names}
        if mine_negatives is not None:
            for n in names:
                extra[n] += hard.mine(db, s.user, n, mine_negatives, n_negatives, progress=not s.json)
        if generate_negatives:
            t2i = load_t2i(s.overrides.get("t2i"), preset=s.preset, device=s.device, dtype=s.dtype, ip_adapter=False)
            for n in names:
                extra[n] += hard.generate(t2i, db.resolve(s.user, n).category, generate_negatives,
                                          steps=25 if s.preset != "tiny" else 4, progress=not s.json)
        vlm = s.vlm()
        results = learn_concepts(vlm, db, s.user, names, negatives=images_in(negatives) if negatives else None,
                                 hard_negatives={n: v for n, v in extra.items() if v} or None, held_out=held_out,
                                 config=LearnConfig(tokens=tokens, steps=steps, lr=lr), progress=not s.json)
    data = [{**r.to_dict(), "model": vlm.spec.id} for r in results]

    def line(r) -> str:
        d = r.to_dict()
        text = (f"learned {r.concept}{' with ' + ', '.join(r.together) if r.together else ''} for {vlm.spec.id}: "
                f"{r.steps} steps in {r.seconds:.1f}s, loss {d['first_loss']:.3f} -> {d['last_loss']:.3f}, "
                f"training recognition accuracy {r.accuracy}, {r.negatives} negatives")
        if r.held_out_items:
            return text + (f"; held-out recognition accuracy {r.held_out_before:.3f} -> {r.held_out_after:.3f} "
                           f"on {r.held_out_items} image(s)")
        return text + "; no held-out images (a concept needs more images than --held-out)"

    emit(s, data if len(data) > 1 else data[0], "\n".join(line(r) for r in results))
