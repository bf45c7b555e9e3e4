"""`PreferenceProfile`: a user's text-to-image taste, kept in the concept database.

    from mmpersona import ConceptDB, PreferenceProfile
    profile = PreferenceProfile(ConceptDB("concepts.db", preset="tiny"), "alice")
    profile.like("sunset.jpg", comment="warm light, film grain")
    profile.compare("a cat on a sofa", chosen="a.png", rejected="b.png")
    profile.attributes            # {"liked": [...], "disliked": [...]}, editable
    profile.embeddings()          # mean CLIP embeddings of liked and disliked images
    profile.train_reward()        # the personal reward model, stored for later
    profile.user_embedding()      # one vector for the preference adapter, kept and refreshed with the profile
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .attributes import Attributes, clean_list
from .errors import MmpersonaError
from .images import ImageInput, load_image_bytes
from .reward import BLOB_NAME, RewardModel, cold_start, train_reward

if TYPE_CHECKING:
    import numpy as np

    from concept_db.types import ProfileEvent

    from .conceptdb import ConceptDB
    from .models import LoadedVLM

ATTRIBUTES_KEY = "profile.attributes"
USER_EMBEDDING_BLOB = "user_embedding"
PROFILE_VECTORS_BLOB = "profile_vectors"  # the profile images' CLIP vectors, by content hash


class PreferenceProfile:
    """Likes, dislikes, comments, pairwise choices and prompts of one user, and what is derived from them."""

    def __init__(self, db: "ConceptDB", user: str):
        from concept_db.types import check_owner

        self.db = db
        self.user = check_owner(user)
        self._vectors: dict[str, "np.ndarray"] = {}

    # ------------------------------------------------------------------ recording

    def like(self, image: ImageInput, comment: str = "") -> "ProfileEvent":
        return self.db.store.add_profile_event(self.user, "like", images=[load_image_bytes(image)], comment=comment)

    def dislike(self, image: ImageInput, comment: str = "") -> "ProfileEvent":
        return self.db.store.add_profile_event(self.user, "dislike", images=[load_image_bytes(image)],
                                               comment=comment)

    def compare(self, prompt: str, chosen: ImageInput, rejected: ImageInput, comment: str = "") -> "ProfileEvent":
        """Record that for `prompt` the user preferred `chosen` over `rejected` (and why, in `comment`)."""
        a, b = load_image_bytes(chosen), load_image_bytes(rejected)
        if a == b:
            raise MmpersonaError("chosen and rejected are the same image")
        return self.db.store.add_profile_event(self.user, "pair", images=[a, b], prompt=prompt, comment=comment)

    def add_prompt(self, prompt: str) -> "ProfileEvent":
        return self.db.store.add_profile_event(self.user, "prompt", prompt=prompt)

    def events(self, kind: str | None = None) -> "list[ProfileEvent]":
        return self.db.store.profile_events(self.user, kind)

    def comments(self) -> list[tuple[str, str]]:
        """(kind, comment) of each commented like and dislike; a choice's comment says what the user liked in the
        chosen image, so it counts as a like's."""
        return [("like" if e.kind == "pair" else e.kind, e.comment) for e in self.events()
                if e.kind in ("like", "dislike", "pair") and e.comment]

    def reset(self) -> int:
        self._vectors.clear()
        return self.db.store.reset_profile(self.user)

    # ------------------------------------------------------------------ attributes

    @property
    def attributes(self) -> Attributes:
        data = self.db.store.get_setting(self.user, ATTRIBUTES_KEY) or {}
        return Attributes(list(data.get("liked", [])), list(data.get("disliked", [])))

    def set_attributes(self, liked: list[str] | None = None, disliked: list[str] | None = None) -> Attributes:
        """Replace the liked and/or disliked attributes (the user's own edits), validated like model output."""
        current = self.attributes
        new = Attributes(clean_list(liked, "liked") if liked is not None else current.liked,
                         clean_list(disliked, "disliked") if disliked is not None else current.disliked)
        self.db.store.set_setting(self.user, ATTRIBUTES_KEY, new.to_dict())
        return new

    def extract_attributes(self, vlm: "LoadedVLM", *, retries: int = 2) -> Attributes:
        """Derive attributes from the comments with a VLM (ViPer style) and store them."""
        from .attributes import extract_attributes

        found = extract_attributes(vlm, self.comments(), retries=retries)
        return self.set_attributes(found.liked, found.disliked)

    # ------------------------------------------------------------------ embeddings and reward

    def image_vectors(self, hashes: list[str]) -> "np.ndarray":
        """CLIP embeddings of profile images: each computed once and kept with the profile (the
        `profile_vectors` blob), so that training the reward model again decodes no image it has seen."""
        import numpy as np

        emb = self.db.embedder
        if not self._vectors:
            self._vectors.update(self._kept_vectors())
        todo = [h for h in dict.fromkeys(hashes) if h not in self._vectors]
        if todo:
            known = self.db.store.known_vectors(self.user, emb.name, todo)
            missing = [h for h in todo if h not in known]
            if missing:
                fresh = emb.embed_images([self.db.store.image_bytes(self.user, h) for h in missing])
                known.update(dict(zip(missing, fresh, strict=True)))
            self._vectors.update(known)
            self._keep_vectors()
        return np.stack([self._vectors[h] for h in hashes]) if hashes else np.zeros((0, emb.dim), np.float32)

    def _kept_vectors(self) -> dict[str, "np.ndarray"]:
        """The profile images' vectors kept by an earlier call, if they are the current embedder's."""
        import numpy as np
        from safetensors.numpy import load

        emb = self.db.embedder
        stored = self.db.store.get_blob(self.user, PROFILE_VECTORS_BLOB)
        if stored is None or stored[1] != emb.name:
            return {}
        try:
            data = load(stored[0])
        except Exception:  # unreadable: computed again
            return {}
        return {h: v for h, v in data.items() if v.shape == (emb.dim,) and bool(np.isfinite(v).all())}

    def _keep_vectors(self) -> None:
        """Keep the vectors of the images the profile still has (those of removed events are dropped); not kept
        if the profile loses entries meanwhile (a cache: computed again next time)."""
        from concept_db import ProfileChanged
        from safetensors.numpy import save

        generation = self.db.store.profile_generation(self.user)
        current = {h for e in self.events() for h in (e.image, e.other) if h}
        kept = {h: v for h, v in self._vectors.items() if h in current}
        try:
            self.db.store.put_blob(self.user, PROFILE_VECTORS_BLOB, save(kept), model=self.db.embedder.name,
                                   profile_generation=generation)
        except ProfileChanged:
            pass

    def embeddings(self) -> dict[str, "np.ndarray | None"]:
        """Preference embeddings: the normalised mean embedding of liked and of disliked images (None if none)."""
        import numpy as np

        out: dict[str, Any] = {}
        for kind, key in (("like", "liked"), ("dislike", "disliked")):
            vecs = self.image_vectors([e.image for e in self.events(kind)])
            if len(vecs):
                mean = vecs.mean(0)
                out[key] = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
            else:
                out[key] = None
        return out

    def user_embedding(self) -> "np.ndarray | None":
        """The user's preference vector (`mmpersona.user_embedding.RULE` over pairs, likes and comments), or None
        without any. Kept with the profile and computed again only when the events or the embedder change."""
        import hashlib

        import numpy as np
        from concept_db import ProfileChanged
        from safetensors.numpy import load, save

        from .user_embedding import RULE, user_embedding

        emb = self.db.embedder
        generation = self.db.store.profile_generation(self.user)  # before the events: see `train_reward`
        events = [e for e in self.events() if e.kind in ("like", "dislike", "pair")]
        key = hashlib.sha256(json.dumps([RULE, emb.name, sorted(e.id for e in events)]).encode()).hexdigest()
        stored = self.db.store.get_blob(self.user, USER_EMBEDDING_BLOB)
        if stored is not None and stored[1] == emb.name:
            try:
                data = load(stored[0])
                u, fresh = data["u"], bytes(data["key"]) == key.encode()
            except Exception:  # unreadable: computed again below
                fresh = False
            if fresh and u.shape in {(0,), (emb.dim,)} and bool(np.isfinite(u).all()):
                return u if u.size else None
        pairs = [e for e in events if e.kind == "pair"]
        liked = [e for e in events if e.kind == "like"]
        disliked = [e for e in events if e.kind == "dislike"]
        texts = emb.embed_texts([e.comment for e in liked + disliked if e.comment]) if any(
            e.comment for e in liked + disliked) else np.zeros((0, emb.dim), np.float32)
        n_liked_text = sum(1 for e in liked if e.comment)
        u = user_embedding(self.image_vectors([e.image for e in pairs]), self.image_vectors([e.other for e in pairs]),
                           liked=self.image_vectors([e.image for e in liked]),
                           disliked=self.image_vectors([e.image for e in disliked]),
                           liked_text=texts[:n_liked_text], disliked_text=texts[n_liked_text:])
        blob = save({"u": u if u is not None else np.zeros(0, np.float32),
                     "key": np.frombuffer(key.encode(), np.uint8).copy()})
        try:  # kept only if every event it was computed from is still there
            self.db.store.put_blob(self.user, USER_EMBEDDING_BLOB, blob, model=emb.name, profile_generation=generation)
        except ProfileChanged:
            pass
        return u

    def train_reward(self, *, l2: float = 1e-3, seed: int = 0, store: bool = True) -> RewardModel:
        """Fit the personal reward model on this profile's pairs, likes and dislikes (and store it).

        The model is stored only if the profile lost nothing while it trained: a reset or a removed entry
        meanwhile raises `concept_db.ProfileChanged` and stores nothing. Entries added meanwhile do not: the model
        fits the events the training read, all of them still in the profile (the next training adds the new ones).
        """
        from concept_db import ConceptNotFound, ProfileChanged

        # read before the events: a removal after this moves it, and the store then refuses the result
        generation = self.db.store.profile_generation(self.user)
        events = self.events()
        pairs, likes, dislikes = ([e for e in events if e.kind == kind] for kind in ("pair", "like", "dislike"))
        emb = self.db.embedder
        try:
            model = train_reward(
                emb.name,
                chosen=self.image_vectors([e.image for e in pairs]),
                rejected=self.image_vectors([e.other for e in pairs]),
                pair_prompts=emb.embed_texts([e.prompt for e in pairs]) if pairs else None,
                likes=self.image_vectors([e.image for e in likes]),
                dislikes=self.image_vectors([e.image for e in dislikes]),
                dim=emb.dim, l2=l2, seed=seed)
            if store and not model.cold_start:
                self.db.store.put_blob(self.user, BLOB_NAME, model.to_bytes(), model=emb.name,
                                       profile_generation=generation)
        except (ConceptNotFound, ProfileChanged) as e:  # ConceptNotFound: an image of a removed event, gone
            if self.db.store.profile_generation(self.user) == generation:
                raise
            raise ProfileChanged(f"the preference profile of {self.user!r} was reset or lost entries while the "
                                 "reward model trained: nothing was stored (train it again)") from e
        return model

    def reward(self) -> RewardModel:
        """The stored reward model, or an explicit cold-start one (all scores 0) when the user has none."""
        stored = self.db.store.get_blob(self.user, BLOB_NAME)
        emb = self.db.embedder
        if stored is None:
            return cold_start(emb.dim, emb.name)
        model = RewardModel.from_bytes(stored[0])
        if model.embedder != emb.name:
            raise MmpersonaError(f"the stored reward model of {self.user!r} was trained on {model.embedder!r} "
                                 f"embeddings, not {emb.name!r}: run `mmpersona profile train-reward` again")
        return model

    def summary(self) -> dict[str, Any]:
        counts = {k: len(self.events(k)) for k in ("like", "dislike", "pair", "prompt")}
        stored = self.db.store.get_blob(self.user, BLOB_NAME)
        return {"user": self.user, "counts": counts, "attributes": self.attributes.to_dict(),
                "reward_model": RewardModel.from_bytes(stored[0]).summary() if stored else {"cold_start": True}}
