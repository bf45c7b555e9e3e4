"""The preference conditioning on a plain diffusers pipeline a user already has, in one line:

    import mmpersona
    pipe = mmpersona.personalize(pipe, user_embedding, adapter="runs/adapter", scale=1.0)
    image = pipe("a cabin in the woods", num_inference_steps=30).images[0]

`user_embedding` is a user's vector (`PreferenceProfile.user_embedding()`, or `mmpersona.user_embedding.interpolate`
between two) or a `PreferenceProfile` (its vector, the embedder checked against the adapter's); `adapter` a trained
preference adapter (a folder, a hub id or a loaded `PreferenceAdapter`). The result is called like the pipeline
itself: the prompt (and negative prompt) are encoded as diffusers encodes them, the user's K tokens appended
(`pipelines.preference_adapter.append_tokens`), and the pipeline runs on `prompt_embeds`; every other attribute is
the pipeline's. The images are those of `PersonalizedT2IPipeline(strategies=["preference"])` for the same prompt,
seed, steps and guidance (tests/test_elicitation.py). SD 1.5 and SDXL families (SDXL's pooled embedding shifted
too); the tokens change nothing at `scale=0`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmpersona.errors import MmpersonaError

if TYPE_CHECKING:
    from .preference_adapter import PreferenceAdapter


class PersonalizedDiffusers:
    """A diffusers text-to-image pipeline with a user's preference tokens (see `personalize`)."""

    def __init__(self, pipeline: Any, user_embedding: Any, adapter: "PreferenceAdapter", scale: float = 1.0):
        self.pipeline = pipeline
        self.user_embedding = user_embedding
        self.adapter = adapter
        self.scale = float(scale)

    def __getattr__(self, name: str) -> Any:  # everything else is the pipeline's
        if name == "pipeline":
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def __call__(self, prompt: "str | list[str] | None" = None, negative_prompt: "str | list[str] | None" = None, *,
                 guidance_scale: float = 7.5, **kwargs: Any) -> Any:
        from .preference_adapter import append_tokens, encode

        if prompt is None or any(k in kwargs for k in ("prompt_embeds", "negative_prompt_embeds")):
            raise MmpersonaError("a personalized pipeline takes `prompt` (and `negative_prompt`): it computes the "
                                 "prompt embeddings itself, with the user's tokens appended")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        cfg = guidance_scale > 1.0
        t2i = _loaded(self.pipeline)
        pe, ne, pooled, neg_pooled = encode(t2i, prompts, negatives, cfg=cfg)
        if self.scale != 0:
            tokens, shift = self.adapter.tokens(self.user_embedding)
            pe, ne, pooled, neg_pooled = append_tokens(tokens, shift, pe, ne, pooled, neg_pooled, scale=self.scale)
        text: dict[str, Any] = {"prompt_embeds": pe, "negative_prompt_embeds": ne}
        if t2i.is_xl:
            text.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
        return self.pipeline(**text, guidance_scale=guidance_scale, **kwargs)


def _loaded(pipeline: Any):
    """The pipeline as the toolkit's `LoadedT2I` (what `encode` and the adapter's checks read)."""
    from mmpersona.models import LoadedT2I
    from mmpersona.models.registry import ModelSpec

    role = "t2i_xl" if hasattr(pipeline, "text_encoder_2") else "t2i"
    name = str(getattr(pipeline, "name_or_path", "") or getattr(pipeline.config, "_name_or_path", "") or "diffusers")
    return LoadedT2I(pipeline, ModelSpec(role, name))


def personalize(pipeline: Any, user_embedding: Any, *, adapter: Any, scale: float = 1.0,
                device: Any = None) -> PersonalizedDiffusers:
    """`pipeline` (a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline, or the same wrapped again)
    steered by `user_embedding` through the preference `adapter` at `scale` (0: unchanged, 1: as trained)."""
    import numpy as np

    from mmpersona.preferences import PreferenceProfile

    from .preference_adapter import PreferenceAdapter

    if isinstance(pipeline, PersonalizedDiffusers):
        pipeline = pipeline.pipeline
    if not hasattr(pipeline, "unet") or not hasattr(pipeline, "encode_prompt"):
        raise MmpersonaError(f"personalize takes a diffusers Stable Diffusion (1.5 or XL) pipeline, got "
                             f"{type(pipeline).__name__}")
    if not -4.0 <= float(scale) <= 4.0:
        raise MmpersonaError(f"scale must be in [-4, 4], got {scale}")
    t2i = _loaded(pipeline)
    if not isinstance(adapter, PreferenceAdapter):
        adapter = PreferenceAdapter.load(str(adapter), device=device if device is not None else t2i.device)
    if isinstance(user_embedding, PreferenceProfile):
        adapter.check(t2i, user_embedding.db.embedder.name)
        u = user_embedding.user_embedding()
        if u is None:
            raise MmpersonaError(f"{user_embedding.user!r} has no pairwise choices, likes or comments yet: no user "
                                 "embedding to personalize with")
    else:
        adapter.check(t2i, adapter.config.embedder)  # the model; the vector's size is checked below
        u = np.asarray(user_embedding, np.float32).reshape(-1)
        if u.shape != (adapter.config.embed_dim,) or not np.isfinite(u).all():
            raise MmpersonaError(f"the user embedding must be {adapter.config.embed_dim} finite numbers (the "
                                 f"adapter's {adapter.config.embedder!r} embedder), got shape {u.shape}")
    return PersonalizedDiffusers(pipeline, u, adapter, scale)
