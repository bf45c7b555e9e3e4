"""mmpersona demo app: your concepts, personalized chat, your taste, personalized generation.

    python gradio_app.py [--preset tiny|default] [--db PATH] [--auth USER:PASS ...] [--host H] [--port P]

Built only on the public Python API. Each logged-in user sees and changes only their own data; without --auth
the app runs single-user (as user "default") and says so. Requires the `app` extra: pip install "mmpersona[app]".
"""


import argparse
import functools
import json
import logging
import os
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("mmpersona.app")
SINGLE_USER = "default"
STRATEGY_CHOICES = ["attributes", "ip_adapter", "subject", "rerank", "lora"]


class App:
    """Shared state: one concept database (thread-safe) and lazily loaded models, each used under its lock."""

    def __init__(self, preset: str = "tiny", db_path: str | Path | None = None, device: str = "auto",
                 multi_user: bool = False):
        from mmpersona import ConceptDB

        self.preset, self.device, self.multi_user = preset, device, multi_user
        self.db = ConceptDB(db_path, preset=preset, device=device)
        self._vlm_pipe = None
        self._t2i_pipe = None
        self._vlm_lock = threading.Lock()
        self._t2i_lock = threading.Lock()

    def user(self, request: Any) -> str:
        name = getattr(request, "username", None) if request is not None else None
        if self.multi_user:
            if not name:
                raise PermissionError("not logged in")
            return name
        return SINGLE_USER

    @property
    def vlm_pipe(self):
        from pipelines import PersonalizedVLMPipeline

        with self._vlm_lock:
            if self._vlm_pipe is None:
                self._vlm_pipe = PersonalizedVLMPipeline(self.db, preset=self.preset, device=self.device,
                                                         max_new_tokens=64)
        return self._vlm_pipe

    @property
    def t2i_pipe(self):
        from pipelines import PersonalizedT2IPipeline

        with self._t2i_lock:
            if self._t2i_pipe is None:
                self._t2i_pipe = PersonalizedT2IPipeline(self.db, preset=self.preset, device=self.device)
        return self._t2i_pipe

    # ------------------------------------------------------------------ concepts

    def gallery(self, user: str) -> list[tuple[Any, str]]:
        from mmpersona import load_image

        out = []
        for c in self.db.list(user, limit=500):
            thumb = load_image(self.db.store.image_bytes(user, c.images[0])) if c.images else None
            out.append((thumb, f"{c.handle} · {c.category or '-'}"))
        return out

    def concept_table(self, user: str) -> list[list[Any]]:
        return [[c.handle, c.category, c.info, len(c.images), ", ".join(c.aliases)]
                for c in self.db.list(user, limit=500)]

    def add_concept(self, user: str, name: str, category: str, info: str, files: list | None):
        paths = [f if isinstance(f, str) else f.name for f in files or []]
        if not paths:
            raise ValueError("add at least one image of the concept")
        c = self.db.add(user, name, paths, category=category or "", info=info or "")
        return f"added {c.handle} with {len(c.images)} image(s)"

    def import_upload(self, user: str, upload: Any, fmt: str) -> str:
        path = Path(upload if isinstance(upload, str) else upload.name)
        if fmt == "archive":
            report = self.db.import_concepts(user, path, "archive", progress=False)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                with zipfile.ZipFile(path) as zf:
                    for member in zf.infolist():  # never write outside the temporary folder
                        target = (Path(tmp) / member.filename).resolve()
                        if not target.is_relative_to(Path(tmp).resolve()):
                            raise ValueError(f"the zip member {member.filename!r} points outside the archive")
                    zf.extractall(tmp)
                roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
                root = roots[0] if len(roots) == 1 and not (Path(tmp) / "database.json").exists() else Path(tmp)
                report = self.db.import_concepts(user, root, fmt, progress=False)
        lines = [f"imported {len(report.added)} concept(s)"] + [f"skipped {i}: {r}" for i, r in report.skipped]
        return "\n".join(lines)

    # ------------------------------------------------------------------ chat

    def chat(self, user: str, image: Any, question: str, history: list[dict]):
        """Yields (chat messages, retrieved rows, retrieved gallery, status) as the answer streams."""
        from mmpersona import load_image

        pipe = self.vlm_pipe
        turns = [{"role": m["role"], "content": [{"type": "text", "text": _text(m["content"])}]}
                 for m in history if m["role"] in ("user", "assistant")]
        shown = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        with self._vlm_lock:  # one generation at a time on the shared model
            stream = pipe.stream(image, question, user=user, history=turns)
            for piece in stream:
                shown[-1]["content"] += piece
                yield shown, [], [], "answering..."
        answer = stream.result
        rows = [[r.concept.handle, round(r.score, 4), r.source, str(r.box) if r.box else ""] for r in answer.retrieved]
        thumbs = [(load_image(self.db.store.image_bytes(user, r.image or r.concept.images[0])),
                   f"{r.concept.handle} {r.score:.3f} ({r.source})") for r in answer.retrieved if r.concept.images]
        status = ("no concept recognised: answered without personal context" if answer.abstained else
                  "used " + ", ".join(r.concept.handle for r in answer.retrieved))
        shown[-1]["content"] = answer.answer
        yield shown, rows, thumbs, status

    # ------------------------------------------------------------------ preferences

    def profile(self, user: str):
        from mmpersona import PreferenceProfile

        return PreferenceProfile(self.db, user)

    def generate(self, user: str, prompt: str, strategies: list[str], n: int, steps: int, seed: int,
                 compare: bool = False):
        """The personalized images; with `compare`, also the vanilla ones (same seeds): twice the cost."""
        pipe = self.t2i_pipe
        with self._t2i_lock:
            mine = pipe(prompt, user=user, n=n, steps=steps, seed=seed, strategies=strategies)
            vanilla = pipe(prompt, user=user, n=n, steps=steps, seed=seed, strategies=[]) if compare else None
        meta = Path(tempfile.mkdtemp(prefix="mmpersona-app-")) / "metadata.json"
        meta.write_text(json.dumps({"personalized": mine.metadata,
                                    "vanilla": vanilla.metadata if vanilla else None}, indent=2))
        return ([(img, f"score {s:.3f}") for img, s in zip(mine.images, mine.scores, strict=True)],
                [(img, "vanilla") for img in vanilla.images] if vanilla else [], str(meta))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def build_app(preset: str = "tiny", db_path: str | Path | None = None, *, multi_user: bool = False,
              device: str = "auto"):
    """The Gradio Blocks; gradio is imported here, with an install hint if it is missing."""
    try:
        import gradio as gr
    except ImportError as e:
        from mmpersona import MissingDependencyError

        raise MissingDependencyError('The app needs Gradio: pip install "mmpersona[app]"') from e
    from mmpersona import MmpersonaError

    app = App(preset, db_path, device, multi_user)

    def guarded(fn):
        """Our errors become a readable message in the page instead of a stack trace."""

        @functools.wraps(fn)  # keeps the signature: Gradio injects gr.Request by annotation
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (MmpersonaError, ValueError, PermissionError) as e:
                raise gr.Error(str(e)) from e

        return wrapper

    with gr.Blocks(title="mmpersona") as demo:
        mode = ("Signed in: each user sees only their own concepts and preferences." if multi_user else
                "Single-user mode (no --auth): everything here belongs to one local user.")
        gr.Markdown(f"# mmpersona\nPreset **{preset}**. {mode}")

        with gr.Tab("Concepts"):
            gallery = gr.Gallery(label="Your concepts", columns=6, height=220)
            table = gr.Dataframe(headers=["handle", "category", "info", "images", "aliases"], label="Details",
                                 interactive=False)
            with gr.Row():
                c_name = gr.Textbox(label="Name", placeholder="<bo>")
                c_cat = gr.Textbox(label="Category", placeholder="dog")
            c_info = gr.Textbox(label="Info", placeholder="My Shiba Inu, 3 years old")
            c_files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="concept-images")
            with gr.Row():
                add_btn = gr.Button("Add concept", variant="primary")
                edit_btn = gr.Button("Save info/category")
                del_btn = gr.Button("Delete concept", variant="stop")
            c_status = gr.Textbox(label="Status", interactive=False, elem_id="concept-status")
            with gr.Accordion("Import", open=False):
                imp_file = gr.File(label="RAP database or folder (zip), or an mmpersona archive")
                imp_fmt = gr.Radio(["rap", "folder", "archive"], value="rap", label="Format")
                imp_btn = gr.Button("Import")

            @guarded
            def refresh(request: gr.Request):
                user = app.user(request)
                return app.gallery(user), app.concept_table(user)

            @guarded
            def add(name, cat, info, files, request: gr.Request):
                user = app.user(request)
                msg = app.add_concept(user, name, cat, info, files)
                return msg, app.gallery(user), app.concept_table(user)

            @guarded
            def edit(name, cat, info, request: gr.Request):
                user = app.user(request)
                c = app.db.update(user, name, category=cat or None, info=info or None)
                return f"updated {c.handle}", app.gallery(user), app.concept_table(user)

            @guarded
            def delete(name, request: gr.Request):
                user = app.user(request)
                app.db.delete(user, name)
                return f"deleted {name}", app.gallery(user), app.concept_table(user)

            @guarded
            def do_import(upload, fmt, request: gr.Request):
                user = app.user(request)
                if upload is None:
                    raise ValueError("choose a file to import")
                return app.import_upload(user, upload, fmt), app.gallery(user), app.concept_table(user)

            outs = [c_status, gallery, table]
            add_btn.click(add, [c_name, c_cat, c_info, c_files], outs, api_name="add_concept")
            edit_btn.click(edit, [c_name, c_cat, c_info], outs, api_name="edit_concept")
            del_btn.click(delete, [c_name], outs, api_name="delete_concept")
            imp_btn.click(do_import, [imp_file, imp_fmt], outs, api_name="import_concepts")
            demo.load(refresh, None, [gallery, table], api_name="list_concepts")

        with gr.Tab("Chat"):
            with gr.Row():
                ch_image = gr.Image(label="Photo", type="filepath", height=260, elem_id="chat-image")
                chatbot = gr.Chatbot(label="Conversation", height=320, render_markdown=False)  # <bo> stays text
            ch_q = gr.Textbox(label="Question", placeholder="What is <bo> doing?")
            ch_btn = gr.Button("Ask", variant="primary")
            ch_status = gr.Textbox(label="Status", interactive=False, elem_id="chat-status")
            ch_rows = gr.Dataframe(headers=["concept", "score", "source", "box"], label="Retrieved concepts",
                                   interactive=False, elem_id="chat-retrieved")
            ch_thumbs = gr.Gallery(label="Retrieved", columns=6, height=160)

            def ask(image, question, history, request: gr.Request):
                try:
                    user = app.user(request)
                    yield from app.chat(user, image, question, history or [])
                except (MmpersonaError, ValueError, PermissionError) as e:
                    raise gr.Error(str(e)) from e

            ch_btn.click(ask, [ch_image, ch_q, chatbot], [chatbot, ch_rows, ch_thumbs, ch_status], api_name="chat")

        with gr.Tab("Preferences"):
            with gr.Row():
                p_image = gr.Image(label="An image", type="filepath", height=200)
                p_comment = gr.Textbox(label="Comment", placeholder="What you like or dislike about it")
            with gr.Row():
                like_btn = gr.Button("Like")
                dislike_btn = gr.Button("Dislike")
            gr.Markdown("A/B choice")
            with gr.Row():
                ab_a = gr.Image(label="A", type="filepath", height=160)
                ab_b = gr.Image(label="B", type="filepath", height=160)
            ab_prompt = gr.Textbox(label="Prompt both were made for")
            with gr.Row():
                a_btn = gr.Button("A is better")
                b_btn = gr.Button("B is better")
            with gr.Row():
                liked = gr.Textbox(label="Liked attributes (comma-separated)")
                disliked = gr.Textbox(label="Disliked attributes (comma-separated)")
            with gr.Row():
                save_attr = gr.Button("Save attributes")
                extract_attr = gr.Button("Derive from comments (VLM)")
                train_btn = gr.Button("Train reward model", variant="primary")
            p_status = gr.Textbox(label="Status", interactive=False, elem_id="profile-status")

            def attrs_text(profile):
                a = profile.attributes
                return ", ".join(a.liked), ", ".join(a.disliked)

            def record(kind, image, comment, request):
                if image is None:
                    raise ValueError("choose an image first")
                profile = app.profile(app.user(request))
                getattr(profile, kind)(image, comment=comment or "")
                return f"{kind}d the image ({len(profile.events(kind))} in total)"

            def choose(which, a, b, prompt, request):
                if a is None or b is None:
                    raise ValueError("choose both images")
                profile = app.profile(app.user(request))
                chosen, rejected = (a, b) if which == "A" else (b, a)
                profile.compare(prompt, chosen, rejected)
                return f"recorded a choice ({len(profile.events('pair'))} in total)"

            @guarded
            def save_attributes(lk, dl, request: gr.Request):
                profile = app.profile(app.user(request))
                split = [x.strip() for x in (lk or "").split(",") if x.strip()]
                split_d = [x.strip() for x in (dl or "").split(",") if x.strip()]
                profile.set_attributes(split, split_d)
                return (*attrs_text(profile), "attributes saved")

            @guarded
            def derive(request: gr.Request):
                profile = app.profile(app.user(request))
                vlm = app.vlm_pipe.vlm
                with app._vlm_lock:  # the chat tab generates with the same model
                    profile.extract_attributes(vlm)
                return (*attrs_text(profile), "attributes derived from your comments")

            @guarded
            def train(request: gr.Request):
                model = app.profile(app.user(request)).train_reward()
                if model.cold_start:
                    return "no preferences yet: the reward model stays neutral"
                acc = model.held_out_accuracy
                return (f"reward model trained on {model.pairs} choices, {model.likes} likes, {model.dislikes} "
                        f"dislikes; held-out accuracy: {acc if acc is not None else 'n/a (too few examples)'}")

            @guarded
            def load_attrs(request: gr.Request):
                return attrs_text(app.profile(app.user(request)))

            @guarded
            def like(image, comment, request: gr.Request):
                return record("like", image, comment, request)

            @guarded
            def dislike(image, comment, request: gr.Request):
                return record("dislike", image, comment, request)

            @guarded
            def choose_a(a, b, prompt, request: gr.Request):
                return choose("A", a, b, prompt, request)

            @guarded
            def choose_b(a, b, prompt, request: gr.Request):
                return choose("B", a, b, prompt, request)

            like_btn.click(like, [p_image, p_comment], p_status, api_name="like")
            dislike_btn.click(dislike, [p_image, p_comment], p_status, api_name="dislike")
            a_btn.click(choose_a, [ab_a, ab_b, ab_prompt], p_status, api_name="choose_a")
            b_btn.click(choose_b, [ab_a, ab_b, ab_prompt], p_status, api_name="choose_b")
            save_attr.click(save_attributes, [liked, disliked], [liked, disliked, p_status],
                            api_name="save_attributes")
            extract_attr.click(derive, None, [liked, disliked, p_status], api_name="extract_attributes")
            train_btn.click(train, None, p_status, api_name="train_reward")
            demo.load(load_attrs, None, [liked, disliked])

        with gr.Tab("Generate"):
            g_prompt = gr.Textbox(label="Prompt", placeholder="a photo of <bo> on the beach")
            with gr.Row():
                g_strats = gr.CheckboxGroup(STRATEGY_CHOICES, value=["attributes", "ip_adapter", "rerank"],
                                            label="Strategies")
                g_n = gr.Slider(1, 4, value=1, step=1, label="Images")
                g_steps = gr.Slider(1, 50, value=20 if preset == "default" else 4, step=1, label="Steps")
                g_seed = gr.Number(value=0, precision=0, label="Seed")
            g_compare = gr.Checkbox(value=False, label="Also generate without personalization (twice the time)")
            g_btn = gr.Button("Generate", variant="primary")
            with gr.Row():
                g_mine = gr.Gallery(label="Personalized (reward score)", columns=2, height=260, elem_id="generated")
                g_plain = gr.Gallery(label="Vanilla", columns=2, height=260)
            g_meta = gr.File(label="Metadata (JSON)")

            @guarded
            def gen(prompt, strategies, n, steps, seed, compare, request: gr.Request, progress=gr.Progress()):
                progress(0, desc="generating")
                return app.generate(app.user(request), prompt, list(strategies or []), int(n), int(steps), int(seed),
                                    bool(compare))

            g_btn.click(gen, [g_prompt, g_strats, g_n, g_steps, g_seed, g_compare], [g_mine, g_plain, g_meta],
                        api_name="generate")
    demo.mmpersona_app = app
    return demo


def parse_auth(items: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"--auth expects USER:PASS, got {item!r}")
        out.append((user, password))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "default"])
    parser.add_argument("--db", default=os.environ.get("MMPERSONA_DB"),
                        help="concept database: a path or postgresql:// URL (default: env MMPERSONA_DB, else the user data dir)")
    parser.add_argument("--auth", action="append", metavar="USER:PASS", help="a login (repeatable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    auth = parse_auth(args.auth)
    demo = build_app(args.preset, args.db, multi_user=bool(auth), device=args.device)
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                   auth=auth or None)


if __name__ == "__main__":
    main()
