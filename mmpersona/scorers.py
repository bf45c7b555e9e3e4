"""Population scorers: what people in general prefer, beside what one user prefers (`mmpersona.reward`).

    scorer = load_scorer("pickscore")                 # or a hub id, "tiny:pickscore", or your own object
    scorer.score(images, "a cabin in the woods")      # one number per image, higher is preferred

A scorer is any object with a `name` and `score(images, prompt) -> np.ndarray` (`PopulationScorer`): reranking
(`RerankConfig(population=...)`) takes one by reference or as an object. Built in, by hub id through the same
`from_pretrained` path the tests take with a tiny double:
- `pickscore` (`yuvalkirstain/PickScore_v1`, the role's default): CLIP-H fine-tuned on Pick-a-Pic's choices;
  its processor is `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s (the PickScore repository has none). Score:
  logit_scale.exp() x cos(text, image), about 21 +- 1.2 on generated images. Any other transformers CLIPModel
  repository scores the same way (its own processor, when it has one).

HPSv2 (open_clip ViT-H-14 with a torch checkpoint) and ImageReward (BLIP with its own head and package) are not
built in; either can be passed as an object with `name` and `score`.

`combine` is the rule reranking mixes the two by (documented there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

from .errors import MmpersonaError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: short names for hub ids
ALIASES = {"pickscore": "yuvalkirstain/PickScore_v1"}
#: the processor of a scorer whose repository has none
PROCESSORS = {"yuvalkirstain/PickScore_v1": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
#: choices at which the personal reward and the population scorer weigh the same (`combine`)
PRIOR_CHOICES = 8.0


@runtime_checkable
class PopulationScorer(Protocol):
    name: str

    def score(self, images: "Sequence[Image.Image]", prompt: str) -> "np.ndarray": ...


class ClipScorer:
    """A CLIP-family preference model (PickScore): logit_scale.exp() x cosine of the prompt's and each image's
    projected features."""

    def __init__(self, model: Any, processor: Any, name: str, device: Any, dtype: Any):
        self.model, self.processor, self.name, self.device, self.dtype = model, processor, name, device, dtype

    def score(self, images: "Sequence[Image.Image]", prompt: str) -> "np.ndarray":
        import numpy as np
        import torch

        if not images:
            return np.zeros(0, np.float32)
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        text = self.processor(text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.inference_mode():
            img = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            txt = self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                               attention_mask=text["attention_mask"].to(self.device))
            img = _features(img)
            txt = _features(txt)
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            scores = self.model.logit_scale.exp() * (img @ txt[0])
        return scores.float().cpu().numpy().astype(np.float32)


def _features(out: Any):
    """transformers 5 returns a model output from get_*_features (the projected features its pooler_output)."""
    return out if hasattr(out, "norm") else out.pooler_output


def load_scorer(ref: "str | PopulationScorer | None" = None, *, preset: str = "default", device: Any = "auto",
                dtype: Any = None) -> PopulationScorer:
    """The scorer `ref` names: an object with `name` and `score` (returned as it is), "pickscore", a hub id of
    a transformers CLIPModel, `tiny:pickscore`, a local folder, or None for the preset's."""
    if ref is not None and not isinstance(ref, str):
        if not isinstance(ref, PopulationScorer):
            raise MmpersonaError(f"a population scorer needs `name` and `score(images, prompt)`, got "
                                 f"{type(ref).__name__}")
        return ref
    from .devices import resolve_device, resolve_dtype
    from .models.hub import TRANSFORMERS_PATTERNS, local_dir
    from .models.loaders import _load
    from .models.registry import resolve

    spec = resolve("scorer", ALIASES.get(ref, ref) if ref else None, preset=preset)
    path = local_dir(spec, allow_patterns=TRANSFORMERS_PATTERNS)
    processor_id = PROCESSORS.get(spec.id)
    processor_path = local_dir(resolve("scorer", processor_id), allow_patterns=TRANSFORMERS_PATTERNS) \
        if processor_id else path
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)

    def build():
        from transformers import CLIPModel, CLIPProcessor

        return CLIPProcessor.from_pretrained(str(processor_path)), CLIPModel.from_pretrained(str(path), dtype=dt)

    processor, model = _load(spec, path, "a CLIP preference model (PickScore)", build)
    return ClipScorer(model.to(dev).eval(), processor, spec.id, dev, dt)


def combine(personal: "Sequence[float] | None", population: "Sequence[float] | None",
            choices: int, prior: float = PRIOR_CHOICES) -> "np.ndarray":
    """The rule reranking ranks by: each score standardised over the call's candidates (z: mean 0, std 1; all
    equal -> 0), then weighted w z(personal) + (1 - w) z(population) with w = choices / (choices + prior):
    a new user (no choices, no personal model) is ranked by the population alone, and the user's own reward
    takes over as their choices grow (equal at `prior` choices, 80% at 4 x prior)."""
    import numpy as np

    def z(values):
        v = np.asarray(values, np.float64)
        sd = float(v.std())
        return (v - v.mean()) / sd if sd > 1e-12 else np.zeros_like(v)

    if personal is None and population is None:
        raise MmpersonaError("combine: no scores")
    if population is None:
        return np.asarray(personal, np.float64)
    if personal is None or choices <= 0:
        return z(population)
    if len(personal) != len(population):
        raise MmpersonaError(f"combine: {len(personal)} personal but {len(population)} population scores")
    w = choices / (choices + prior)
    return w * z(personal) + (1 - w) * z(population)
