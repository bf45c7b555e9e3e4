"""mmpersona demo app: your concepts, personalized chat, your taste, personalized generation.

    python gradio_app.py [--preset tiny|default] [--db PATH] [--host H] [--port P]
    python gradio_app.py --auth-file logins.txt                                    # several users

Built only on the public Python API. With logins (`--auth-file`, one `user:password` per line; never on the
command line, where every local user can read it) each logged-in user sees and changes only their own data;
without them the app runs single-user (as user "default") and says so. README "The app with several users"
says how results and files are kept to the user who made them.
Requires the `app` extra: pip install "mmpersona[app]".
"""


import argparse
import base64
import functools
import hmac
import html
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

logger = logging.getLogger("mmpersona.app")
SINGLE_USER = "default"
STRATEGY_CHOICES = ["attributes", "ip_adapter", "subject", "rerank", "lora"]

# What one request may ask of the shared models (one client must not stall everyone).
MAX_QUESTION_CHARS = 2_000
MAX_MESSAGE_CHARS = 4_000  # one earlier message of the chat history
MAX_HISTORY_TURNS = 20  # earlier messages sent to the model (the oldest are dropped)
MAX_HISTORY_CHARS = 12_000
MAX_PROMPT_CHARS = 1_000  # a generation prompt
MAX_IMAGES_PER_ADD = 32
MAX_UPLOAD = "64mb"  # Gradio refuses larger uploads before they are stored
CACHE_SECONDS = 3600  # Gradio deletes its cached uploads and outputs older than this, every this often
THUMB_SIZE = 160
MAX_IMAGES = 4  # images per generation, each with its own feedback buttons
# Taste onboarding: pairs generated from these prompts (or the user's own), the user picks one of each pair.
TASTE_PROMPTS = [
    "a cozy reading corner by a window", "a portrait of an old fisherman", "a mountain lake at dawn",
    "a bowl of ramen on a wooden table", "a city street at night in the rain", "a cat asleep on a sofa",
    "a lighthouse on a rocky coast", "a bouquet of wild flowers",
]
TASTE_GOAL = 8  # choices the progress counts towards (PPD personalizes from as few as four)
TRAIN_EVERY = 4  # choices between two background trainings of the reward model
PROFILE_SHOWN = 100  # profile entries listed (the newest), each with its thumbnails and remove button


