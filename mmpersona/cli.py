"""The `mmpersona` command line. Library code logs; only this module prints.

Global options come before the command: `mmpersona --preset tiny --json models list`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import MmpersonaError

app = typer.Typer(
    name="mmpersona",
    help="Multimodal personalization: concept databases for VLMs, preference profiles for text-to-image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The model registry: which model serves each role.", no_args_is_help=True)
app.add_typer(models_app, name="models")
profile_app = typer.Typer(help="Your text-to-image preference profile: likes, dislikes, choices, attributes.",
                          no_args_is_help=True)
app.add_typer(profile_app, name="profile")
concepts_app = typer.Typer(help="The concept database: your concepts, their images and retrieval.",
                           no_args_is_help=True)
app.add_typer(concepts_app, name="concepts")
adapter_app = typer.Typer(help="The preference adapter: trained once across many users, it personalizes "
                                "generation from a new user's few choices (`generate --strategies preference`).",
                           no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")
keys_app = typer.Typer(help="API keys for `mmpersona serve`: each belongs to one user (stored hashed).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")
eval_app = typer.Typer(help="Evaluation: run the protocols on a dataset, or score released outputs as the peers do.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@dataclass
class Settings:
    """Global options, shared by every command."""

    db: str
    user: str
    preset: str
    device: str
    dtype: Optional[str]
    json: bool
    overrides: dict[str, str] = field(default_factory=dict)
    max_visual_tokens: Optional[int] = 1024

    def vlm(self):
        """The `vlm` role's model as these options ask."""
        from .models import load_vlm

        return load_vlm(self.overrides.get("vlm"), preset=self.preset, device=self.device, dtype=self.dtype,
                        max_visual_tokens=self.max_visual_tokens)


def settings(ctx: typer.Context) -> Settings:
    return ctx.find_root().obj


def emit(s: Settings, data: Any, text: str) -> None:
    """Print `data` as one JSON document with `--json`, else the human `text`."""
    if s.json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(text)


@app.callback()
def main_options(
    ctx: typer.Context,
    db: Optional[str] = typer.Option(None, "--db", envvar="MMPERSONA_DB",
                                     help="Concept database: a file path, or postgresql://user:password@host/dbname "
                                          "(default: a file in the user data dir; env MMPERSONA_DB)."),
    user: str = typer.Option(os.environ.get("MMPERSONA_USER", "default"), "--user",
                             help="Whose data to use (env MMPERSONA_USER)."),
    preset: str = typer.Option(os.environ.get("MMPERSONA_PRESET", "default"), "--preset",
                               help="Model preset: 'default' (real models) or 'tiny' (offline test models)."),
    model: Optional[list[str]] = typer.Option(None, "--model", metavar="ROLE=ID",
                                              help="Use a hub id or local directory for one role (repeatable)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
                                        help="float32, float16 or bfloat16 (default: float32 on CPU, bf16/fp16 on GPU)."),
    max_visual_tokens: int = typer.Option(1024, "--max-visual-tokens", min=0,
                                          help="Visual tokens one image may cost on dynamic-resolution VLMs "
                                               "(Qwen2/2.5-VL); 0: the checkpoint's own limit."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details and library output to stderr."),
) -> None:
    from .models import parse_overrides
    from .models.registry import check_preset
    from .paths import default_db_path

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # the CLI's output is its own; library progress bars and warnings only under -v
        from .libraries import quiet_libraries

        quiet_libraries()
    check_preset(preset)
    ctx.obj = Settings(db=db or str(default_db_path()), user=user, preset=preset, device=device, dtype=dtype,
                       json=as_json, overrides=parse_overrides(model), max_visual_tokens=max_visual_tokens or None)


@models_app.command("list")
def models_list(ctx: typer.Context) -> None:
    """Each role, the model that serves it, and whether it is available locally (no download, no build)."""
    from .models import ROLES, TINY_MODELS, model_status, resolve

    s = settings(ctx)
    rows = []
    for role in ROLES:
        spec = resolve(role, s.overrides.get(role), preset=s.preset)
        st = model_status(spec)
        rows.append({"role": role, "id": spec.id, "source": st.source, "available": st.available,
                     "location": st.location,
                     "ip_adapter": None if spec.ip_adapter is None else
                     f"{spec.ip_adapter.id}/{spec.ip_adapter.subfolder}/{spec.ip_adapter.weight_name}"})
    lines = [f"preset: {s.preset}", f"{'role':<9} {'available':<10} {'source':<6} id"]
    for r in rows:
        extra = f"  (+ IP-Adapter {r['ip_adapter']})" if r["ip_adapter"] else ""
        lines.append(f"{r['role']:<9} {'yes' if r['available'] else 'no':<10} {r['source']:<6} {r['id']}{extra}")
    lines.append("tiny models: " + ", ".join(m.id for m in TINY_MODELS.values()))
    emit(s, {"preset": s.preset, "roles": rows}, "\n".join(lines))


@models_app.command("build-tiny")
def models_build_tiny(ctx: typer.Context) -> None:
    """Build every tiny model into the cache (offline, seconds); already built ones are reused."""
    from .models import TINY_MODELS, ensure_tiny

    s = settings(ctx)
    rows = []
    for name, entry in TINY_MODELS.items():
        path = ensure_tiny(name)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rows.append({"id": entry.id, "role": entry.role, "path": str(path), "bytes": size})
    total = sum(r["bytes"] for r in rows)
    text = "\n".join(f"{r['id']:<16} {r['bytes'] / 1e6:6.2f} MB  {r['path']}" for r in rows)
    emit(s, {"models": rows, "total_bytes": total}, f"{text}\ntotal {total / 1e6:.2f} MB")


@app.command("demo")
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("mmpersona-demo"), "--out", help="Folder for the demo database and image."),
    steps: int = typer.Option(4, "--steps", min=1, help="Denoising steps for the image."),
) -> None:
    """The main job end to end: register concepts, ask about a photo (retrieval + VLM), generate an image."""
    from .demo import run_demo

    s = settings(ctx)
    report = run_demo(preset=s.preset, out_dir=out, device=s.device, dtype=s.dtype, overrides=s.overrides,
                      steps=steps)
    used = ", ".join(f"{r['concept']} ({r['source']} {r['score']:.3f})" for r in report.retrieved)
    lines = [f"preset {report.preset}: " + ", ".join(f"{k}={v}" for k, v in report.models.items()),
             f"question: {report.question}",
             f"retrieved: {used or 'nothing (abstained)'}",
             f"answer: {report.answer!r}" + ("  (random tiny weights: noise)" if report.preset == "tiny" else ""),
             f"image: {report.image_path}",
             "timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings_s.items())]
    emit(s, report.to_dict(), "\n".join(lines))


# ------------------------------------------------------------------------------------------ concepts


def open_db(s: Settings):
    from .conceptdb import ConceptDB

    return ConceptDB(s.db, embedder=s.overrides.get("embedder"), preset=s.preset, device=s.device, dtype=s.dtype)


def concept_line(c) -> str:
    extra = f" aka {', '.join('<' + a + '>' for a in c.aliases)}" if c.aliases else ""
    info = (c.info[:60] + "...") if len(c.info) > 60 else c.info
    return f"{c.handle:<20} {c.category or '-':<12} {len(c.images)} image(s){extra}  {info}"


@concepts_app.command("add")
def concepts_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The concept's handle, e.g. '<bo>' or bo."),
    image: list[Path] = typer.Option(..., "--image", help="A reference image (repeatable)."),
    category: str = typer.Option("", "--category", help="e.g. dog, person, mug."),
    info: str = typer.Option("", "--info", help="What the model should know about it."),
    alias: Optional[list[str]] = typer.Option(None, "--alias", help="Another handle for it (repeatable)."),
) -> None:
    """Register a concept with its reference images (embedded once, stored by content hash)."""
    s = settings(ctx)
    with open_db(s) as db:
        c = db.add(s.user, name, image, category=category, info=info, aliases=alias or [])
    emit(s, c.to_dict(), f"added {concept_line(c)}")


