"""`mmpersona eval`: the evaluation protocols, the peers' benchmarks and their scoring."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from ..errors import MmpersonaError
from .settings import emit, open_db, settings

app = typer.Typer(help="Evaluation: run the protocols on a dataset, or score released outputs as the peers do.",
                  no_args_is_help=True)


@app.command("run")
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

    from ..conceptdb import ConceptDB

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


@app.command("bench")
def eval_bench_cmd(
    ctx: typer.Context,
    benchmark: str = typer.Argument(..., help="yollava, repic, myvlm, mc-llava, mmpb, lcmp or memory."),
    root: Optional[Path] = typer.Argument(None, help="yollava: the yollava-data folder; repic: the RePIC folder; "
                                                     "myvlm: its data_root; mc-llava: the dataset folder; mmpb: the "
                                                     "folder of dataset.csv; lcmp: TAME's repository (or its "
                                                     "data/); memory: none (a simulated user)."),
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
    subjects: int = typer.Option(60, "--subjects", min=1, help="memory: people, pets and objects simulated."),
    sessions: int = typer.Option(8, "--sessions", min=2, help="memory: sessions told before the questions."),
    extractor: str = typer.Option("model", "--extractor",
                                  help="memory: model (the chat model reads each sentence; the rule extractor for "
                                       "the tiny models), rule, or oracle (the memory layer alone); lcmp: model or "
                                       "verbatim (each user turn kept whole)."),
    paraphrase: float = typer.Option(0.3, "--paraphrase", min=0.0, max=1.0,
                                     help="memory: the share of new states said in other words."),
    context: str = typer.Option("memory", "--context",
                                help="lcmp: memory (the entries each question selects) or history (also the "
                                     "told turns as chat history)."),
) -> None:
    """A peer benchmark in its published layout, methods side by side, scored by the peer's own rule; or
    `memory`: a simulated user's memory over sessions (`pipelines.memory_eval`)."""

    from pipelines.peers import datasets
    from pipelines.peers.run import register, run
    from pipelines.vlm import ANSWER_METHODS


    s = settings(ctx)
    if benchmark == "memory":
        return _memory_bench(s, out, subjects=subjects, sessions=sessions, seed=seed, extractor=extractor,
                             paraphrase=paraphrase, max_new_tokens=max_new_tokens)
    if root is None:
        raise MmpersonaError(f"{benchmark} needs the dataset's folder (ROOT)")
    if benchmark == "lcmp":
        return _lcmp_bench(s, root, out, context=context, extractor=extractor, limit=limit,
                           max_new_tokens=max_new_tokens)
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
        raise MmpersonaError(f"unknown benchmark {benchmark!r}; valid: yollava, repic, myvlm, mc-llava, mmpb, lcmp, "
                             "memory")
    with _fresh_pipeline(s, max_new_tokens) as pipe:
        register(pipe.db, s.user, bench.concepts)
        extra = datasets.concept_folders(distractors) if distractors is not None else []
        try:
            counts = [int(x) for x in sizes.split(",")] if sizes else None
        except ValueError as e:
            raise MmpersonaError(f"--sizes expects comma-separated counts, got {sizes!r}") from e
        report = run(pipe, s.user, bench, method or list(ANSWER_METHODS), out=out, limit=limit,
                     progress=not s.json, seed=seed, distractors=extra, sizes=counts, learn_steps=learn_steps)
    emit(s, report, (out / "report.md").read_text(encoding="utf-8") + f"\nreport: {out / 'report.json'}")


@contextmanager
def _fresh_pipeline(s, max_new_tokens: int):
    """The chat pipeline of the CLI's models over a fresh, temporary concept database."""
    import tempfile

    from pipelines.vlm import PersonalizedVLMPipeline

    from ..conceptdb import ConceptDB

    with tempfile.TemporaryDirectory(prefix="mmpersona-eval-") as tmp:
        with ConceptDB(Path(tmp) / "eval.db", embedder=s.overrides.get("embedder"), preset=s.preset,
                       device=s.device, dtype=s.dtype) as db:
            yield PersonalizedVLMPipeline(db, vlm=s.vlm(), preset=s.preset, device=s.device, dtype=s.dtype,
                                          max_new_tokens=max_new_tokens)


def _lcmp_bench(s, root: Path, out: Path, *, context: str, extractor: str, limit: int | None,
                max_new_tokens: int) -> None:
    """`eval bench lcmp`: TAME's LCMP through the toolkit's memory (`pipelines.peers.lcmp`), in a fresh database."""
    from pipelines.peers.lcmp import markdown, run_lcmp

    with _fresh_pipeline(s, max_new_tokens) as pipe:
        report = run_lcmp(pipe, root, context=context, extractor=extractor, limit=limit, out=out,
                          progress=not s.json)
    emit(s, report, markdown(report) + f"\nreport: {out / 'report.json'}; TAME's evaluator reads "
                                       f"{out / 'predictions.jsonl'}")


def _memory_bench(s, out: Path, **options) -> None:
    """`eval bench memory`: the simulated user in a fresh database; report.json and report.md in `out`."""
    from pipelines.memory_eval import markdown, simulate

    if options["extractor"] not in ("model", "rule", "oracle"):
        raise MmpersonaError(f"unknown --extractor {options['extractor']!r}; valid: model, rule, oracle")
    max_new_tokens = options.pop("max_new_tokens")
    with _fresh_pipeline(s, max_new_tokens) as pipe:
        report = simulate(pipe, s.user, progress=not s.json, **options)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    emit(s, {k: v for k, v in report.items() if k != "questions"},
         markdown(report) + f"\nreport: {out / 'report.json'}")


@app.command("score")
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