class App:
    """Shared state: one concept database (thread-safe) and lazily loaded models, each used under its lock."""

    def __init__(self, preset: str = "tiny", db_path: str | Path | None = None, device: str = "auto",
                 multi_user: bool = False):
        from mmpersona import ConceptDB

        self.preset, self.device, self.multi_user = preset, device, multi_user
        self.db = ConceptDB(db_path, preset=preset, device=device)
        self._vlm_pipe = None
        self._region_pipe = None
        self._t2i_pipe = None
        self._vlm_lock = threading.Lock()
        self._t2i_lock = threading.Lock()
        self._thumb_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.steps = 20 if preset == "default" else 4  # generation steps the app's own pairs use
        self._training: dict[str, str] = {}  # user -> the reward model's training status, shown on the page
        self._train_lock = threading.Lock()

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
    def region_pipe(self):
        """The chat pipeline that also finds each concept in the photo: regions from the detector, one concept
        per region (built once, sharing the chat pipeline's models)."""
        base = self.vlm_pipe
        with self._vlm_lock:
            if self._region_pipe is None:
                self._region_pipe = base.variant(regions=True, assign=True)
        return self._region_pipe

    @property
    def t2i_pipe(self):
        from pipelines import PersonalizedT2IPipeline

        with self._t2i_lock:
            if self._t2i_pipe is None:
                self._t2i_pipe = PersonalizedT2IPipeline(self.db, preset=self.preset, device=self.device)
        return self._t2i_pipe

    # ------------------------------------------------------------------ concepts

    def thumbnail(self, user: str, image_hash: str) -> str:
        """A small data-URI thumbnail of one of the user's images, made once per (user, image) and served inline,
        never as a file another user could fetch. Made from `image_bytes(user, ...)`, which refuses an image
        that is not the user's; kept per user, so no user is ever served from another's entry."""
        key = (user, image_hash)
        with self._thumb_lock:
            cached = self._thumbs.get(key)
            if cached is not None:
                self._thumbs.move_to_end(key)
                return cached
        cached = data_uri(self.db.store.image_bytes(user, image_hash), THUMB_SIZE)
        with self._thumb_lock:
            self._thumbs[key] = cached
            while len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return cached

    def gallery(self, user: str) -> str:
        cards = [(self.thumbnail(user, c.images[0]) if c.images else None, c.handle,
                  f"{c.category or '-'} · {len(c.images)} image(s)") for c in self.db.list(user, limit=500)]
        return grid_html(cards, empty="No concepts yet: add one below.", size=120, elem="concept")

    def concept_choices(self, user: str) -> list[str]:
        return [c.handle for c in self.db.list(user, limit=500)]

    def concept_fields(self, user: str, ref: str | None) -> tuple[str, str, str, str]:
        """(name, category, info, aliases) of a concept, for the edit form; empty for none."""
        if not ref:
            return "", "", "", ""
        c = self.db.resolve(user, ref)
        return c.handle, c.category, c.info, ", ".join(c.aliases)

    def save_concept(self, user: str, ref: str, name: str, category: str, info: str, aliases: str) -> tuple[str, str]:
        """Store the edit form; returns (status, the concept's handle now)."""
        if not ref:
            raise ValueError("pick a concept to edit first")
        names = [a.strip() for a in (aliases or "").split(",") if a.strip()]
        c = self.db.resolve(user, ref)
        c = self.db.update(user, c.id, name=(name or "").strip() or None, category=category or "", info=info or "",
                           aliases=names)
        return f"saved {c.handle}", c.handle

    def add_concept_images(self, user: str, ref: str, files: list | None) -> str:
        paths = [f if isinstance(f, str) else f.name for f in files or []]
        if not ref:
            raise ValueError("pick a concept to edit first")
        if not paths:
            raise ValueError("choose the images to add")
        if len(paths) > MAX_IMAGES_PER_ADD:
            raise ValueError(f"{len(paths)} images at once is over the limit of {MAX_IMAGES_PER_ADD}")
        c = self.db.add_images(user, ref, paths)
        return f"{c.handle} has {len(c.images)} image(s)"

    def remove_concept_image(self, user: str, ref: str, image_hash: str) -> str:
        c = self.db.remove_image(user, ref, image_hash)
        return f"removed an image of {c.handle}: {len(c.images)} left"

    def delete_concept(self, user: str, ref: str) -> str:
        if not ref:
            raise ValueError("pick a concept first")
        return f"deleted {self.db.delete(user, ref).handle}"

    def concept_table(self, user: str) -> list[list[Any]]:
        return [[c.handle, c.category, c.info, len(c.images), ", ".join(c.aliases)]
                for c in self.db.list(user, limit=500)]

    def add_concept(self, user: str, name: str, category: str, info: str, files: list | None):
        paths = [f if isinstance(f, str) else f.name for f in files or []]
        if not paths:
            raise ValueError("add at least one image of the concept")
        if len(paths) > MAX_IMAGES_PER_ADD:
            raise ValueError(f"{len(paths)} images at once is over the limit of {MAX_IMAGES_PER_ADD}")
        c = self.db.add(user, name, paths, category=category or "", info=info or "")
        return f"added {c.handle} with {len(c.images)} image(s)"

    def import_upload(self, user: str, upload: Any, fmt: str) -> str:
        """Import an uploaded archive, or a zipped RAP database / folder: unpacked by the same checked reader
        as archives (limits on members, sizes and compression ratio, checked before a byte is written), into a
        temporary folder that is removed afterwards."""
        from mmpersona.safe_io import SafeZip, UnsafeInputError

        path = Path(upload if isinstance(upload, str) else upload.name)
        if fmt == "archive":
            report = self.db.import_concepts(user, path, "archive", progress=False)
        else:
            with tempfile.TemporaryDirectory(prefix="mmpersona-import-") as tmp:
                try:
                    with SafeZip(path) as archive:
                        archive.extract_to(tmp)
                except UnsafeInputError as e:
                    raise ValueError(f"the upload is not a usable zip of a {fmt} database: {e}") from e
                roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
                root = roots[0] if len(roots) == 1 and not (Path(tmp) / "database.json").exists() else Path(tmp)
                report = self.db.import_concepts(user, root, fmt, progress=False)
        lines = [f"imported {len(report.added)} concept(s)"] + [f"skipped {i}: {r}" for i, r in report.skipped]
        return "\n".join(lines)

    # ------------------------------------------------------------------ chat

    def chat(self, user: str, image: Any, question: str, history: list[dict], regions: bool = False):
        """Yields (chat messages, retrieved rows, retrieved thumbnails, the photo with each region-retrieved
        concept's box, label and score drawn, status) as the answer streams. `regions`: find each concept in
        the photo (detector regions, one concept per region)."""
        question = question or ""
        if len(question) > MAX_QUESTION_CHARS:
            raise ValueError(f"the question is {len(question)} characters, over the limit of {MAX_QUESTION_CHARS}")
        turns = bounded_history(history)
        pipe = self.region_pipe if regions else self.vlm_pipe
        shown = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        with self._vlm_lock:  # one generation at a time on the shared model
            stream = pipe.stream(image, question, user=user, history=turns)
            for piece in stream:
                shown[-1]["content"] += piece
                yield shown, [], "", "", "answering..."
        answer = stream.result
        rows = [[r.concept.handle, round(r.score, 4), r.source, str(r.box) if r.box else ""] for r in answer.retrieved]
        thumbs = grid_html([(self.thumbnail(user, r.image or r.concept.images[0]), r.concept.handle,
                             f"{r.score:.3f} · {r.source}") for r in answer.retrieved if r.concept.images],
                           empty="", size=88, elem="retrieved")
        status = ("no concept recognised: answered without personal context" if answer.abstained else
                  "used " + ", ".join(r.concept.handle for r in answer.retrieved))
        shown[-1]["content"] = answer.answer or "(the model gave an empty answer)"
        yield shown, rows, thumbs, boxes_html(image, answer.retrieved), status

    # ------------------------------------------------------------------ preferences

    def profile(self, user: str):
        from mmpersona import PreferenceProfile

        return PreferenceProfile(self.db, user)

    def taste_pair(self, user: str, prompts: str, step: int) -> dict[str, Any]:
        """The onboarding's next pair: two images of one prompt (the user's prompts, one per line, or the built-in
        set), made without personalization from two seeds. Kept in the page's session state as PNG bytes."""
        own = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if any(len(p) > MAX_PROMPT_CHARS for p in own):
            raise ValueError(f"a prompt is over the limit of {MAX_PROMPT_CHARS} characters")
        pool = own or TASTE_PROMPTS
        prompt = pool[step % len(pool)]
        pipe = self.t2i_pipe
        with self._t2i_lock:
            result = pipe(prompt, user=user, n=2, steps=self.steps, seed=1000 + 2 * step, strategies=[])
        return {"prompt": prompt, "images": [png_bytes(img) for img in result.images], "step": step}

    def taste_choose(self, user: str, pair: dict | None, which: str, comment: str) -> str:
        """Store the choice between the pair's images (`A` or `B`) as a pair event; every TRAIN_EVERY choices
        the reward model trains again in the background."""
        if not pair or len(pair.get("images", [])) != 2:
            raise ValueError("start the onboarding first: there is no pair to choose from")
        a, b = pair["images"]
        chosen, rejected = (a, b) if which == "A" else (b, a)
        profile = self.profile(user)
        profile.compare(pair["prompt"], chosen, rejected, comment=comment or "")
        count = len(profile.events("pair"))
        if count % TRAIN_EVERY == 0:
            self.train_in_background(user)
        return f"choice {count} stored: {which} for {pair['prompt']!r}"

    def taste_progress(self, user: str) -> str:
        count = len(self.profile(user).events("pair"))
        done = min(count, TASTE_GOAL)
        bar = (f'<progress id="taste-bar" max="{TASTE_GOAL}" value="{done}" style="width:100%"></progress>'
               f'<p id="taste-count">{count} choice(s) made; {max(TASTE_GOAL - count, 0)} more for a first profile '
               f'(the reward model trains after every {TRAIN_EVERY}).</p>')
        return bar

    def train_in_background(self, user: str) -> None:
        """Train the user's reward model in a thread of its own (one at a time per user); its status is kept
        for the page to show."""
        with self._train_lock:
            if self._training.get(user, "").startswith("training"):
                return
            self._training[user] = "training the reward model..."

        def run() -> None:
            try:
                model = self.profile(user).train_reward()
                acc = model.held_out_accuracy
                text = ("reward model: no data yet" if model.cold_start else
                        f"reward model trained on {model.pairs} choice(s), {model.likes} like(s), {model.dislikes} "
                        f"dislike(s); held-out accuracy: {f'{acc:.2f}' if acc is not None else 'n/a (too few)'}")
            except Exception as e:  # noqa: BLE001 - shown on the page, and logged
                logger.exception("reward training for %s failed", user)
                text = f"reward model training failed: {e}"
            with self._train_lock:
                self._training[user] = text

        threading.Thread(target=run, name=f"reward-{user}", daemon=True).start()

    def training_status(self, user: str) -> str:
        with self._train_lock:
            return self._training.get(user, "")

    def feedback(self, user: str, kind: str, generated: dict | None, index: int, comment: str) -> str:
        """Feedback on one generated image: `like`, `dislike`, or `choose` (this one over each of the other images
        of the same prompt: one pair event per other image)."""
        images = (generated or {}).get("images", [])
        if not 0 <= index < len(images):
            raise ValueError("there is no such image: generate first")
        profile = self.profile(user)
        if kind in ("like", "dislike"):
            getattr(profile, kind)(images[index], comment=comment or "")
            return f"{kind}d image {index + 1} ({len(profile.events(kind))} {kind}(s) in total)"
        others = [img for j, img in enumerate(images) if j != index]
        if not others:
            raise ValueError("one image alone cannot be chosen over others: generate two or more")
        for other in others:
            profile.compare(generated["prompt"], images[index], other, comment=comment or "")
        return f"chose image {index + 1} over {len(others)} other(s) ({len(profile.events('pair'))} choice(s) in total)"

    def profile_entries(self, user: str, *, thumbs: int = PROFILE_SHOWN) -> list[dict[str, Any]]:
        """The profile's likes, dislikes and choices, newest first, for the page; the first `thumbs` of them with
        their thumbnails."""
        out = []
        for e in reversed(self.profile(user).events()):
            if e.kind == "prompt":
                continue
            hashes = [h for h in (e.image, e.other) if h] if len(out) < thumbs else []
            out.append({"id": e.id, "kind": e.kind, "prompt": e.prompt, "comment": e.comment,
                        "thumbs": [self.thumbnail(user, h) for h in hashes]})
        return out

    def generate(self, user: str, prompt: str, strategies: list[str], n: int, steps: int, seed: int,
                 compare: bool = False):
        """The personalized images (inline HTML), and with `compare` the vanilla ones (same seeds: twice the
        cost), and the metadata as JSON (no file is written)."""
        if len(prompt or "") > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}")
        pipe = self.t2i_pipe
        with self._t2i_lock:
            mine = pipe(prompt, user=user, n=n, steps=steps, seed=seed, strategies=strategies)
            vanilla = pipe(prompt, user=user, n=n, steps=steps, seed=seed, strategies=[]) if compare else None
        return (cards_html([(image_uri(img), f"score {s:.3f}") for img, s in zip(mine.images, mine.scores, strict=True)],
                           empty=""),
                cards_html([(image_uri(img), "vanilla") for img in vanilla.images], empty="") if vanilla else "",
                {"personalized": mine.metadata, "vanilla": vanilla.metadata if vanilla else None},
                {"prompt": prompt, "images": [png_bytes(img) for img in mine.images]})


