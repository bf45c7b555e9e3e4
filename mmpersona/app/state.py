"""The app's shared state (`App`): one concept database and the lazily loaded models, each used under its lock,
and every action of the tabs as a method that takes the user first, so each is scoped to the caller."""

from __future__ import annotations

import logging
import secrets
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from concept_db.types import NEW_CONVERSATION
from pipelines.taste import ShownPairs

from .config import (MAX_HISTORY_CHARS, MAX_HISTORY_TURNS, MAX_IMAGES_PER_ADD, MAX_MESSAGE_CHARS, MAX_PROMPT_CHARS,
                     MAX_QUESTION_CHARS, OPEN_PAIRS, PROFILE_SHOWN, SINGLE_USER, TASTE_GOAL, TASTE_PROMPTS, THUMB_SIZE,
                     TRAIN_EVERY)
from ..images import png_bytes
from .render import boxes_html, cards_html, data_uri, grid_html, image_uri

logger = logging.getLogger("mmpersona.app")


class Refused(ValueError):
    """A request refused as expected (a taste pair answered already): the user gets the message, and the log no
    traceback."""


#: How a concept card says what found it, where the source's own name would not say it to a user.
SOURCE_LABELS = {"face": "matched by face"}


class App:
    """Shared state: one concept database (thread-safe) and lazily loaded models, each used under its lock."""

    def __init__(self, preset: str = "tiny", db_path: str | Path | None = None, device: str = "auto",
                 multi_user: bool = False, face: bool = False):
        from concept_db.types import Quota
        from mmpersona import ConceptDB

        self.preset, self.device, self.multi_user = preset, device, multi_user
        self.face = face  # chat also finds person concepts by face (dlib)
        # many users share it: each stores at most the quota (MMPERSONA_QUOTA_IMAGES / _EVENTS / _MB)
        self.db = ConceptDB(db_path, preset=preset, device=device, quota=Quota.from_env() if multi_user else None)
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
        # user -> ids of the taste pairs shown and not yet answered (each answered once), the newest OPEN_PAIRS
        self._open_pairs: dict[str, OrderedDict[str, None]] = {}
        self._pairs_lock = threading.Lock()
        self._taste_shown = ShownPairs()  # the pairs the active order showed each user (skips included)
        self._pool_lock = threading.Lock()
        self._pool_thread: threading.Thread | None = None  # generating the shared taste pool

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
                                                         max_new_tokens=64, face=self.face)
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

    def chat(self, user: str, image: Any, question: str, history: list[dict], regions: bool = False,
             conversation: str | None = None):
        """Yields (chat messages, retrieved rows, retrieved thumbnails, the photo with each region-retrieved
        concept's box, label and score drawn, status, the memory used and proposed (text), the ids of this turn's
        proposals, the kept conversation's id) as the answer streams. `regions`: find each concept in the photo
        (detector regions, one concept per region). `conversation`: keep the turn in this conversation of the
        user's (`NEW_CONVERSATION`: one started for it; None: not kept). Once the answer is out, the turn is kept
        and what the user said is read for memory proposals."""
        question = question or ""
        if len(question) > MAX_QUESTION_CHARS:
            raise ValueError(f"the question is {len(question)} characters, over the limit of {MAX_QUESTION_CHARS}")
        turns = bounded_history(history)
        pipe = self.region_pipe if regions else self.vlm_pipe
        photo = None
        if conversation is not None:  # checked before the model runs: the photo, the chat's owner, the quota
            from mmpersona.images import load_image_with_bytes

            if conversation != NEW_CONVERSATION:
                conversation = self.db.store.conversation(user, conversation).id
                if image is None:  # the chat goes on about its last photo
                    image = self.conversation_photo(user, conversation)
            if image is not None:
                image, photo = load_image_with_bytes(image)
            self.db.store.check_quota(user, turns=1, conversations=int(conversation == NEW_CONVERSATION),
                                      size=len(photo) if photo is not None else 0)
        kept = None if conversation in (None, NEW_CONVERSATION) else conversation
        shown = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        with self._vlm_lock:  # one generation at a time on the shared model
            stream = pipe.stream(image, question, user=user, history=turns)
            for piece in stream:
                shown[-1]["content"] += piece
                yield shown, [], "", "", "answering...", "", [], kept, []
        answer = stream.result
        from concept_db import ConceptDBError
        from concept_db.types import MmpersonaError, content_hash

        if conversation is not None:
            try:
                kept = kept or self.db.store.start_conversation(user).id
                self.db.store.add_turn(user, kept, question, answer.answer, image=photo)
            except ConceptDBError as e:  # a quota filled meanwhile costs the kept turn, never the answer
                logger.warning("the turn was not kept: %s", e)
        rows = [[r.concept.handle, round(r.score, 4), r.source, str(r.box) if r.box else ""] for r in answer.retrieved]
        thumbs = grid_html([(self.thumbnail(user, r.image or r.concept.images[0]), r.concept.handle,
                             f"{r.score:.3f} · {SOURCE_LABELS.get(r.source, r.source)}")
                            for r in answer.retrieved if r.concept.images],
                           empty="", size=88, elem="retrieved")
        status = ("no concept recognised: answered without personal context" if answer.abstained else
                  "used " + ", ".join(r.concept.handle for r in answer.retrieved))
        shown[-1]["content"] = answer.answer or "(the model gave an empty answer)"
        where = boxes_html(image, answer.retrieved)
        used = self.memory_text("Remembered and used", answer.memory)
        yield shown, rows, thumbs, where, status, used, [], kept, []
        try:
            with self._vlm_lock:  # after the answer: reading the message may need the model (`memory_extractor`)
                proposed = pipe.remember(user, question, answer, source="chat")
        except ConceptDBError as e:  # a full memory quota costs the proposals, never the answer
            logger.info("no memory proposals for this turn: %s", e)
            proposed = []
        waiting = [e for e in proposed if e.status == "proposed"]
        new = []
        if kept is not None and photo is not None:  # a new concept is made from the kept turn's photo
            try:
                with self._vlm_lock:  # the face model or the detector finds its region
                    new = [{**p.to_dict(), "image": content_hash(photo)}
                           for p in pipe.propose_concepts(user, question, image, answer)]
            except MmpersonaError as e:
                logger.info("no concept proposals for this turn: %s", e)
        text = "\n\n".join(t for t in (used, self.memory_text("Remember this?", waiting),
                                        self.memory_text("Remembered", [e for e in proposed if e.status != "proposed"]),
                                        self.concepts_text(new))
                            if t)
        yield shown, rows, thumbs, where, status, text, [e.id for e in waiting], kept, new

    @staticmethod
    def concepts_text(proposals: list[dict]) -> str:
        if not proposals:
            return ""
        where = lambda p: f"the region {p['box']}" if p["box"] else "the whole photo"  # noqa: E731
        return "New concept? (Add it: one click)\n" + "\n".join(
            f"• {p['handle']} ({p['category'] or 'no category'}{', ' + p['info'] if p['info'] else ''}), from "
            f"{where(p)}" for p in proposals)

    def add_proposed_concepts(self, user: str, proposals: list[dict]) -> str:
        """Make the concepts a turn proposed (`concepts_text`), each from its region of the kept turn's photo."""
        from mmpersona import load_image
        from pipelines.introductions import accept

        added = []
        for p in proposals:
            photo = load_image(self.db.store.image_bytes(user, p["image"]))
            added.append(accept(self.db, user, {k: v for k, v in p.items() if k != "image"}, photo).handle)
        return f"added {', '.join(added)}"

    # ------------------------------------------------------------------ kept conversations

    def conversation_choices(self, user: str) -> list[tuple[str, str]]:
        """(label, id) of the user's most recently continued conversations (the latest `PROFILE_SHOWN`)."""
        import time

        return [(f"{c.title or '(untitled)'} · {c.turns} turn{'' if c.turns == 1 else 's'} · "
                 f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(c.updated))}", c.id)
                for c in self.db.store.conversations(user, limit=PROFILE_SHOWN)]

    def open_conversation(self, user: str, conversation: str) -> tuple[list[dict], str]:
        """A kept conversation's latest turns as chat messages, and its last photo inline (HTML; empty: none)."""
        turns = self.db.store.turns(user, conversation, last=PROFILE_SHOWN)
        messages = [m for t in turns for m in ({"role": "user", "content": t.question},
                                                {"role": "assistant", "content": t.answer})]
        photo = turns[-1].image if turns else None
        shown = grid_html([(self.thumbnail(user, photo), "the chat's photo (used unless you upload another)", "")],
                          empty="", size=160, elem="chat-photo") if photo else ""
        return messages, shown

    def conversation_photo(self, user: str, conversation: str) -> bytes | None:
        """The encoded photo of a kept conversation's last turn (None: none)."""
        last = self.db.store.turns(user, conversation, last=1)
        return self.db.store.image_bytes(user, last[0].image) if last and last[0].image else None

    def delete_conversation(self, user: str, conversation: str) -> str:
        self.db.store.delete_conversation(user, conversation)
        return "deleted the conversation"

    @staticmethod
    def memory_text(title: str, entries: list) -> str:
        """A few memory entries as Markdown-free text lines under a title (user text is never markup here)."""
        if not entries:
            return ""
        return title + ("" if title.endswith("?") else ":") + "\n" + "\n".join(f"• {e.text}" + (f" (a state: {e.topic})" if e.kind == "state" else "")
                                          for e in entries)

    # ------------------------------------------------------------------ memory

    def memory_entries(self, user: str) -> list[dict[str, Any]]:
        """The user's memory, newest first (the latest `PROFILE_SHOWN`), as rows for the Memory tab."""
        entries = self.db.store.memory(user, limit=PROFILE_SHOWN)
        ids = sorted({e.concept_id for e in entries if e.concept_id})
        handles = {cid: c.handle for cid, c in self.db.store.get_many(user, ids).items()} if ids else {}
        return [{"id": e.id, "text": e.text, "about": handles.get(e.concept_id, "you") if e.concept_id else "you",
                 "kind": e.kind, "topic": e.topic, "status": e.status,
                 "state": "waiting for your yes" if e.status == "proposed" else
                 "replaced by a newer state" if e.superseded_by else "current"} for e in entries]

    def remember(self, user: str, text: str, concept: str = "", topic: str = "") -> str:
        text, concept, topic = (text or "").strip(), (concept or "").strip(), (topic or "").strip()
        if len(text) > MAX_QUESTION_CHARS:
            raise ValueError(f"the text is {len(text)} characters, over the limit of {MAX_QUESTION_CHARS}")
        cid = self.db.resolve(user, concept).id if concept else None
        self.db.store.add_memory(user, text, concept_id=cid, kind="state" if topic else "fact", topic=topic,
                                 source="user")
        return "remembered"

    def settle(self, user: str, entry_ids: list[str], accept: bool) -> str:
        """Accept (or reject: forget) the given proposals of the user's; others' ids are refused as missing."""
        for entry_id in entry_ids:
            if accept:
                self.db.store.update_memory(user, entry_id, status="accepted")
            else:
                self.db.store.delete_memory(user, entry_id)
        n = len(entry_ids)
        return f"{'remembered' if accept else 'forgot'} {n} entr{'y' if n == 1 else 'ies'}"

    # ------------------------------------------------------------------ preferences

    def profile(self, user: str):
        from mmpersona import PreferenceProfile

        return PreferenceProfile(self.db, user)

    def taste_pair(self, user: str, prompts: str, step: int, order: str = "active") -> dict[str, Any]:
        """The onboarding's next pair: two images of one prompt, made without personalization. `order` "active":
        the most informative pair for this user of the shared pool of the built-in prompts (`pipelines.taste`);
        "random", or the user's own prompts (one per line): the fixed order, two fresh images of the next prompt.
        The pool is generated once, in a thread of its own a chunk at a time under the generation lock (no
        request holds the generation queue while it is made); until it is complete the fixed order answers.
        Kept in the page's session state as PNG bytes, with an id: the pair can be answered once
        (`answer_pair`)."""
        from pipelines.taste import ORDERS, active_pair, fixed_pair

        if order not in ORDERS:
            raise ValueError(f"the order must be one of {', '.join(ORDERS)}, got {order!r}")
        own = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if any(len(p) > MAX_PROMPT_CHARS for p in own):
            raise ValueError(f"a prompt is over the limit of {MAX_PROMPT_CHARS} characters")
        pipe = self.t2i_pipe
        pair = None
        if order == "active" and not own:
            pool = self.taste_pool()
            if pool.complete:
                pair = active_pair(pool, pipe, user, self._taste_shown.of(user), seed=step)
                if pair is not None:
                    self._taste_shown.add(user, pair)
        if pair is None:  # the fixed order (the pool not made yet, or every pair of it answered)
            with self._t2i_lock:
                pair = fixed_pair(pipe, user, own or TASTE_PROMPTS, step, self.steps)
        pair_id = secrets.token_urlsafe(12)
        with self._pairs_lock:
            shown = self._open_pairs.setdefault(user, OrderedDict())
            shown[pair_id] = None
            while len(shown) > OPEN_PAIRS:  # only this user's own newer pairs forget their older ones
                shown.popitem(last=False)
        return {"prompt": pair.prompt, "images": list(pair.images), "step": step, "id": pair_id, "order": pair.order,
                "information": pair.information}

    def taste_pool(self):
        """The shared taste pool, its generation started (once) if it is not complete."""
        from pipelines.taste import POOL_USER, taste_pool

        pipe = self.t2i_pipe
        pool = taste_pool(pipe, self.steps)
        with self._pool_lock:
            if not pool.complete and (self._pool_thread is None or not self._pool_thread.is_alive()):
                def locked(job):
                    with self._t2i_lock:
                        return job()

                def fill():
                    try:
                        pool.ensure(pipe, POOL_USER, run=locked)
                    except Exception:  # the fixed order goes on answering; the next request starts it again
                        logger.exception("the taste pool could not be generated")

                self._pool_thread = threading.Thread(target=fill, name="taste-pool", daemon=True)
                self._pool_thread.start()
        return pool

    def answer_pair(self, user: str, pair: dict | None, shown: str | None = None) -> None:
        """Mark a pair of `taste_pair` answered (chosen or skipped), or refuse it (`Refused`) if it was answered
        already: clicks at the same moment store one answer, not several, nor both ways. `shown`: the id of the
        pair the page showed when the click was made; a click is refused when the session has moved on to another
        pair meanwhile (a click queued behind an earlier one would otherwise answer a pair nobody saw yet). A
        pair without an id (made by the caller, not by `taste_pair`) is the caller's to answer."""
        if not pair or len(pair.get("images", [])) != 2:
            raise ValueError("start the onboarding first: there is no pair to choose from")
        if "id" not in pair:
            return
        if shown is not None and shown != pair["id"]:
            raise Refused("this pair is answered already: answer the pair shown now, or ask for a new one")
        with self._pairs_lock:
            shown = self._open_pairs.get(user, {})
            if pair["id"] not in shown:
                raise Refused("this pair is answered already: answer the pair shown now, or ask for a new one")
            del shown[pair["id"]]

    def taste_choose(self, user: str, pair: dict | None, which: str, comment: str, shown: str | None = None) -> str:
        """Store the choice between the pair's images (`A` or `B`) as a pair event, once per pair (`answer_pair`);
        every TRAIN_EVERY choices the reward model trains again in the background."""
        if which not in ("A", "B"):
            raise ValueError(f"the choice must be 'A' or 'B', got {which!r}")
        self.answer_pair(user, pair, shown)
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
                text = self.train_reward(user)
            except Exception as e:  # noqa: BLE001 - shown on the page, and logged
                logger.exception("reward training for %s failed", user)
                text = f"reward model training failed: {e}"
            with self._train_lock:
                self._training[user] = text

        threading.Thread(target=run, name=f"reward-{user}", daemon=True).start()

    def train_reward(self, user: str) -> str:
        """Train the user's reward model now (the Train button, and each background training); returns what
        happened, for the page. A profile reset, or an entry removed, while it trains: nothing is stored, and
        the text says so (`PreferenceProfile.train_reward`'s rule)."""
        from concept_db import ProfileChanged

        try:
            model = self.profile(user).train_reward()
        except ProfileChanged:
            return ("reward model not stored: your profile was reset or lost entries while it trained, so "
                    "nothing was stored; train it again")
        acc = model.held_out_accuracy
        return ("reward model: no data yet, it stays neutral" if model.cold_start else
                f"reward model trained on {model.pairs} choice(s), {model.likes} like(s), {model.dislikes} "
                f"dislike(s); held-out accuracy: {f'{acc:.2f}' if acc is not None else 'n/a (too few)'}")

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


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)
