"""Personalized text-to-image: a diffusers pipeline steered by a user's preference profile and concepts.

    from pipelines import PersonalizedT2IPipeline
    pipe = PersonalizedT2IPipeline("concepts.db", preset="tiny")
    result = pipe("a photo of <bo> on the beach", user="alice", n=2, strategies=["subject", "attributes", "rerank"])
    result.images, result.scores, result.metadata

Strategies are small units, each with a config dataclass, registered by name and composed in one call:
- attributes: liked attributes join the prompt, disliked ones the negative prompt; the text encoders run once
  (pooled embeddings too for SDXL);
- ip_adapter: embeddings of liked images are the positive IP-Adapter input, of disliked images the negative
  half (diffusers' `ip_adapter_image_embeds`, shapes checked here since diffusers does not);
- subject: `<name>` from the user's concept database brings its reference images in as IP-Adapter input, and
  the handle is replaced by its category / description;
- lora: the user's LoRA (trained with Diffusion-DPO) loaded by adapter name with a weight;
- preference: the user's embedding (`PreferenceProfile.user_embedding`) through a trained preference adapter
  (`pipelines.preference_adapter`) becomes K tokens appended to the prompt embeddings: no training per user;
- viper: ViPer's embedding arithmetic, E(p) + beta * (E(liked attributes) - E(disliked attributes)), in one
  UNet pass per step (ViPer's released code spends a second one on the attribute prompts);
- rerank: best-of-N by the personal reward model.

Every strategy changes the text, the embeddings or the adapters going into ONE diffusers call: each denoising step
is one UNet pass whatever the combination.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from mmpersona.errors import MmpersonaError

from .caching import UserCache

if TYPE_CHECKING:
    from PIL import Image

    from mmpersona.conceptdb import ConceptDB
    from mmpersona.models import LoadedT2I
    from mmpersona.preferences import PreferenceProfile

logger = logging.getLogger(__name__)

HANDLE = re.compile(r"<([^<>\n]{1,64})>")
LORA_BLOB = "dpo_lora"
#: what a call uses when it names no strategies (those needing an IP-Adapter only when one is loaded)
DEFAULT_STRATEGIES = ("attributes", "ip_adapter", "rerank")


class UnknownStrategyError(MmpersonaError, KeyError):
    """A strategy name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


# ------------------------------------------------------------------------------------------ registry


STRATEGIES: dict[str, type["Strategy"]] = {}


def register_strategy(name: str) -> Callable[[type["Strategy"]], type["Strategy"]]:
    """Class decorator: make a strategy available by `name`."""

    def wrap(cls: type["Strategy"]) -> type["Strategy"]:
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return wrap