def bounded_history(history: Any) -> list[dict]:
    """The chat history a client sent, as model turns within the limits: each message at most
    MAX_MESSAGE_CHARS (longer is refused), the most recent MAX_HISTORY_TURNS within MAX_HISTORY_CHARS."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise ValueError("the chat history must be a list of messages")
    turns, total = [], 0
    for m in reversed(history[-4 * MAX_HISTORY_TURNS:]):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            continue
        text = _text(m.get("content", ""))
        if len(text) > MAX_MESSAGE_CHARS:
            raise ValueError(f"a chat message of {len(text)} characters is over the limit of {MAX_MESSAGE_CHARS}")
        if len(turns) >= MAX_HISTORY_TURNS or total + len(text) > MAX_HISTORY_CHARS:
            break
        total += len(text)
        turns.append({"role": m["role"], "content": [{"type": "text", "text": text}]})
    return turns[::-1]


def data_uri(data: bytes, size: int) -> str:
    """A WebP data URI of an encoded image, shrunk to fit `size` (decoded by the project's safe loader)."""
    from mmpersona import load_image

    img = load_image(data)
    img.thumbnail((size, size))
    return image_uri(img)


def image_uri(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=90)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def boxes_html(image: Any, retrieved: list) -> str:
    """The photo with each region-retrieved concept's box, label and score drawn (inline; empty when no
    concept came with a box)."""
    from mmpersona import load_image
    from pipelines.marks import draw_marks

    marks = [(f"{r.concept.handle} {r.score:.2f}", r.box) for r in retrieved if r.box is not None]
    if not marks or image is None:
        return ""
    drawn = draw_marks(load_image(image), marks)
    drawn.thumbnail((640, 640))
    labels = ", ".join(label for label, _ in marks)
    return (f'<img src="{image_uri(drawn)}" alt="{html.escape(labels)}" style="max-width:100%" '
            f'data-boxes="{len(marks)}">')


def cards_html(cards: list[tuple[str | None, str]], *, empty: str, size: int = 180) -> str:
    """Images with captions as inline HTML: the image data travels in the page, not as a cached file URL."""
    return grid_html([(uri, caption, "") for uri, caption in cards], empty=empty, size=size)


def grid_html(cards: list[tuple[str | None, str, str]], *, empty: str, size: int = 120, elem: str = "card") -> str:
    """A thumbnail grid: square tiles of `size` px, each image whole (letterboxed, never cropped), its title and
    detail readable under it. Inline: the image data travels in the page, not as a cached file URL."""
    if not cards:
        return f"<p>{html.escape(empty)}</p>" if empty else ""
    tile = (f"width:{size}px;height:{size}px;object-fit:contain;background:#f1f1f1;border-radius:6px;"
            "display:block")
    items = "".join(
        f'<figure class="mmp-{elem}" style="margin:0;width:{size}px">'
        + (f'<img src="{uri}" alt="{html.escape(title)}" style="{tile}">' if uri else
           f'<div style="{tile}"></div>')
        + f'<figcaption style="font-size:13px;line-height:1.3;overflow-wrap:anywhere"><b>{html.escape(title)}</b>'
        + (f'<br><span style="opacity:.75">{html.escape(detail)}</span>' if detail else "")
        + "</figcaption></figure>" for uri, title, detail in cards)
    return (f'<div class="mmp-grid" style="display:grid;grid-template-columns:repeat(auto-fill,{size}px);'
            f'gap:10px">{items}</div>')


def image_uri_bytes(data: bytes) -> str:
    """A data URI of PNG bytes (generated images: shown as made, not re-encoded)."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def png_bytes(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


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

    with gr.Blocks(title="mmpersona", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        mode = ("Signed in: each user sees only their own concepts and preferences." if multi_user else
                "Single-user mode (no --auth): everything here belongs to one local user.")
        gr.Markdown(f"# mmpersona\nPreset **{preset}**. {mode}")
        # bumped by every change to the profile, in any tab: the profile list renders again
        profile_tick = gr.State(0)

        with gr.Tab("Concepts"):
            concepts_tab(gr, app, guarded, demo)
        with gr.Tab("Chat"):
            chat_tab(gr, app)
        with gr.Tab("Taste"):
            taste_tab(gr, app, guarded, demo, profile_tick)
        with gr.Tab("Generate"):
            generate_tab(gr, app, guarded, preset, profile_tick)
        with gr.Tab("Profile"):
            profile_tab(gr, app, guarded, demo, profile_tick)
    demo.mmpersona_app = app
    return demo


# ------------------------------------------------------------------------------------------ the tabs


def concepts_tab(gr, app: App, guarded, demo) -> None:
    """A thumbnail grid; an add form that clears after each add; an edit form for the concept picked from the
    list (its images as thumbnails, each with a remove button; images added to it; delete after a confirmation)."""
    tick = gr.State(0)  # bumped by every change: the edited concept's images render again
    gallery = gr.HTML(label="Your concepts", elem_id="concept-gallery")
    table = gr.Dataframe(headers=["handle", "category", "info", "images", "aliases"], label="Details",
                         interactive=False)
    status = gr.Textbox(label="Status", interactive=False, elem_id="concept-status")
    with gr.Accordion("Add a concept", open=True):
        with gr.Row():
            c_name = gr.Textbox(label="Name", placeholder="<bo>", elem_id="add-name")
            c_cat = gr.Textbox(label="Category", placeholder="dog", elem_id="add-category")
        c_info = gr.Textbox(label="Info", placeholder="My Shiba Inu, 3 years old", elem_id="add-info")
        c_files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="concept-images",
                          height=140)
        add_btn = gr.Button("Add concept", variant="primary")
    with gr.Accordion("Edit a concept", open=True):
        # a typed name works too (and API clients send names): each handler resolves it in the user's own concepts
        pick = gr.Dropdown(label="Concept to edit", choices=[], value=None, elem_id="edit-pick",
                           allow_custom_value=True)
        with gr.Row():
            e_name = gr.Textbox(label="Edit name", elem_id="edit-name")
            e_cat = gr.Textbox(label="Edit category", elem_id="edit-category")
            e_aliases = gr.Textbox(label="Aliases (comma-separated)", elem_id="edit-aliases")
        e_info = gr.Textbox(label="Edit info", elem_id="edit-info")

        @gr.render(inputs=[pick, tick])
        def concept_images(ref, _tick, request: gr.Request):
            if not ref:
                return
            from concept_db import ConceptNotFound

            user = app.user(request)
            try:
                concept = app.db.resolve(user, ref)
            except ConceptNotFound:  # deleted or renamed meanwhile, or a name typed: nothing to show
                return
            with gr.Row(elem_id="edit-images"):
                for number, h in enumerate(concept.images, 1):
                    with gr.Column(min_width=130, scale=0):
                        gr.HTML(grid_html([(app.thumbnail(user, h), f"image {number}", h[:8])], empty="",
                                          size=110, elem="edit-image"))
                        remove = gr.Button(f"Remove image {number}", size="sm", elem_classes=["remove-image"])

                        @guarded
                        def remove_image(ref, count, request: gr.Request, h=h):
                            user = app.user(request)
                            msg = app.remove_concept_image(user, ref, h)
                            return msg, count + 1, app.gallery(user), app.concept_table(user)

                        remove.click(remove_image, [pick, tick], [status, tick, gallery, table])

        e_files = gr.File(label="Add images to it", file_count="multiple", file_types=["image"],
                          elem_id="edit-images-upload", height=140)
        with gr.Row():
            save_btn = gr.Button("Save changes")
            more_btn = gr.Button("Add these images")
            del_btn = gr.Button("Delete concept", variant="stop")
        with gr.Row(visible=False, elem_id="delete-confirm") as confirm_row:
            confirm_text = gr.Markdown()
            yes_btn = gr.Button("Yes, delete it", variant="stop")
            no_btn = gr.Button("Cancel")
    with gr.Accordion("Import", open=False):
        imp_file = gr.File(label="RAP database or folder (zip), or an mmpersona archive")
        imp_fmt = gr.Radio(["rap", "folder", "archive"], value="rap", label="Format")
        imp_btn = gr.Button("Import")

    def views(user: str, selected: str | None = None):
        """Gallery, table and the pick list (keeping `selected` when it still exists)."""
        choices = app.concept_choices(user)
        return (app.gallery(user), app.concept_table(user),
                gr.update(choices=choices, value=selected if selected in choices else None))

    @guarded
    def refresh(request: gr.Request):
        return views(app.user(request))

    @guarded
    def add(name, cat, info, files, request: gr.Request):
        user = app.user(request)
        msg = app.add_concept(user, name, cat, info, files)
        # stored: the whole form is cleared, so the next concept starts from nothing (no photos carried over)
        return (msg, *views(user), None, "", "", "")

    @guarded
    def fill(ref, request: gr.Request):
        return app.concept_fields(app.user(request), ref)

    @guarded
    def save(ref, name, cat, info, aliases, count, request: gr.Request):
        user = app.user(request)
        msg, handle = app.save_concept(user, ref, name, cat, info, aliases)
        return (msg, *views(user, handle), count + 1)

    @guarded
    def add_more(ref, files, count, request: gr.Request):
        user = app.user(request)
        msg = app.add_concept_images(user, ref, files)
        return msg, app.gallery(user), app.concept_table(user), count + 1, gr.update(value=None)

    @guarded
    def ask_delete(ref, request: gr.Request):
        if not ref:
            raise ValueError("pick a concept first")
        c = app.db.resolve(app.user(request), ref)
        return gr.update(visible=True), f"Delete **{html.escape(c.handle)}** and its {len(c.images)} image(s)?"

    @guarded
    def delete(ref, request: gr.Request):
        user = app.user(request)
        msg = app.delete_concept(user, ref)
        return (msg, *views(user), gr.update(visible=False), "", "", "", "")

    @guarded
    def do_import(upload, fmt, request: gr.Request):
        user = app.user(request)
        if upload is None:
            raise ValueError("choose a file to import")
        return (app.import_upload(user, upload, fmt), *views(user))

    listing = [gallery, table, pick]
    add_btn.click(add, [c_name, c_cat, c_info, c_files], [status, *listing, c_files, c_name, c_cat, c_info],
                  api_name="add_concept")
    pick.change(fill, [pick], [e_name, e_cat, e_info, e_aliases], api_name="concept_fields")
    save_btn.click(save, [pick, e_name, e_cat, e_info, e_aliases, tick], [status, *listing, tick],
                   api_name="edit_concept")
    more_btn.click(add_more, [pick, e_files, tick], [status, gallery, table, tick, e_files],
                   api_name="add_concept_images")
    del_btn.click(ask_delete, [pick], [confirm_row, confirm_text], api_visibility="private")
    yes_btn.click(delete, [pick], [status, *listing, confirm_row, e_name, e_cat, e_info, e_aliases],
                  api_name="delete_concept")
    no_btn.click(lambda: gr.update(visible=False), None, confirm_row, api_visibility="private")
    imp_btn.click(do_import, [imp_file, imp_fmt], [status, *listing], api_name="import_concepts")
    demo.load(refresh, None, listing, api_name="list_concepts")


def chat_tab(gr, app: App) -> None:
    from mmpersona import MmpersonaError

    with gr.Row():
        ch_image = gr.Image(label="Photo", type="filepath", height=260, elem_id="chat-image")
        chatbot = gr.Chatbot(label="Conversation", height=320, render_markdown=False)  # <bo> stays text
    ch_q = gr.Textbox(label="Question", placeholder="What is <bo> doing?")
    ch_regions = gr.Checkbox(label="Find each concept in the photo (regions)", value=False, elem_id="chat-regions")
    ch_btn = gr.Button("Ask", variant="primary")
    ch_status = gr.Textbox(label="Status", interactive=False, elem_id="chat-status")
    with gr.Row():
        ch_thumbs = gr.HTML(label="Retrieved", elem_id="chat-thumbs")
        ch_boxes = gr.HTML(label="Where", elem_id="chat-boxes")
    ch_rows = gr.Dataframe(headers=["concept", "score", "source", "box"], label="Retrieved concepts",
                           interactive=False, elem_id="chat-retrieved")

    def ask(image, question, history, regions, request: gr.Request):
        try:
            user = app.user(request)
            yield from app.chat(user, image, question, history or [], bool(regions))
        except (MmpersonaError, ValueError, PermissionError) as e:
            raise gr.Error(str(e)) from e

    ch_btn.click(ask, [ch_image, ch_q, chatbot, ch_regions], [chatbot, ch_rows, ch_thumbs, ch_boxes, ch_status],
                 api_name="chat")


def taste_tab(gr, app: App, guarded, demo, profile_tick) -> None:
    """Onboarding: the app shows pairs of images it generates, the user picks A or B (or skips), with an optional
    comment; each choice is a pair event; the reward model trains in the background every few choices."""
    pair = gr.State(None)
    gr.Markdown("Pick the image you like better in each pair. Every choice goes into your profile; after every "
                f"{TRAIN_EVERY} choices your personal reward model trains in the background.")
    t_prompts = gr.Textbox(label="Your own prompts (optional, one per line)", lines=2, elem_id="taste-prompts")
    start_btn = gr.Button("Show me a pair", variant="primary", elem_id="taste-start")
    t_prompt = gr.Markdown(elem_id="taste-prompt")
    with gr.Row():
        t_a = gr.HTML(label="A", elem_id="taste-a")
        t_b = gr.HTML(label="B", elem_id="taste-b")
    t_comment = gr.Textbox(label="Why (optional)", placeholder="warmer light, less clutter", elem_id="taste-comment")
    with gr.Row():
        a_btn = gr.Button("A is better", elem_id="taste-choose-a")
        b_btn = gr.Button("B is better", elem_id="taste-choose-b")
        skip_btn = gr.Button("Skip", elem_id="taste-skip")
    t_status = gr.Textbox(label="Status", interactive=False, elem_id="taste-status")
    t_progress = gr.HTML(elem_id="taste-progress")
    t_reward = gr.Markdown(elem_id="taste-reward")
    timer = gr.Timer(1.5, active=False)

    def show(p):
        return (f"**{html.escape(p['prompt'])}**", cards_html([(image_uri_bytes(p["images"][0]), "A")], empty=""),
                cards_html([(image_uri_bytes(p["images"][1]), "B")], empty=""))

    @guarded
    def next_pair(prompts, current, request: gr.Request, progress=gr.Progress()):
        user = app.user(request)
        progress(0, desc="generating a pair")
        step = (current or {}).get("step", len(app.profile(user).events("pair")) - 1) + 1
        p = app.taste_pair(user, prompts, step)
        return (p, *show(p), app.taste_progress(user), "")

    def choose(which, prompts, current, comment, count, request, progress):
        user = app.user(request)
        msg = app.taste_choose(user, current, which, comment)
        training = app.training_status(user).startswith("training")
        progress(0, desc="generating the next pair")
        p = app.taste_pair(user, prompts, current["step"] + 1)
        return (p, *show(p), app.taste_progress(user), msg, "", count + 1, app.training_status(user),
                gr.Timer(active=training))

    @guarded
    def choose_a(prompts, current, comment, count, request: gr.Request, progress=gr.Progress()):
        return choose("A", prompts, current, comment, count, request, progress)

    @guarded
    def choose_b(prompts, current, comment, count, request: gr.Request, progress=gr.Progress()):
        return choose("B", prompts, current, comment, count, request, progress)

    @guarded
    def skip(prompts, current, request: gr.Request, progress=gr.Progress()):
        user = app.user(request)
        if not current:
            raise ValueError("start the onboarding first")
        progress(0, desc="generating the next pair")
        p = app.taste_pair(user, prompts, current["step"] + 1)
        return (p, *show(p), app.taste_progress(user), "skipped")

    @guarded
    def poll(request: gr.Request):
        text = app.training_status(app.user(request))
        return text, gr.Timer(active=text.startswith("training"))

    @guarded
    def load(request: gr.Request):
        user = app.user(request)
        return app.taste_progress(user), app.training_status(user)

    shown = [pair, t_prompt, t_a, t_b, t_progress]
    start_btn.click(next_pair, [t_prompts, pair], [*shown, t_status], api_name="taste_pair")
    chosen = [*shown, t_status, t_comment, profile_tick, t_reward, timer]
    a_btn.click(choose_a, [t_prompts, pair, t_comment, profile_tick], chosen, api_name="taste_choose_a")
    b_btn.click(choose_b, [t_prompts, pair, t_comment, profile_tick], chosen, api_name="taste_choose_b")
    skip_btn.click(skip, [t_prompts, pair], [*shown, t_status], api_name="taste_skip")
    timer.tick(poll, None, [t_reward, timer], api_visibility="private")
    demo.load(load, None, [t_progress, t_reward], api_visibility="private")


def generate_tab(gr, app: App, guarded, preset: str, profile_tick) -> None:
    """Personalized generation; under each image, like, dislike and "this one" (chosen over the others of the
    same prompt), stored in the profile at once."""
    generated = gr.State(None)
    g_prompt = gr.Textbox(label="Prompt", placeholder="a photo of <bo> on the beach", elem_id="generate-prompt")
    with gr.Row():
        g_strats = gr.CheckboxGroup(STRATEGY_CHOICES, value=["attributes", "ip_adapter", "rerank"], label="Strategies")
        g_n = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Images")
        g_steps = gr.Slider(1, 50, value=20 if preset == "default" else 4, step=1, label="Steps")
        g_seed = gr.Number(value=0, precision=0, label="Seed")
    g_compare = gr.Checkbox(value=False, label="Also generate without personalization (twice the time)")
    g_btn = gr.Button("Generate", variant="primary")
    g_status = gr.Textbox(label="Status", interactive=False, elem_id="generate-status")
    g_comment = gr.Textbox(label="Comment for your feedback (optional)", elem_id="feedback-comment")
    g_mine = gr.HTML(visible=False)  # the gradio_client API's view of the images (the page shows the slots)
    slots, buttons = [], []
    with gr.Row(elem_id="generated"):
        for i in range(MAX_IMAGES):
            with gr.Column(visible=False, min_width=200, elem_id=f"generated-{i + 1}") as col:
                shown = gr.HTML()
                with gr.Row():
                    like = gr.Button("Like", size="sm", elem_classes=["feedback-like"])
                    dislike = gr.Button("Dislike", size="sm", elem_classes=["feedback-dislike"])
                    choose = gr.Button("This one", size="sm", elem_classes=["feedback-choose"])
            slots.append((col, shown))
            buttons.append((like, dislike, choose))
    g_plain = gr.HTML(label="Vanilla", elem_id="vanilla")
    g_meta = gr.JSON(label="Metadata")

    @guarded
    def gen(prompt, strategies, n, steps, seed, compare, request: gr.Request, progress=gr.Progress()):
        progress(0, desc="generating")
        mine, plain, meta, state = app.generate(app.user(request), prompt, list(strategies or []), int(n), int(steps),
                                                int(seed), bool(compare))
        cells = []
        for i in range(MAX_IMAGES):
            if i < len(state["images"]):
                score = meta["personalized"][i]["reward_score"]
                cells += [gr.update(visible=True),
                          cards_html([(image_uri_bytes(state["images"][i]), f"image {i + 1} · score {score:.3f}")],
                                     empty="", size=240)]
            else:
                cells += [gr.update(visible=False), ""]
        return (mine, plain, meta, state, f"generated {len(state['images'])} image(s)", *cells)

    outputs = [g_mine, g_plain, g_meta, generated, g_status] + [x for pair in slots for x in pair]
    g_btn.click(gen, [g_prompt, g_strats, g_n, g_steps, g_seed, g_compare], outputs, api_name="generate")
    for i, trio in enumerate(buttons):
        for kind, button in zip(("like", "dislike", "choose"), trio, strict=True):

            @guarded
            def give(state, comment, count, request: gr.Request, kind=kind, i=i):
                return app.feedback(app.user(request), kind, state, i, comment), count + 1

            button.click(give, [generated, g_comment, profile_tick], [g_status, profile_tick],
                         api_name=f"{kind}_generated_{i + 1}")


def profile_tab(gr, app: App, guarded, demo, profile_tick) -> None:
    """The profile, visible: likes, dislikes and choices with thumbnails and comments, each removable; the
    attributes, editable; your own images to like or compare; the reward model; reset after a confirmation."""
    p_status = gr.Textbox(label="Status", interactive=False, elem_id="profile-status")

    @gr.render(inputs=[profile_tick])
    def entries(_tick, request: gr.Request):
        user = app.user(request)
        rows = app.profile_entries(user)
        more = f", the latest {PROFILE_SHOWN} shown" if len(rows) > PROFILE_SHOWN else ""
        gr.Markdown(f"### Your likes, dislikes and choices ({len(rows)}{more})" if rows else
                    "### Your profile is empty: make a few choices in the Taste tab, or give feedback on images "
                    "you generate.")
        for row in rows[:PROFILE_SHOWN]:
            with gr.Row(elem_classes=["profile-entry", f"profile-{row['kind']}"]):
                labels = ["chosen", "over"] if row["kind"] == "pair" else [row["kind"]]
                gr.HTML(grid_html([(uri, label, "") for uri, label in zip(row["thumbs"], labels, strict=False)],
                                  empty="", size=72, elem="profile-thumb"))
                what = {"like": "Liked", "dislike": "Disliked", "pair": "Chose the first"}[row["kind"]]
                text = what + (f" for “{row['prompt']}”" if row["prompt"] else "") + (
                    f": {row['comment']}" if row["comment"] else "")
                gr.Markdown(html.escape(text))
                forget = gr.Button("Remove", size="sm", elem_classes=["profile-remove"], scale=0)

                @guarded
                def remove(count, request: gr.Request, event_id=row["id"]):
                    app.db.store.delete_profile_event(app.user(request), event_id)
                    return "removed it from your profile", count + 1

                forget.click(remove, [profile_tick], [p_status, profile_tick])

    with gr.Accordion("Attributes (derived from your comments, editable)", open=True):
        with gr.Row():
            liked = gr.Textbox(label="Liked attributes (comma-separated)", elem_id="attr-liked")
            disliked = gr.Textbox(label="Disliked attributes (comma-separated)", elem_id="attr-disliked")
        with gr.Row():
            save_attr = gr.Button("Save attributes")
            extract_attr = gr.Button("Derive from comments (VLM)")
            train_btn = gr.Button("Train reward model", variant="primary")
    with gr.Accordion("Your own images", open=False):
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
    reset_btn = gr.Button("Reset my profile", variant="stop", elem_id="profile-reset")
    with gr.Row(visible=False, elem_id="reset-confirm") as confirm_row:
        gr.Markdown("Forget every like, dislike, choice, attribute and your reward model?")
        yes_btn = gr.Button("Yes, reset it", variant="stop")
        no_btn = gr.Button("Cancel")

    def attrs_text(profile):
        a = profile.attributes
        return ", ".join(a.liked), ", ".join(a.disliked)

    def record(kind, image, comment, count, request):
        if image is None:
            raise ValueError("choose an image first")
        profile = app.profile(app.user(request))
        getattr(profile, kind)(image, comment=comment or "")
        return f"{kind}d the image ({len(profile.events(kind))} in total)", count + 1

    def choose(which, a, b, prompt, count, request):
        if a is None or b is None:
            raise ValueError("choose both images")
        profile = app.profile(app.user(request))
        chosen, rejected = (a, b) if which == "A" else (b, a)
        profile.compare(prompt, chosen, rejected)
        return f"recorded a choice ({len(profile.events('pair'))} in total)", count + 1

    @guarded
    def save_attributes(lk, dl, request: gr.Request):
        profile = app.profile(app.user(request))
        split = [x.strip() for x in (lk or "").split(",") if x.strip()]
        split_d = [x.strip() for x in (dl or "").split(",") if x.strip()]
        profile.set_attributes(split, split_d)
        return (*attrs_text(profile), "attributes saved")

    @guarded
    def derive(request: gr.Request, progress=gr.Progress()):
        progress(0, desc="reading your comments")
        profile = app.profile(app.user(request))
        vlm = app.vlm_pipe.vlm
        with app._vlm_lock:  # the chat tab generates with the same model
            profile.extract_attributes(vlm)
        return (*attrs_text(profile), "attributes derived from your comments")

    @guarded
    def train(request: gr.Request, progress=gr.Progress()):
        progress(0, desc="training the reward model")
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
    def like(image, comment, count, request: gr.Request):
        return record("like", image, comment, count, request)

    @guarded
    def dislike(image, comment, count, request: gr.Request):
        return record("dislike", image, comment, count, request)

    @guarded
    def choose_a(a, b, prompt, count, request: gr.Request):
        return choose("A", a, b, prompt, count, request)

    @guarded
    def choose_b(a, b, prompt, count, request: gr.Request):
        return choose("B", a, b, prompt, count, request)

    @guarded
    def reset(count, request: gr.Request):
        n = app.profile(app.user(request)).reset()
        return f"profile reset: {n} entries removed", count + 1, gr.update(visible=False), "", ""

    bumped = [p_status, profile_tick]
    like_btn.click(like, [p_image, p_comment, profile_tick], bumped, api_name="like")
    dislike_btn.click(dislike, [p_image, p_comment, profile_tick], bumped, api_name="dislike")
    a_btn.click(choose_a, [ab_a, ab_b, ab_prompt, profile_tick], bumped, api_name="choose_a")
    b_btn.click(choose_b, [ab_a, ab_b, ab_prompt, profile_tick], bumped, api_name="choose_b")
    save_attr.click(save_attributes, [liked, disliked], [liked, disliked, p_status], api_name="save_attributes")
    extract_attr.click(derive, None, [liked, disliked, p_status], api_name="extract_attributes")
    train_btn.click(train, None, p_status, api_name="train_reward")
    reset_btn.click(lambda: gr.update(visible=True), None, confirm_row, api_visibility="private")
    yes_btn.click(reset, [profile_tick], [*bumped, confirm_row, liked, disliked], api_name="reset_profile")
    no_btn.click(lambda: gr.update(visible=False), None, confirm_row, api_visibility="private")
    demo.load(load_attrs, None, [liked, disliked], api_visibility="private")


def read_logins(path: str | Path) -> dict[str, str]:
    """Logins from a file of `user:password` lines (blank lines and `#` comments skipped)."""
    logins = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read the login file {str(path)!r} ({e})") from e
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise SystemExit(f"error: {path}:{number}: expected user:password")
        logins[user.strip()] = password
    if not logins:
        raise SystemExit(f"error: the login file {str(path)!r} holds no logins")
    return logins


class Logins:
    """Gradio's login check, with throttling: after `max_failures` wrong passwords for one user name within
    `window` seconds, that name is refused (even with the right password) until the window has passed.
    Passwords are compared in constant time."""

    def __init__(self, logins: dict[str, str], *, max_failures: int = 5, window: float = 60.0):
        self.logins, self.max_failures, self.window = dict(logins), max_failures, window
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(username, []) if now - t < self.window]
            if len(recent) >= self.max_failures:
                self._failures[username] = recent
                logger.warning("login for %r refused: %d failed attempts in %.0f s", username, len(recent),
                               self.window)
                return False
            expected = self.logins.get(username)
            ok = expected is not None and hmac.compare_digest(password.encode(), expected.encode())
            if ok:
                self._failures.pop(username, None)
            else:
                self._failures[username] = [*recent, now][-self.max_failures:]
                if len(self._failures) > 10_000:  # bounded: forget the oldest names
                    self._failures.pop(next(iter(self._failures)))
            return ok


API = "/gradio_api"
_BODY_LIMIT = 16 * 1024 * 1024  # a request body the guard reads (uploads go to /upload, which it does not read)
# POST routes whose JSON body names a session and input data (file references among it)
_DATA_ROUTES = ("/queue/join", "/call/", "/run/", "/api/", "/stream/", "/component_server", "/cancel")


class _Owners:
    """A bounded map from an id (session hash, event id, upload path) to the users it belongs to."""

    def __init__(self, limit: int = 200_000):
        self.limit, self._map = limit, OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str, user: str) -> None:
        with self._lock:
            self._map.setdefault(key, set()).add(user)
            self._map.move_to_end(key)
            while len(self._map) > self.limit:
                self._map.popitem(last=False)

    def get(self, key: str) -> set[str] | None:
        with self._lock:
            return self._map.get(key)

    def claim(self, key: str, user: str) -> bool:
        """True if `key` is the user's (claiming it when nobody holds it yet), False if another user's."""
        with self._lock:
            holders = self._map.get(key)
            if holders is None:
                self._map[key] = {user}
                return True
            return user in holders


class SessionGuard:
    """ASGI middleware that ties Gradio's ids to the logged-in user who made them (multi-user mode).

    Gradio 6 binds a queued event's results to its session hash and event id, and serves an upload to anyone
    logged in who has its URL, whoever made them. This guard, in front of Gradio's routes, records who
    uploaded each file (`/upload`), who opened each session (`/queue/join`, `/queue/data`, and every other
    route that names one) and who started each event (`/call`, `/queue/join`); and it refuses with 403 another
    user's session (`/queue/data?session_hash=`, `/heartbeat`, `/cancel`, `/stream`), another user's event
    (`/call/<fn>/<event id>`), another user's upload by URL (`/file=`) and as an input (a file reference in a
    request's data), and any file in Gradio's upload folder whose uploader it does not know."""

    def __init__(self, app: Any):
        self.app = app
        self.sessions, self.events, self.uploads = _Owners(), _Owners(), _Owners()

    @staticmethod
    def _user(scope: dict) -> str | None:
        from http.cookies import CookieError, SimpleCookie

        gradio = scope.get("app")
        raw = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1")
        try:
            cookies = SimpleCookie(raw)
        except CookieError:
            return None
        cookie_id = getattr(gradio, "cookie_id", None)
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            if name in cookies:
                user = getattr(gradio, "tokens", {}).get(cookies[name].value)
                if user:
                    return user
        return None

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str) -> None:
        from starlette.responses import JSONResponse

        logger.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), message)
        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)

    def _upload_dir(self, scope: dict) -> Path | None:
        folder = getattr(scope.get("app"), "uploaded_file_dir", None)
        return Path(folder).resolve() if folder else None

    def _file_allowed(self, scope: dict, user: str, path: str) -> bool:
        """An upload is served to (or taken as input from) only the users who uploaded it; a file in the
        upload folder that nobody is known to have uploaded is served to nobody."""
        try:
            resolved = str(Path(path).resolve())
        except (OSError, ValueError):
            return False
        holders = self.uploads.get(resolved)
        if holders is not None:
            return user in holders
        folder = self._upload_dir(scope)
        return folder is None or not Path(resolved).is_relative_to(folder)

    def _files_in(self, value: Any, depth: int = 0):
        if depth > 64:
            return
        if isinstance(value, dict):
            if isinstance(value.get("path"), str):
                yield value["path"]
            for v in value.values():
                yield from self._files_in(v, depth + 1)
        elif isinstance(value, list):
            for v in value:
                yield from self._files_in(v, depth + 1)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(API):
            return await self.app(scope, receive, send)
        route, method = scope["path"][len(API):], scope["method"]
        guarded = route.startswith(("/file=", "/file/", "/queue/data", "/heartbeat/", "/stream/", "/call/")) or (
            method == "POST" and route.startswith(("/upload", *_DATA_ROUTES)))
        if not guarded or route.startswith("/upload_progress"):
            return await self.app(scope, receive, send)  # Gradio's own login check applies
        user = self._user(scope)
        if user is None:
            return await self._refuse(scope, receive, send, 401, "not logged in")
        if route.startswith(("/file=", "/file/")):
            if not self._file_allowed(scope, user, route[len("/file="):]):
                return await self._refuse(scope, receive, send, 403, "not your file")
            return await self.app(scope, receive, send)
        if route == "/queue/data" or (route.startswith(("/heartbeat/", "/stream/")) and method == "GET"):
            from urllib.parse import parse_qs

            session = (parse_qs(scope.get("query_string", b"").decode()).get("session_hash", [None])[0]
                       if route == "/queue/data" else route.split("/")[2])
            if session is not None and not self.sessions.claim(session, user):
                return await self._refuse(scope, receive, send, 403, "not your session")
            return await self.app(scope, receive, send)
        if method == "GET" and route.startswith("/call/"):
            event = route.rstrip("/").rsplit("/", 1)[-1]
            if user not in (self.events.get(event) or ()):
                return await self._refuse(scope, receive, send, 403, "not your event")
            return await self.app(scope, receive, send)
        if method == "POST" and route.startswith("/upload"):
            return await self.app(scope, receive, self._recording(send, user, self._record_uploads))
        if method == "POST" and route.startswith(_DATA_ROUTES):
            parts, size, more = [], 0, True
            while more:
                message = await receive()
                parts.append(message.get("body", b""))
                size += len(parts[-1])
                more = message.get("more_body", False)
                if size > _BODY_LIMIT:
                    return await self._refuse(scope, receive, send, 413, "request too large")
            body = b"".join(parts)
            try:  # the same parser FastAPI uses for these bodies, so both read the same session and files
                data = json.loads(body) if body else {}
            except (ValueError, RecursionError):
                return await self._refuse(scope, receive, send, 400, "the request body is not JSON")
            if isinstance(data, dict):
                session = data.get("session_hash")
                if isinstance(session, str) and not self.sessions.claim(session, user):
                    return await self._refuse(scope, receive, send, 403, "not your session")
                if route.startswith("/stream/"):
                    event = route.split("/")[2]
                    if user not in (self.events.get(event) or ()):
                        return await self._refuse(scope, receive, send, 403, "not your event")
            if any(not self._file_allowed(scope, user, f) for f in self._files_in(data)):
                return await self._refuse(scope, receive, send, 403, "an input file is not yours")
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, self._recording(send, user, self._record_event))
        return await self.app(scope, receive, send)

    def _recording(self, send, user: str, record):
        """`send`, recording what a small JSON response says (upload paths, an event id) before it goes out."""
        chunks: list[bytes] = []

        async def wrapped(message):
            if message["type"] == "http.response.body":
                if sum(map(len, chunks)) < 1 << 20:
                    chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    try:
                        record(json.loads(b"".join(chunks)), user)
                    except ValueError:
                        pass
            await send(message)

        return wrapped

    def _record_uploads(self, paths: Any, user: str) -> None:
        for path in paths if isinstance(paths, list) else []:
            if isinstance(path, str):
                self.uploads.add(str(Path(path).resolve()), user)

    def _record_event(self, response: Any, user: str) -> None:
        if isinstance(response, dict) and isinstance(response.get("event_id"), str):
            self.events.add(response["event_id"], user)


def launch(demo, *, logins: dict[str, str] | None = None, **kwargs):
    """Start the app; with logins, behind the login throttle and the `SessionGuard`."""
    from starlette.middleware import Middleware

    app_kwargs = {"middleware": [Middleware(SessionGuard)]} if logins else None
    return demo.queue(default_concurrency_limit=4).launch(auth=Logins(logins) if logins else None,
                                                          max_file_size=MAX_UPLOAD, app_kwargs=app_kwargs,
                                                          **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "default"])
    parser.add_argument("--db", default=os.environ.get("MMPERSONA_DB"),
                        help="concept database: a path or postgresql:// URL (default: env MMPERSONA_DB, else the user data dir)")
    parser.add_argument("--auth-file", default=os.environ.get("MMPERSONA_AUTH_FILE"), metavar="PATH",
                        help="logins, one user:password per line (default: env MMPERSONA_AUTH_FILE); turns on "
                             "multi-user mode")
    parser.add_argument("--auth", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    if args.auth:
        parser.error("--auth is gone: passwords on the command line are readable by every local user "
                     "(/proc/PID/cmdline). Put user:password lines in a file and pass --auth-file PATH.")
    logins = read_logins(args.auth_file) if args.auth_file else {}
    demo = build_app(args.preset, args.db, multi_user=bool(logins), device=args.device)
    launch(demo, logins=logins, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