@concepts_app.command("list")
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


@concepts_app.command("show")
def concepts_show(ctx: typer.Context, name: str = typer.Argument(..., help="Name, alias or id.")) -> None:
    """Everything about one concept."""
    s = settings(ctx)
    with open_db(s) as db:
        c = db.get(s.user, name)
        tensors = db.store.list_tensors(s.user, c.id)
    data = {**c.to_dict(), "tensors": tensors}
    emit(s, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


@concepts_app.command("edit")
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


@concepts_app.command("rm")
def concepts_rm(ctx: typer.Context, name: str = typer.Argument(..., help="Name, alias or id.")) -> None:
    """Delete a concept with its embeddings, learned tensors and no-longer-used images."""
    s = settings(ctx)
    with open_db(s) as db:
        c = db.delete(s.user, name)
    emit(s, {"deleted": c.to_dict()}, f"deleted {c.handle}")


@concepts_app.command("search")
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


@concepts_app.command("import")
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


@concepts_app.command("export")
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


@app.command("erase-user")
def erase_user(
    ctx: typer.Context,
    yes: bool = typer.Option(False, "--yes", help="Confirm: this cannot be undone."),
) -> None:
    """Remove everything of --user: concepts, images, vectors, learned tensors, profile, artefacts, settings."""
    s = settings(ctx)
    if not yes:
        raise typer.BadParameter(f"erasing all data of user {s.user!r} cannot be undone: add --yes", param_hint="--yes")
    with open_db(s) as db:
        n = db.erase_user(s.user)
    emit(s, {"user": s.user, "concepts_removed": n}, f"erased user {s.user!r} ({n} concept(s) and all other data)")


@concepts_app.command("migrate")
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


@concepts_app.command("reindex")
def concepts_reindex(
    ctx: typer.Context,
    instance: bool = typer.Option(True, "--instance/--no-instance",
                                  help="Also the instance embedder's vectors (DINOv2; --model instance=ID)."),
) -> None:
    """Compute the vectors the user's reference images lack: the embedder's (after it changed) and the instance
    embedder's (for `--instance` retrieval); vectors already stored are kept."""
    from .instance import ensure_vectors
    from .models import load_instance_embedder

    s = settings(ctx)
    with open_db(s) as db:
        if not db.store.has_owner(s.user):
            raise MmpersonaError(f"user {s.user!r} has no concepts in this database (check --user)")
        done = {db.embedder.name: ensure_vectors(db, s.user, db.embedder, progress=not s.json)}
        if instance:
            inst = load_instance_embedder(s.overrides.get("instance"), preset=s.preset, device=s.device,
                                          dtype=s.dtype)
            done[inst.name] = ensure_vectors(db, s.user, inst, progress=not s.json)
    emit(s, {"user": s.user, "computed": done},
         "\n".join(f"{name}: {n} vector(s) computed" for name, n in done.items()))


@concepts_app.command("calibrate")
def concepts_calibrate(
    ctx: typer.Context,
    positives: Path = typer.Option(..., "--positives", help="Folder of <concept name>/ sub-folders of held-out images."),
    negatives: Path = typer.Option(..., "--negatives", help="Folder of images showing none of the concepts."),
    precision: float = typer.Option(0.9, "--precision", help="Target precision of image retrieval."),
) -> None:
    """Pick the user's retrieval threshold for a target precision, and store it."""
    from pipelines.calibrate import calibrate, images_in, positives_from_folder

    s = settings(ctx)
    with open_db(s) as db:
        result = calibrate(db, s.user, positives_from_folder(positives), images_in(negatives),
                           target_precision=precision)
    text = (f"threshold {result.threshold:.4f}: precision {result.precision:.3f}, recall {result.recall:.3f} "
            f"on {result.positives} positive / {result.negatives} negative images")
    if not result.reached:
        text += f" (target {precision} not reachable: the user's retrieval will abstain)"
    emit(s, result.to_dict(), text)


@concepts_app.command("learn")
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

    from .models import load_t2i

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


# ------------------------------------------------------------------------------------------ chat


@app.command("chat")
def chat(
    ctx: typer.Context,
    question: Optional[str] = typer.Argument(None, help="Ask once and exit; omit for an interactive chat."),
    image: Path = typer.Option(..., "--image", help="The photo the question is about."),
    k: int = typer.Option(3, "-k", min=1, help="Concepts retrieved per source."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Threshold (default: calibrated)."),
    regions: bool = typer.Option(False, "--regions", help="Also retrieve per detected region."),
    assign: bool = typer.Option(False, "--assign", help="Regions: one concept per region, one region per concept."),
    boxes: bool = typer.Option(False, "--boxes", help="Tell the model each region concept's box."),
    marks: bool = typer.Option(False, "--marks", help="Draw numbered marks on the photo, named in the prompt."),
    verify: bool = typer.Option(False, "--verify", help="Let the VLM confirm each retrieved concept first."),
    instance: bool = typer.Option(False, "--instance", help="Match images with DINOv2 beside CLIP (fused)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    mode: str = typer.Option("retrieval", "--mode", help="retrieval, tokens (learned) or hybrid."),
) -> None:
    """Ask a VLM about an image with your concepts retrieved and injected (RAP style)."""
    from pipelines.vlm import PersonalizedVLMPipeline

    from .images import load_image

    s = settings(ctx)
    with open_db(s) as db:
        pipe = PersonalizedVLMPipeline(db, vlm=s.vlm(), detector=s.overrides.get("detector"),
                                       regions=regions, assign=assign, boxes=boxes, marks=marks, verify=verify,
                                       instance=(s.overrides.get("instance") or True) if instance else False,
                                       preset=s.preset, device=s.device, dtype=s.dtype, k=k,
                                       min_score=min_score, max_new_tokens=max_new_tokens, mode=mode)
        if question is not None:
            answer = pipe(image, question, user=s.user)
            emit(s, answer.to_dict(), _answer_text(answer))
            return
        session = pipe.chat(s.user, image)
        typer.echo("Interactive chat: type a question; '/image PATH' changes the photo; '/quit' or Ctrl-D ends.",
                   err=True)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                continue
            if line in {"/quit", "/exit"}:
                break
            if line.startswith("/image "):
                try:
                    session.image = load_image(line[7:].strip())
                except MmpersonaError as e:
                    typer.echo(f"error: {e}", err=True)
                    continue
                typer.echo(f"image: {line[7:].strip()}", err=True)
                continue
            try:
                pieces = session.stream(line) if not s.json else None
                if pieces is None:
                    typer.echo(json.dumps(session.ask(line).to_dict(), default=str))
                    continue
                typer.echo("assistant> ", nl=False)
                for piece in pieces:
                    typer.echo(piece, nl=False)
                typer.echo("")
                typer.echo(_retrieved_line(session.answers[-1]), err=True)
            except MmpersonaError as e:  # one bad turn does not end the conversation
                typer.echo(f"error: {e}", err=True)


@eval_app.command("run")
def evaluate_cmd(
    ctx: typer.Context,
    dataset: Path = typer.Argument(..., help="Dataset folder: concepts/, test/, questions.json (see README)."),
    protocol: Optional[list[str]] = typer.Option(None, "--protocol",
                                                 help="recognition, mcqa, caption, mmpb (repeatable; default all)."),
    fillers: int = typer.Option(3, "--fillers", min=0, help="Filler turns before the query (mmpb)."),
    use_db: bool = typer.Option(False, "--use-db", help="Use --db/--user as they are instead of a fresh database "
                                                          "with the dataset's concepts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON report here."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1),
) -> None:
    """Evaluate personalized answering (recognition, multiple-choice QA, caption recall, MMPB-style)."""
    import tempfile

    from pipelines.evaluation import PROTOCOLS, evaluate, load_dataset, pipeline_answerer, register_concepts
    from pipelines.vlm import PersonalizedVLMPipeline

    from .conceptdb import ConceptDB

    s = settings(ctx)
    data = load_dataset(dataset)
    with tempfile.TemporaryDirectory(prefix="mmpersona-eval-") as tmp:
        db = open_db(s) if use_db else ConceptDB(Path(tmp) / "eval.db", embedder=s.overrides.get("embedder"),
                                                 preset=s.preset, device=s.device, dtype=s.dtype)
        with db:
            if not use_db:
                register_concepts(db, s.user, data)
            pipe = PersonalizedVLMPipeline(db, vlm=s.vlm(), preset=s.preset, device=s.device,
                                           dtype=s.dtype, max_new_tokens=max_new_tokens)
            report = evaluate(pipeline_answerer(pipe, s.user), data, protocol or PROTOCOLS, fillers=fillers)
    if out is not None:
        out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines = []
    for name in ("recognition", "mmpb"):
        if name in report:
            o = report[name]["overall"]
            lines.append(f"{name}: weighted accuracy {o['weighted_accuracy']}, positive {o['positive_accuracy']}, "
                         f"negative {o['negative_accuracy']}")
    if "mcqa" in report:
        lines.append(f"mcqa: accuracy {report['mcqa']['overall']['accuracy']}")
    if "caption" in report:
        o = report["caption"]["overall"]
        lines.append(f"caption: precision {o['precision']}, recall {o['recall']}, f1 {o['f1']}")
    emit(s, report, "\n".join(lines))


@eval_app.command("bench")
def eval_bench_cmd(
    ctx: typer.Context,
    benchmark: str = typer.Argument(..., help="yollava, repic, myvlm, mc-llava or mmpb."),
    root: Path = typer.Argument(..., help="yollava: the yollava-data folder; repic: the RePIC folder; myvlm: its "
                                          "data_root; mc-llava: the dataset folder; mmpb: the folder of "
                                          "dataset.csv."),
    recognition: Optional[Path] = typer.Option(None, "--recognition",
                                               help="yollava: RAP's recognition_test.json (default: generated)."),
    visual_qa: Optional[Path] = typer.Option(None, "--visual-qa", help="yollava: yollava-visual-qa.json."),
    text_qa: Optional[Path] = typer.Option(None, "--text-qa", help="yollava: yollava-text-only-qa.json."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="repic: a *_query_templates.json."),
    database: Optional[Path] = typer.Option(None, "--database",
                                            help="A RAP database.json (yollava, myvlm: info; repic: "
                                                 "database_mod.json)."),
    scenario: Optional[list[str]] = typer.Option(None, "--scenario",
                                                 help="mc-llava: a scenario such as Alex_Gloria_Marty (repeatable; "
                                                      "default: all of scenarios.json)."),
    task: Optional[list[str]] = typer.Option(None, "--task",
                                             help="mc-llava: recognition, choice, vqa, text, caption, grounding "
                                                  "(repeatable; default all)."),
    description: str = typer.Option("moderate", "--description",
                                    help="mmpb: the description injected (simple, moderate, detailed, "
                                         "super_detailed)."),
    references: int = typer.Option(1, "--references", min=1,
                                   help="myvlm: images per concept registered (the rest are asked about)."),
    method: Optional[list[str]] = typer.Option(None, "--method",
                                               help="vanilla, oracle, retrieval, tokens, hybrid, each with "
                                                    "options as a row of its own, e.g. retrieval:regions,k=1 "
                                                    "(repeatable; default the first three; tokens/hybrid learn "
                                                    "tokens first)."),
    learn_steps: int = typer.Option(40, "--learn-steps", min=1, help="tokens/hybrid: steps per concept."),
    out: Path = typer.Option(Path("mmpersona-eval"), "--out",
                             help="Report folder: report.json/.md/.png, the peer-format predictions, answers cache."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N items (a quick look)."),
    distractors: Optional[Path] = typer.Option(None, "--distractors",
                                               help="A folder of per-concept image folders added to the database "
                                                    "(e.g. another dataset's train/): database size as a variable."),
    sizes: Optional[str] = typer.Option(None, "--sizes",
                                        help="Distractor counts to run at, e.g. 0,100,1000 (default: 0 and all)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """A peer benchmark in its published layout, methods side by side, scored by the peer's own rule."""
    import tempfile

    from pipelines.peers import datasets
    from pipelines.peers.run import register, run
    from pipelines.vlm import ANSWER_METHODS, PersonalizedVLMPipeline

    from .conceptdb import ConceptDB

    s = settings(ctx)
    if benchmark == "yollava":
        bench = datasets.yollava(root, recognition=recognition, visual_qa=visual_qa, text_qa=text_qa,
                                 database=database)
    elif benchmark == "repic":
        if queries is None or database is None:
            raise MmpersonaError("repic needs --queries (a *_query_templates.json) and --database (database_mod.json)")
        bench = datasets.repic(root, queries, database)
    elif benchmark == "myvlm":
        bench = datasets.myvlm(root, database=database, references=references)
    elif benchmark == "mc-llava":
        bench = datasets.mc_llava(root, scenarios=scenario or None, tasks=tuple(task or datasets.MC_LLAVA_TASKS))
    elif benchmark == "mmpb":
        bench = datasets.mmpb(root, description=description)
    else:
        raise MmpersonaError(f"unknown benchmark {benchmark!r}; valid: yollava, repic, myvlm, mc-llava, mmpb")
    with tempfile.TemporaryDirectory(prefix="mmpersona-eval-") as tmp:
        with ConceptDB(Path(tmp) / "eval.db", embedder=s.overrides.get("embedder"), preset=s.preset,
                       device=s.device, dtype=s.dtype) as db:
            register(db, s.user, bench.concepts)
            pipe = PersonalizedVLMPipeline(db, vlm=s.vlm(), preset=s.preset, device=s.device, dtype=s.dtype,
                                           max_new_tokens=max_new_tokens)
            extra = datasets.concept_folders(distractors) if distractors is not None else []
            try:
                counts = [int(x) for x in sizes.split(",")] if sizes else None
            except ValueError as e:
                raise MmpersonaError(f"--sizes expects comma-separated counts, got {sizes!r}") from e
            report = run(pipe, s.user, bench, method or list(ANSWER_METHODS), out=out, limit=limit,
                         progress=not s.json, seed=seed, distractors=extra, sizes=counts, learn_steps=learn_steps)
    emit(s, report, (out / "report.md").read_text(encoding="utf-8") + f"\nreport: {out / 'report.json'}")


@eval_app.command("score")
def eval_score_cmd(
    ctx: typer.Context,
    fmt: str = typer.Argument(..., metavar="FORMAT",
                              help="rap-qa, yollava-recognition, repic-single, repic-2, repic-4, mmpb, "
                                   "mc-llava-rec, mc-llava-choice, mc-llava-text, mc-llava-vqa or "
                                   "mc-llava-caption."),
    files: list[Path] = typer.Argument(..., help="Prediction files in that format (another system's outputs; "
                                                 "JSON; CSV for MMPB's table; MC-LLaVA's eval.py printout as "
                                                 ".log/.txt)."),
) -> None:
    """Score released prediction files in their own format, by the peer's own rule (the peer's numbers)."""
    from pipelines.peers.scoring import SCORERS, PredictionFormatError, format_repic, read_predictions, score_file

    s = settings(ctx)
    if fmt not in SCORERS:
        raise PredictionFormatError(f"unknown prediction format {fmt!r}; valid: {', '.join(SCORERS)}")
    results, lines = [], []
    for f in files:
        rows = read_predictions(f)
        try:
            metrics = score_file(fmt, rows)
        except PredictionFormatError as e:
            raise PredictionFormatError(f"{str(f)!r}: {e}") from e
        results.append({"file": str(f), "format": fmt, **metrics})
        if fmt.startswith("repic"):
            lines.append(format_repic(f.name, metrics))
        else:
            lines.append(f"{f.name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in metrics.items() if k != "groups"))
            lines += [f"  {k}: {v:.4f}" for k, v in metrics.get("groups", {}).items()]
    emit(s, results, "\n".join(lines))


# ------------------------------------------------------------------------------------------ profile


def open_profile(s: Settings, db):
    from .preferences import PreferenceProfile

    return PreferenceProfile(db, s.user)


def _record(ctx: typer.Context, kind: str, image: Path, comment: str) -> None:
    s = settings(ctx)
    with open_db(s) as db:
        e = getattr(open_profile(s, db), kind)(image, comment=comment)
    emit(s, e.to_dict(), f"{kind}d {image}")


@profile_app.command("like")
def profile_like(ctx: typer.Context, image: Path = typer.Argument(...),
                 comment: str = typer.Option("", "--comment", help="What you like about it.")) -> None:
    """Record an image you like (with an optional comment)."""
    _record(ctx, "like", image, comment)


@profile_app.command("dislike")
def profile_dislike(ctx: typer.Context, image: Path = typer.Argument(...),
                    comment: str = typer.Option("", "--comment", help="What you dislike about it.")) -> None:
    """Record an image you dislike (with an optional comment)."""
    _record(ctx, "dislike", image, comment)


@profile_app.command("compare")
def profile_compare(ctx: typer.Context, chosen: Path = typer.Argument(...), rejected: Path = typer.Argument(...),
                    prompt: str = typer.Option(..., "--prompt", help="The prompt both images were made for.")) -> None:
    """Record a pairwise choice: CHOSEN was preferred over REJECTED for --prompt."""
    s = settings(ctx)
    with open_db(s) as db:
        e = open_profile(s, db).compare(prompt, chosen, rejected)
    emit(s, e.to_dict(), f"recorded: {chosen} over {rejected}")


@profile_app.command("show")
def profile_show(ctx: typer.Context) -> None:
    """Counts, attributes and the reward model's state."""
    s = settings(ctx)
    with open_db(s) as db:
        summary = open_profile(s, db).summary()
    a = summary["attributes"]
    emit(s, summary, "\n".join([f"user {s.user}: " + ", ".join(f"{v} {k}s" for k, v in summary["counts"].items()),
                                f"liked attributes: {', '.join(a['liked']) or '-'}",
                                f"disliked attributes: {', '.join(a['disliked']) or '-'}",
                                f"reward model: {summary['reward_model']}"]))


@profile_app.command("edit-attributes")
def profile_edit_attributes(
    ctx: typer.Context,
    liked: Optional[list[str]] = typer.Option(None, "--liked", help="Replace the liked attributes (repeatable)."),
    disliked: Optional[list[str]] = typer.Option(None, "--disliked", help="Replace the disliked ones."),
    extract: bool = typer.Option(False, "--extract", help="Derive them from your comments with the VLM first."),
) -> None:
    """View, derive (ViPer style) or edit the liked / disliked visual attributes."""
    s = settings(ctx)
    with open_db(s) as db:
        profile = open_profile(s, db)
        if extract:
            profile.extract_attributes(s.vlm())
        attrs = profile.set_attributes(liked, disliked) if liked is not None or disliked is not None \
            else profile.attributes
    emit(s, attrs.to_dict(), f"liked: {', '.join(attrs.liked) or '-'}\ndisliked: {', '.join(attrs.disliked) or '-'}")


@profile_app.command("train-reward")
def profile_train_reward(ctx: typer.Context) -> None:
    """Train the personal reward model on your pairs, likes and dislikes; prints its held-out accuracy."""
    s = settings(ctx)
    with open_db(s) as db:
        model = open_profile(s, db).train_reward()
    text = ("no data yet: scores stay neutral (cold start)" if model.cold_start else
            f"trained on {model.pairs} pairs, {model.likes} likes, {model.dislikes} dislikes; held-out pairwise "
            f"accuracy {model.held_out_accuracy if model.held_out_accuracy is not None else 'n/a (too few)'}")
    emit(s, model.summary(), text)


@profile_app.command("train-lora")
def profile_train_lora(
    ctx: typer.Context,
    steps: int = typer.Option(200, "--steps", min=1), rank: int = typer.Option(4, "--rank", min=1),
    beta: float = typer.Option(2000.0, "--beta"), lr: float = typer.Option(1e-4, "--lr"),
    xl: bool = typer.Option(False, "--xl", help="Train for the SDXL model (t2i_xl) instead of SD 1.5."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=64,
                                             help="Training image size (default: the model's own, 512 / 1024 for "
                                                  "SDXL; 512 or 768 halves or quarters SDXL's memory)."),
) -> None:
    """Train your LoRA with Diffusion-DPO on your pairwise choices (used by `generate --strategies lora`)."""
    from pipelines.dpo import DPOConfig, train_dpo_lora

    from .models import load_t2i

    s = settings(ctx)
    role = "t2i_xl" if xl else "t2i"
    with open_db(s) as db:
        t2i = load_t2i(s.overrides.get(role), role=role, preset=s.preset, device=s.device, dtype=s.dtype,
                       ip_adapter=False)
        result = train_dpo_lora(t2i, db, s.user, DPOConfig(steps=steps, rank=rank, beta=beta, lr=lr,
                                                           resolution=resolution), progress=not s.json)
    emit(s, {**result.to_dict(), "model": t2i.spec.id},
         f"trained a LoRA for {t2i.spec.id} on {result.pairs} pairs: {result.steps} steps, {result.seconds:.1f}s")


@profile_app.command("reset")
def profile_reset(ctx: typer.Context) -> None:
    """Forget the whole preference profile (likes, pairs, attributes, reward model, LoRA)."""
    s = settings(ctx)
    with open_db(s) as db:
        n = open_profile(s, db).reset()
    emit(s, {"removed": n}, f"removed {n} profile entries")


@adapter_app.command("train")
def adapter_train(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Folder for the adapter, its checkpoints and training.json."),
    pickapic: Optional[list[Path]] = typer.Option(None, "--pickapic",
                                                  help="A Pick-a-Pic parquet file (caption, jpg_0, jpg_1, label_0, "
                                                       "user_id); repeatable."),
    from_db: bool = typer.Option(True, "--from-db/--no-from-db",
                                 help="Also train on every user's pairwise choices in the database."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read at most this many Pick-a-Pic rows."),
    steps: int = typer.Option(1000, "--steps", min=1), batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(1e-3, "--lr"), beta: float = typer.Option(1000.0, "--beta"),
    tokens: int = typer.Option(4, "--tokens", min=1, max=64, help="Condition tokens per user."),
    context: int = typer.Option(4, "--context", min=1, help="Pairs that make a user's embedding in training."),
    heldout: float = typer.Option(0.1, "--heldout", min=0.0, max=0.99, help="Share of users held out."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=8),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, fp16 or bf16 (accelerate)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the checkpoint in --out."),
    xl: bool = typer.Option(False, "--xl", help="Train for the SDXL model (t2i_xl) instead of SD 1.5."),
) -> None:
    """Train the preference adapter with multi-user Diffusion-DPO (several GPUs under `accelerate launch`)."""
    from pipelines.adapter_training import AdapterTrainConfig, read_pickapic, rows_from_db, train_adapter

    from .models import load_t2i

    s = settings(ctx)
    config = AdapterTrainConfig(tokens=tokens, steps=steps, batch_size=batch_size, lr=lr, beta=beta, context=context,
                                heldout_users=heldout, resolution=resolution, mixed_precision=mixed_precision,
                                gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every)
    rows = read_pickapic(pickapic, limit=limit) if pickapic else []
    role = "t2i_xl" if xl else "t2i"
    with open_db(s) as db:
        if from_db:
            rows += rows_from_db(db)
        if not rows:
            raise MmpersonaError("no pairs to train on: pass --pickapic FILE, or record choices with "
                                 "`mmpersona profile compare`")
        t2i = load_t2i(s.overrides.get(role), role=role, preset=s.preset, device=s.device, dtype=s.dtype,
                       ip_adapter=False)
        result = train_adapter(t2i, db.embedder, rows, out, config, resume=resume, progress=not s.json)
    acc = result.heldout_pair_accuracy
    emit(s, {**result.to_dict(), "model": t2i.spec.id},
         f"trained the preference adapter for {t2i.spec.id} on {result.train_users} users: {result.steps} steps "
         f"({result.seconds:.1f}s); held-out pair accuracy "
         f"{'n/a' if acc is None else f'{acc:.3f}'} over {len(result.heldout_users)} users -> {out}")


# ------------------------------------------------------------------------------------------ generate


@app.command("generate")
def generate(
    ctx: typer.Context,
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="A prompt (repeatable)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A file with one prompt per line."),
    out: Path = typer.Option(..., "--out", help="Output folder: one PNG and one JSON sidecar per image."),
    n: int = typer.Option(1, "-n", min=1, help="Images per prompt."),
    strategies: str = typer.Option("default", "--strategies",
                                   help="Comma-separated: attributes, viper, ip_adapter, subject, lora, preference, "
                                        "rerank; '' for none; 'default': attributes, ip_adapter (when an IP-Adapter "
                                        "is loaded), rerank."),
    adapter: Optional[str] = typer.Option(None, "--adapter",
                                          help="The preference adapter for the `preference` strategy: a folder from "
                                               "`mmpersona adapter train`, or a hub id."),
    steps: int = typer.Option(30, "--steps", min=1), seed: int = typer.Option(0, "--seed"),
    guidance: float = typer.Option(7.5, "--guidance"),
    xl: bool = typer.Option(False, "--xl", help="Use the SDXL model (t2i_xl)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Images per diffusers call at most, each decoded on its own "
                                                  "(VAE slicing): less GPU memory, the same images."),
    cpu_offload: bool = typer.Option(False, "--cpu-offload", help="Model CPU offload (for small GPUs)."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Decode in tiles (less memory for big images)."),
) -> None:
    """Batch generation for the user; resumable; data-parallel under `accelerate launch`."""
    from pipelines.batch import generate_batch, read_prompts

    s = settings(ctx)
    items = read_prompts(prompt or [], prompts)
    names = None if strategies.strip() == "default" else [x.strip() for x in strategies.split(",") if x.strip()]
    report = generate_batch(items, out_dir=out, user=s.user, n=n, strategies=names, steps=steps, seed=seed,
                            guidance_scale=guidance, role="t2i_xl" if xl else "t2i", db=s.db, preset=s.preset,
                            device=s.device, dtype=s.dtype, model=s.overrides.get("t2i_xl" if xl else "t2i"),
                            embedder=s.overrides.get("embedder"), progress=not s.json, batch_size=batch_size,
                            load_options={"cpu_offload": cpu_offload, "vae_slicing": batch_size is not None,
                                          "vae_tiling": vae_tiling}, adapter=adapter)
    emit(s, report, f"process {report['process'] + 1}/{report['processes']}: generated {report['generated']} "
                    f"image(s), skipped {report['skipped']} finished prompt(s) -> {out}")


# ------------------------------------------------------------------------------------------ serve

KEYS_OPTION = typer.Option(None, "--keys", envvar="MMPERSONA_KEYS",
                           help="The API keys file (default: api_keys.json in the data dir; env MMPERSONA_KEYS).")


@keys_app.command("create")
def keys_create(ctx: typer.Context, user: Optional[str] = typer.Option(None, "--user",
                                                                       help="Whose key (default: the global --user)."),
                name: str = typer.Option("", "--name", help="A label, e.g. the application using it."),
                keys: Optional[Path] = KEYS_OPTION) -> None:
    """Create an API key for a user; it is printed once (only its hash is kept)."""
    from .server.keys import KeyStore

    s = settings(ctx)
    store = KeyStore(keys)
    record, key = store.create(user or s.user, name)
    emit(s, {**record.public(), "key": key},
         f"API key for {record.user} (id {record.id}); shown only now, keep it secret:\n{key}")


@keys_app.command("list")
def keys_list(ctx: typer.Context, user: Optional[str] = typer.Option(None, "--user", help="Only this user's."),
              keys: Optional[Path] = KEYS_OPTION) -> None:
    """The API keys (ids, users, labels; never the keys)."""
    from .server.keys import KeyStore

    s = settings(ctx)
    records = [r.public() for r in KeyStore(keys).list(user)]
    emit(s, records, "\n".join(f"{r['id']}  {r['user']}  {r['name'] or '-'}" for r in records) or "no API keys")


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: str = typer.Argument(..., help="The key's id (see `keys list`)."),
                keys: Optional[Path] = KEYS_OPTION) -> None:
    """Revoke an API key: a running server refuses it from the next request on."""
    from .server.keys import KeyStore

    s = settings(ctx)
    record = KeyStore(keys).revoke(key_id)
    emit(s, record.public(), f"revoked {record.id} ({record.user})")


@app.command("serve")
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    keys: Optional[Path] = KEYS_OPTION,
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Serve personalized chat (the vlm role)."),
    images: bool = typer.Option(True, "--images/--no-images", help="Serve personalized generation (t2i)."),
    xl: bool = typer.Option(False, "--xl", help="Generate with the SDXL model (t2i_xl)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="The preference adapter (folder or hub id)."),
    preload: bool = typer.Option(True, "--preload/--lazy", help="Load the models at start-up (else on first use)."),
    queue_size: int = typer.Option(8, "--queue-size", min=1,
                                   help="Model requests that may wait; more are answered 429 with Retry-After."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.01, help="Largest request body."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Longest answer a request may ask for."),
) -> None:
    """The HTTP API for applications: OpenAI-compatible chat, generation, concepts and preferences per API key."""
    try:
        import uvicorn

        from .server.app import ServeConfig, create_app, preload_models
    except ImportError as e:
        from .errors import MissingDependencyError

        raise MissingDependencyError(f'`mmpersona serve` needs FastAPI and uvicorn ({e}): pip install '
                                     '"mmpersona[serve]"') from e
    from pipelines import PersonalizedT2IPipeline, PersonalizedVLMPipeline

    from .conceptdb import ConceptDB
    from .server.keys import KeyStore

    s = settings(ctx)
    store = KeyStore(keys)
    if not store.list():
        typer.echo(f"note: no API keys in {store.path} yet: create one with `mmpersona keys create --user NAME`",
                   err=True)
    load = {"preset": s.preset, "device": s.device, "dtype": s.dtype}
    db = ConceptDB(s.db, embedder=s.overrides.get("embedder"), **load)
    role = "t2i_xl" if xl else "t2i"
    config = ServeConfig(queue_size=queue_size, max_body_bytes=int(max_body_mb * 2**20), max_tokens=max_tokens,
                         default_max_tokens=min(128, max_tokens))

    def make_chat():
        return PersonalizedVLMPipeline(db, vlm=s.vlm(), max_new_tokens=config.default_max_tokens, **load)

    def make_images():
        return PersonalizedT2IPipeline(db, t2i=s.overrides.get(role), role=role, adapter=adapter, **load)

    api = create_app(db, store, vlm=make_chat if chat else None, t2i=make_images if images else None, config=config)
    if preload:  # a model that cannot be had fails here, before the server listens
        preload_models(api)
    typer.echo(f"serving on http://{host}:{port} (API docs: /docs; health: /health)", err=True)
    uvicorn.run(api, host=host, port=port, log_level="info" if logging.getLogger().level <= logging.INFO else
                "warning")


def _retrieved_line(answer) -> str:
    if answer.abstained:
        return "(no concept recognised: answered without personal context)"
    return "(used " + ", ".join(f"{r.concept.handle} {r.source} {r.score:.3f}" for r in answer.retrieved) + ")"


def _answer_text(answer) -> str:
    return f"{answer.answer}\n{_retrieved_line(answer)}"


def main() -> None:
    """Console entry point: our own errors become one clear line on stderr and exit code 2.

    Usage errors, `--help` and exit codes stay click's (standalone mode)."""
    for arg in sys.argv[1:]:
        if any("\udc80" <= ch <= "\udcff" for ch in arg):  # undecodable bytes, kept by surrogateescape
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            typer.echo(f"error: argument {shown!r} is not valid UTF-8 text", err=True)
            sys.exit(2)
    try:
        app()
    except MmpersonaError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