def get_strategy(name: str, config: Any = None) -> "Strategy":
    cls = STRATEGIES.get(name)
    if cls is None:
        raise UnknownStrategyError(f"unknown strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    return cls(config if config is not None else cls.config_cls())


@dataclass
class Conditioning:
    """What strategies change before generation; read by the pipeline call."""

    prompt: str
    negative_prompt: str = ""
    ip_positive: list[Any] = field(default_factory=list)  # image embeddings (dim,), one per IP image slot
    ip_negative: list[Any] = field(default_factory=list)  # averaged into the negative half
    ip_scale: float = 0.0
    loras: list[tuple[str, float]] = field(default_factory=list)
    candidates: int = 1  # images generated per requested image (rerank)
    tokens: Any = None  # (tokens (1, K, width), pooled shift or None, scale) appended to the prompt embeddings
    viper: tuple[str, str, float, bool] | None = None  # (liked prompt, disliked prompt, beta, split)
    notes: dict[str, Any] = field(default_factory=dict)  # per strategy, for the sidecar

    @property
    def edits_embeddings(self) -> bool:
        return self.tokens is not None or self.viper is not None


class Strategy:
    """Base class: `apply` edits the conditioning; `select` may pick among generated candidates."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    #: True for strategies that cannot work without an IP-Adapter loaded in the pipeline
    needs_ip_adapter: ClassVar[bool] = False

    def __init__(self, config: Any):
        if not isinstance(config, self.config_cls):
            raise MmpersonaError(f"strategy {self.name!r} takes a {self.config_cls.__name__}, "
                                 f"got {type(config).__name__}")
        self.config = config

    def apply(self, run: "Run", cond: Conditioning) -> None:
        pass

    def select(self, run: "Run", images: list, scores: list[float], n: int) -> list[int]:
        return list(range(n))


@dataclass
class AttributesConfig:
    """max_liked / max_disliked: attributes used at most."""

    max_liked: int = 8
    max_disliked: int = 8

    def pick(self, run: "Run") -> tuple[list[str], list[str]]:
        """The user's liked and disliked attributes, at most as many as configured."""
        attrs = run.profile.attributes
        return attrs.liked[: self.max_liked], attrs.disliked[: self.max_disliked]


@register_strategy("attributes")
class AttributesStrategy(Strategy):
    config_cls = AttributesConfig

    def apply(self, run, cond):
        liked, disliked = self.config.pick(run)
        if liked:
            cond.prompt = f"{cond.prompt}, {', '.join(liked)}"
        if disliked:
            cond.negative_prompt = ", ".join(filter(None, [cond.negative_prompt, *disliked]))
        cond.notes["attributes"] = {"liked": liked, "disliked": disliked}


@dataclass
class IPAdapterConfig:
    """scale: IP-Adapter strength; max_images: liked / disliked images used at most (most recent first)."""

    scale: float = 0.6
    max_images: int = 8


@register_strategy("ip_adapter")
class IPAdapterStrategy(Strategy):
    config_cls = IPAdapterConfig
    needs_ip_adapter = True

    def apply(self, run, cond):
        liked = run.profile.events("like")[-self.config.max_images:]
        disliked = run.profile.events("dislike")[-self.config.max_images:]
        if not liked:
            cond.notes["ip_adapter"] = {"skipped": "the user has no liked images"}
            return
        pos = run.image_embeds([e.image for e in liked]).mean(0)
        cond.ip_positive.append(pos)
        if disliked:
            cond.ip_negative.append(run.image_embeds([e.image for e in disliked]).mean(0))
        cond.ip_scale = max(cond.ip_scale, self.config.scale)
        cond.notes["ip_adapter"] = {"liked": len(liked), "disliked": len(disliked), "scale": self.config.scale}


@dataclass
class SubjectConfig:
    """scale: IP-Adapter strength for the subject's reference images; max_images per subject."""

    scale: float = 0.7
    max_images: int = 4


@register_strategy("subject")
class SubjectStrategy(Strategy):
    config_cls = SubjectConfig

    def apply(self, run, cond):
        found = []
        for handle in dict.fromkeys(HANDLE.findall(cond.prompt)):
            concept = run.db.store.find(run.user, handle)
            if concept is None:
                raise MmpersonaError(f"<{handle}> is not in {run.user!r}'s concept database "
                                     "(add it with `mmpersona concepts add`)")
            words = concept.category or concept.info[:60] or concept.name
            cond.prompt = cond.prompt.replace(f"<{handle}>", words)
            if concept.images and run.pipeline.t2i.ip_adapter:  # without one, the words alone
                cond.ip_positive.append(run.image_embeds(list(concept.images[: self.config.max_images])).mean(0))
                cond.ip_scale = max(cond.ip_scale, self.config.scale)
            found.append(concept.handle)
        cond.notes["subject"] = {"concepts": found}
        if not run.pipeline.t2i.ip_adapter:
            cond.notes["subject"]["images"] = "not used: no IP-Adapter is loaded"


@dataclass
class LoraConfig:
    """weight: adapter weight in `set_adapters`."""

    weight: float = 1.0


@register_strategy("lora")
class LoraStrategy(Strategy):
    config_cls = LoraConfig

    def apply(self, run, cond):
        name = run.ensure_lora()
        cond.loras.append((name, self.config.weight))
        cond.notes["lora"] = {"adapter": name, "weight": self.config.weight}


@dataclass
class PreferenceConfig:
    """adapter: a trained preference adapter (folder or hub id; None: the pipeline's `adapter`); scale: 0 leaves
    generation as it was, 1 is the adapter as trained; embedding: a user embedding to use instead of the user's
    own (for example `mmpersona.user_embedding.interpolate(a, b, t)` between two users)."""

    adapter: str | None = None
    scale: float = 1.0
    embedding: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.embedding is not None:
            import numpy as np

            values = np.asarray(self.embedding, np.float64).reshape(-1)
            if not values.size or not np.isfinite(values).all():
                raise MmpersonaError("PreferenceConfig.embedding must be a non-empty vector of finite numbers")
            self.embedding = tuple(float(x) for x in values)
        if not -4.0 <= float(self.scale) <= 4.0:
            raise MmpersonaError(f"PreferenceConfig.scale must be in [-4, 4], got {self.scale}")


@register_strategy("preference")
class PreferenceStrategy(Strategy):
    config_cls = PreferenceConfig

    def apply(self, run, cond):
        adapter = run.pipeline.preference_adapter(self.config.adapter)
        given = self.config.embedding is not None
        u = self.config.embedding if given else run.profile.user_embedding()
        if u is None:
            cond.notes["preference"] = {"skipped": "the user has no pairwise choices, likes or comments yet"}
            return
        if float(self.config.scale) == 0:  # documented as generation unchanged: nothing is appended
            cond.notes["preference"] = {"skipped": "scale 0"}
            return
        tokens, shift = adapter.tokens(u)
        cond.tokens = (tokens, shift, float(self.config.scale))
        cond.notes["preference"] = {"adapter": run.pipeline.adapter_ref(self.config.adapter),
                                    "tokens": adapter.config.tokens, "scale": self.config.scale,
                                    "embedding": "given" if given else "the user's own"}


@dataclass
class ViperConfig(AttributesConfig):
    """beta: ViPer's degree (0.85 in its released pipeline); split: its released form, the liked attributes
    added to the prompt's embeddings and the disliked ones to the negative prompt's, instead of the difference
    added to the prompt's; max_liked / max_disliked as for `attributes`."""

    beta: float = 0.85
    split: bool = False


@register_strategy("viper")
class ViperStrategy(Strategy):
    config_cls = ViperConfig

    def apply(self, run, cond):
        liked, disliked = self.config.pick(run)
        if not liked and not disliked:
            cond.notes["viper"] = {"skipped": "the user has no liked or disliked attributes yet"}
            return
        cond.viper = (", ".join(liked), ", ".join(disliked), float(self.config.beta), bool(self.config.split))
        cond.notes["viper"] = {"liked": liked, "disliked": disliked, "beta": self.config.beta,
                               "split": self.config.split}


@dataclass
class RerankConfig:
    """candidates: images generated per image returned; the best are kept by the personal reward model, and with
    `population` (a population scorer: "pickscore", a hub id, "tiny:pickscore", or a name in the pipeline's
    `scorers`) by `mmpersona.scorers.combine` of the two: a user with no choices yet is ranked by the population
    scorer alone, their own reward weighs as much at `population_prior` choices. diversity_floor: when a
    call returns several images, their diversity (mean pairwise CLIP distance) is kept at least this share of
    all the candidates' (a vanilla call's, in expectation), by the best-scoring set that keeps it when the best
    by score alone fall below it (`mmpersona.diversity.select_diverse`); 0 turns it off."""

    candidates: int = 4
    diversity_floor: float = 0.8
    population: str | None = None
    population_prior: float = 8.0

    def __post_init__(self):
        if self.population is not None and (not isinstance(self.population, str) or not self.population.strip()):
            raise MmpersonaError("RerankConfig.population must be a scorer name, hub id or folder (a str); put your "
                                 "own scorer object in `PersonalizedT2IPipeline.scorers` under a name")
        if not float(self.population_prior) > 0:
            raise MmpersonaError(f"RerankConfig.population_prior must be positive, got {self.population_prior}")
        if self.candidates < 1:
            raise MmpersonaError(f"RerankConfig.candidates must be at least 1, got {self.candidates}")
        if not 0.0 <= float(self.diversity_floor) <= 1.0:
            raise MmpersonaError(f"RerankConfig.diversity_floor must be in [0, 1], got {self.diversity_floor}")


@register_strategy("rerank")
class RerankStrategy(Strategy):
    config_cls = RerankConfig

    def apply(self, run, cond):
        population = self.config.population
        if run.reward.cold_start and population is None:  # every score would be 0: candidates made for nothing
            cond.notes["rerank"] = {"candidates": 1, "cold_start": True,
                                    "skipped": "no personal reward model yet: one candidate per image"}
            return
        cond.candidates = max(cond.candidates, self.config.candidates)
        cond.notes["rerank"] = {"candidates": self.config.candidates, "cold_start": run.reward.cold_start}
        if population is not None:
            run.population = (population, float(self.config.population_prior))
            cond.notes["rerank"]["population"] = population

    def select(self, run, images, scores, n):
        if n < 2 or not self.config.diversity_floor or run.vectors is None:
            return sorted(range(len(images)), key=lambda i: -scores[i])[:n]
        from mmpersona.diversity import select_diverse

        vectors = [run.vectors[id(image)] for image in images]
        order, info = select_diverse(scores, vectors, n, float(self.config.diversity_floor))
        if run.notes is not None and "rerank" in run.notes:
            run.notes["rerank"]["diversity"] = info
        return order[:n]


def _candidates(strategies: "Sequence[Strategy]") -> int:
    """Images generated per image returned, at most (reranking's candidates)."""
    return max([1, *(s.config.candidates for s in strategies if isinstance(s, RerankStrategy))])


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class T2IResult:
    """Images (best first when reranked), their personal reward scores, and one metadata dict per image."""

    images: list["Image.Image"]
    scores: list[float]
    metadata: list[dict[str, Any]]


class Run:
    """Per-call state the strategies read: user, profile, reward model, image-embedding helpers."""

    def __init__(self, pipeline: "PersonalizedT2IPipeline", user: str):
        from mmpersona.preferences import PreferenceProfile

        self.pipeline = pipeline
        self.db = pipeline.db
        self.user = user
        self.profile: "PreferenceProfile" = PreferenceProfile(pipeline.db, user)
        self._reward = None
        self.vectors: dict[int, Any] | None = None  # id(image) -> its embedder vector, once scored
        self.population: tuple[str, float] | None = None  # (scorer, prior choices) when reranking with one
        self.parts: dict[str, list[float]] = {}  # the personal and population scores, per candidate
        self.notes: dict[str, Any] | None = None  # the conditioning's notes (for the sidecar)

    @property
    def reward(self):
        if self._reward is None:
            self._reward = self.profile.reward()
        return self._reward

    def image_embeds(self, hashes: Sequence[str]):
        """IP-Adapter image-encoder embeddings (n, dim) of stored images."""
        import torch

        from mmpersona.images import load_image

        pipe = self.pipeline.diffusers
        if getattr(pipe, "image_encoder", None) is None:
            raise MmpersonaError("this pipeline has no IP-Adapter image encoder (load it with ip_adapter=True)")
        # Cached per user, as the CLIP vectors are (`ConceptStore.known_vectors`): a cache shared by content hash
        # made another user's first use of an image alice had liked or registered twice as fast as an unseen
        # one, which told them she had it.
        cache = self.pipeline.ip_cache
        out = []
        for h in hashes:
            embeds = cache.get(self.user, h)
            if embeds is None:
                image = load_image(self.db.store.image_bytes(self.user, h))
                with torch.inference_mode():
                    embeds = pipe.encode_image(image, self.pipeline.t2i.device, 1)[0][0]
                cache.put(self.user, h, embeds)
            out.append(embeds)
        return torch.stack(out)

    def ensure_lora(self) -> str:
        return self.pipeline.load_user_lora(self.user)


class PersonalizedT2IPipeline:
    """A diffusers SD / SDXL pipeline from the registry, steered per user by composable strategies.

    Args:
        db: a `ConceptDB` or database path (its embedder scores images for the reward model).
        t2i: a `LoadedT2I`, or a model id / preset choice for `role`.
        role: "t2i" (SD 1.5 family) or "t2i_xl" (SDXL).
        strategies: default strategy names (a call may pass others); None: `DEFAULT_STRATEGIES` less those that
            need an IP-Adapter when none is loaded. configs: {name: config} overrides.
        batch_size: images generated per diffusers call at most (all candidates at once when None); fewer
            means less memory, the same images.
        load_options: passed to `load_t2i` when the model is loaded here (`cpu_offload`, `vae_slicing`,
            `vae_tiling`, `ip_adapter`).
        adapter: the preference adapter the `preference` strategy uses (a folder, a hub id or a loaded
            `PreferenceAdapter`); a strategy config may name another.
    """

    def __init__(self, db: "ConceptDB | str | Path | None" = None, *, t2i: "LoadedT2I | str | None" = None,
                 role: str = "t2i", preset: str = "default", device: Any = "auto", dtype: Any = None,
                 embedder: Any = None, strategies: Sequence[str] | None = None,
                 configs: dict[str, Any] | None = None, batch_size: int | None = None,
                 load_options: dict[str, Any] | None = None, adapter: Any = None):
        from mmpersona.conceptdb import ConceptDB
        from mmpersona.models import LoadedT2I, load_t2i

        if batch_size is not None and batch_size < 1:
            raise MmpersonaError(f"`batch_size` must be at least 1, got {batch_size}")
        self.configs = dict(configs or {})
        if strategies is not None:
            self._strategies(strategies)  # names and configs fail before any model is loaded
        self.db = db if isinstance(db, ConceptDB) else ConceptDB(db, embedder=embedder, preset=preset,
                                                                  device=device, dtype=dtype)
        self.t2i = t2i if isinstance(t2i, LoadedT2I) else load_t2i(t2i, role=role, preset=preset, device=device,
                                                                   dtype=dtype, **(load_options or {}))
        if strategies is None:
            strategies = [n for n in DEFAULT_STRATEGIES if self.t2i.ip_adapter or not STRATEGIES[n].needs_ip_adapter]
        self.default_strategies = self._strategies(strategies)
        self.batch_size = batch_size
        self.diffusers = self.t2i.pipeline
        self.diffusers.set_progress_bar_config(disable=True)
        self._loras: dict[str, str] = {}
        self.ip_cache = UserCache()  # IP-Adapter image embeddings, per user
        self.adapter = adapter
        self._adapters: dict[str, Any] = {}
        self.preset = preset
        #: population scorers by name (`RerankConfig.population`): loaded on first use, or your own object with
        #: `name` and `score(images, prompt)` put here
        self.scorers: dict[str, Any] = {}
        self._scorers_lock = threading.Lock()

    def _strategies(self, names: Sequence[str]) -> list[Strategy]:
        if isinstance(names, str):
            names = [names]
        chosen = [get_strategy(n, self.configs.get(n)) for n in dict.fromkeys(names)]
        t2i = getattr(self, "t2i", None)
        missing = [s.name for s in chosen if s.needs_ip_adapter and t2i is not None and not t2i.ip_adapter]
        if missing:
            why = t2i.ip_adapter_error or "it was loaded with ip_adapter=False"
            raise MmpersonaError(f"strategy {', '.join(map(repr, missing))} needs an IP-Adapter, and none is loaded "
                                 f"({why})")
        return chosen

    def check_inputs(self, prompt: Any, user: Any, n: int, steps: int, seed: int = 0,
                     strategies: Sequence[str] | None = None) -> None:
        """Refuse a call that cannot run, before anything runs (the server calls it before a request queues)."""
        from mmpersona.models.sampling import SEED_MAX

        if not isinstance(prompt, str) or not prompt.strip():
            raise MmpersonaError(f"`prompt` must be a non-empty string, got {prompt!r}")
        if not isinstance(user, str) or not user.strip():
            raise MmpersonaError(f"`user` must be a non-empty string, got {user!r}")
        if n < 1 or steps < 1:
            raise MmpersonaError(f"`n` and `steps` must be at least 1, got n={n}, steps={steps}")
        images = n * _candidates(self._strategies(strategies) if strategies is not None else self.default_strategies)
        if not 0 <= seed <= SEED_MAX - (images - 1):
            raise MmpersonaError(f"seed {seed}: the {images} image(s) this makes (reranking's candidates included) "
                                 f"take seeds {seed}, {seed} + 1, ..., which must stay within 0 ... {SEED_MAX}")

    @property
    def native_size(self) -> int:
        """The side the model was trained at (its default size): the UNet's sample size times the VAE's factor."""
        pipe = self.diffusers
        size = pipe.unet.config.sample_size
        return int(size if isinstance(size, int) else max(size)) * int(getattr(pipe, "vae_scale_factor", 8))

    def work(self, *, n: int, steps: int, width: int | None = None, height: int | None = None,
             strategies: Sequence[str] | None = None) -> float:
        """What a call costs at most, in image-steps at the model's native size: images (reranking's candidates
        included) x steps x pixels / native pixels. Known before anything runs, for budgets."""
        chosen = self._strategies(strategies) if strategies is not None else self.default_strategies
        candidates = _candidates(chosen)
        native = self.native_size
        pixels = (width or native) * (height or native)
        return n * candidates * steps * pixels / native**2

    def condition(self, prompt: str, user: str, strategies: list[Strategy]) -> tuple[Conditioning, Run]:
        """Apply the strategies in order; returns the conditioning and the per-call state."""
        run = Run(self, user)
        cond = Conditioning(prompt)
        run.notes = cond.notes
        for s in strategies:
            s.apply(run, cond)
        return cond, run

    def ip_adapter_embeds(self, cond: Conditioning, do_cfg: bool):
        """`ip_adapter_image_embeds` for diffusers: one tensor (2 or 1, n_images, dim), [negative; positive]."""
        import torch

        encoder = getattr(self.diffusers, "image_encoder", None)
        if encoder is None:
            return None
        dim = encoder.config.projection_dim
        dtype, device = self.diffusers.unet.dtype, self.t2i.device
        if cond.ip_positive:
            pos = torch.stack(cond.ip_positive)[None]  # (1, n_images, dim)
        else:  # an IP-Adapter is loaded but unused: neutral input at scale 0
            pos = torch.zeros(1, 1, dim)
        neg = torch.stack(cond.ip_negative).mean(0).expand_as(pos) if cond.ip_negative else torch.zeros_like(pos)
        embeds = torch.cat([neg, pos]) if do_cfg else pos
        expected = (2 if do_cfg else 1, pos.shape[1], dim)
        if tuple(embeds.shape) != expected:  # diffusers would not notice a wrong batch size
            raise MmpersonaError(f"IP-Adapter embeddings have shape {tuple(embeds.shape)}, expected {expected}")
        return [embeds.to(device=device, dtype=dtype)]

    def __call__(self, prompt: str, *, user: str, n: int = 1, steps: int = 30, guidance_scale: float = 7.5,
                 seed: int = 0, strategies: Sequence[str] | None = None, height: int | None = None,
                 width: int | None = None, stop: "threading.Event | None" = None) -> T2IResult:
        """Generate `n` images of `prompt` for `user`; seeds are `seed`, `seed + 1`, ... Setting `stop` (a
        `threading.Event`) ends the work at the next denoising step, raising `mmpersona.cancel.Cancelled`."""
        import torch

        from mmpersona.cancel import check

        self.check_inputs(prompt, user, n, steps, seed, strategies)
        chosen = self._strategies(strategies) if strategies is not None else self.default_strategies
        start = time.perf_counter()
        cond, run = self.condition(prompt, user, chosen)
        total = n * cond.candidates
        seeds = [seed + i for i in range(total)]
        pipe = self.diffusers
        do_cfg = guidance_scale > 1.0
        kwargs: dict[str, Any] = {}
        if getattr(pipe, "image_encoder", None) is not None:
            pipe.set_ip_adapter_scale(cond.ip_scale if cond.ip_positive else 0.0)
            kwargs["ip_adapter_image_embeds"] = self.ip_adapter_embeds(cond, do_cfg)
        if cond.loras:
            pipe.enable_lora()  # a previous call may have disabled them
            pipe.set_adapters([name for name, _ in cond.loras], adapter_weights=[w for _, w in cond.loras])
        elif self._loras:
            pipe.disable_lora()
        text: dict[str, Any] = (self.embeddings(cond, do_cfg) if cond.edits_embeddings else
                                {"prompt": cond.prompt, "negative_prompt": cond.negative_prompt or None})
        if stop is not None:
            def stop_between_steps(pipe, step, timestep, tensors):
                check(stop)
                return tensors

            kwargs["callback_on_step_end"] = stop_between_steps
        images: list = []
        batch = self.batch_size or total
        try:
            for first in range(0, total, batch):
                check(stop)
                part = seeds[first : first + batch]  # each image keeps its own seed: batching changes nothing
                out = pipe(**text, num_inference_steps=steps,
                           guidance_scale=guidance_scale, num_images_per_prompt=len(part), height=height,
                           width=width, generator=[torch.Generator("cpu").manual_seed(s) for s in part], **kwargs)
                images += out.images
        finally:
            if cond.loras:
                pipe.disable_lora()
        scores = self.score(run, images, prompt)
        order = list(range(total))
        for s in chosen:
            order = [order[i] for i in s.select(run, [images[j] for j in order], [scores[j] for j in order], n)]
        keep = order[:n]
        elapsed = time.perf_counter() - start
        meta_common = {
            "prompt": prompt, "final_prompt": cond.prompt, "negative_prompt": cond.negative_prompt, "user": user,
            "model": self.t2i.spec.id,
            "ip_adapter": None if self.t2i.spec.ip_adapter is None else asdict(self.t2i.spec.ip_adapter),
            "embedder": self.db.embedder.name, "steps": steps, "guidance_scale": guidance_scale,
            "strategies": {s.name: asdict(s.config) for s in chosen}, "notes": cond.notes,
            "reward_cold_start": run.reward.cold_start, "seconds": round(elapsed, 3),
        }
        return T2IResult([images[i] for i in keep], [scores[i] for i in keep],
                         [{**meta_common, "seed": seeds[i], "reward_score": scores[i],
                           **{name: values[i] for name, values in run.parts.items()},
                           "candidate": i, "candidates": total} for i in keep])

    def score(self, run: Run, images: list, prompt: str) -> list[float]:
        """Personal reward scores (0 for a cold-start user); with a population scorer in the rerank, both combined
        (`mmpersona.scorers.combine`), each kept in `run.parts`."""
        from mmpersona.scorers import combine

        model = run.reward
        if model.cold_start and run.population is None:
            return [0.0] * len(images)
        emb = self.db.embedder
        vectors = emb.embed_images(images)
        run.vectors = {id(image): vector for image, vector in zip(images, vectors, strict=True)}
        personal = None if model.cold_start else [float(s) for s in model.score(vectors, emb.embed_texts([prompt])[0])]
        if run.population is None:
            return personal
        ref, prior = run.population
        population = [float(s) for s in self.population_scorer(ref).score(images, prompt)]
        run.parts = {"population_score": population}
        if personal is not None:
            run.parts["personal_score"] = personal
        choices = 0 if model.cold_start else model.pairs + model.likes + model.dislikes
        return [float(s) for s in combine(personal, population, choices, prior)]

    def population_scorer(self, ref: str):
        """The population scorer `ref` names: one put in `scorers` under that name, or loaded once (on the
        pipeline's device) by `mmpersona.scorers.load_scorer`."""
        from mmpersona.scorers import load_scorer

        with self._scorers_lock:
            if ref not in self.scorers:
                self.scorers[ref] = load_scorer(ref, preset=self.preset, device=self.t2i.device)
            return self.scorers[ref]

    def adapter_ref(self, ref: Any = None) -> str:
        ref = ref if ref is not None else self.adapter
        if ref is None:
            raise MmpersonaError("the `preference` strategy needs a trained preference adapter: pass "
                                 "`adapter=` (a folder or hub id; `--adapter` on the CLI), or train one with "
                                 "`mmpersona adapter train`")
        return ref if isinstance(ref, str) else str(getattr(ref, "source", type(ref).__name__))

    def preference_adapter(self, ref: Any = None):
        """The preference adapter `ref` names (default: the pipeline's), loaded once and checked against the model
        and the database's embedder."""
        from .preference_adapter import PreferenceAdapter

        ref = ref if ref is not None else self.adapter
        if isinstance(ref, PreferenceAdapter):
            ref.check(self.t2i, self.db.embedder.name)
            return ref
        key = self.adapter_ref(ref)
        if key not in self._adapters:
            adapter = PreferenceAdapter.load(key, device=self.t2i.device)
            adapter.check(self.t2i, self.db.embedder.name)
            self._adapters[key] = adapter
        return self._adapters[key]

    def embeddings(self, cond: Conditioning, do_cfg: bool) -> dict[str, Any]:
        """diffusers' `prompt_embeds` (and negative, pooled) with the strategies' embedding edits applied."""
        from .preference_adapter import append_tokens, encode

        pe, ne, pooled, neg_pooled = encode(self.t2i, [cond.prompt], [cond.negative_prompt], cfg=do_cfg)
        if cond.viper is not None:
            liked, disliked, beta, split = cond.viper
            vp, _, vp_pooled, _ = encode(self.t2i, [liked, disliked], None, cfg=False)
            if split:  # ViPer's released form
                pe = pe + beta * vp[:1]
                if ne is not None:
                    ne = ne + beta * vp[1:]
            else:
                pe = pe + beta * (vp[:1] - vp[1:])
        if cond.tokens is not None:
            tokens, shift, scale = cond.tokens
            pe, ne, pooled, neg_pooled = append_tokens(tokens, shift, pe, ne, pooled, neg_pooled, scale=scale)
        out = {"prompt_embeds": pe, "negative_prompt_embeds": ne}
        if self.t2i.is_xl:
            out.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
        return out

    def load_user_lora(self, user: str) -> str:
        """Load the user's DPO LoRA into the pipeline once per trained version, by adapter name; returns the name.

        Names are unique in the diffusers pipeline, which other `PersonalizedT2IPipeline`s may share."""
        import hashlib

        stored = self.db.store.get_blob(user, LORA_BLOB)
        if stored is None:
            raise MmpersonaError(f"user {user!r} has no LoRA yet: train one with `mmpersona profile train-lora`")
        data, model = stored
        if model != self.t2i.spec.id:
            raise MmpersonaError(f"{user!r}'s LoRA was trained for {model!r}, not {self.t2i.spec.id!r}")
        key = f"{user}\0{hashlib.sha256(data).hexdigest()}"  # a retrained LoRA is loaded afresh
        if key in self._loras:
            return self._loras[key]
        from safetensors.torch import load

        taken = set(getattr(self.diffusers.unet, "peft_config", None) or {})
        i = len(self._loras)
        while f"user_{i}" in taken:
            i += 1
        name = f"user_{i}"
        self.diffusers.load_lora_weights(load(data), adapter_name=name)
        self._loras[key] = name
        return name


def strategy_help() -> dict[str, list[str]]:
    """Each registered strategy with its config fields, for CLI help and errors."""
    return {name: [f.name for f in fields(cls.config_cls)] for name, cls in sorted(STRATEGIES.items())}
