"""Public loaders, one per role. Each takes a preset name, hub id, local directory or `ModelSpec`, makes it a
local directory (`hub.local_dir`) and loads it with the library's own `from_pretrained`: tiny and real models
share every line from there on."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..devices import resolve_device, resolve_dtype
from ..errors import MmpersonaError, ModelUnavailableError
from ..images import ImageInput, load_image
from .hub import OPEN_CLIP_PATTERNS, TRANSFORMERS_PATTERNS, local_dir
from .registry import ModelSpec, resolve

if TYPE_CHECKING:
    import torch

    from ..embedder import ClipEmbedder

logger = logging.getLogger(__name__)
T = TypeVar("T")

SpecLike = "str | ModelSpec | None"


def _load(spec: ModelSpec, path: Path, what: str, loader: Callable[[], T]) -> T:
    """Run a library loader, turning its failure into our error that names role, id and path."""
    try:
        return loader()
    except MmpersonaError:
        raise
    except Exception as e:  # a library error from a bad directory: re-raised with context, never swallowed
        raise ModelUnavailableError(
            spec.role, spec.id, f"{str(path)!r} could not be loaded as {what} ({type(e).__name__}: {e})",
            fix="check that the directory holds a complete model of that kind, or use `--preset tiny`",
        ) from e


# --------------------------------------------------------------------------------------------- embedder


def _open_clip_hub_id(spec: ModelSpec) -> ModelSpec:
    """Map open_clip's `ARCH:TAG` form (e.g. `ViT-L-14-336:openai`) onto the hub repo that holds it."""
    if spec.source != "hub" or spec.id.startswith("hf-hub:") or ":" not in spec.id:
        return spec
    import open_clip

    arch, tag = spec.id.rsplit(":", 1)
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ModelUnavailableError(
            spec.role, spec.id, "open_clip knows no such architecture:tag pair",
            fix="see open_clip.list_pretrained() for valid pairs, e.g. 'ViT-L-14-336:openai', or use `--preset tiny`")
    if not cfg.get("hf_hub"):
        raise ModelUnavailableError(spec.role, spec.id, "this open_clip tag is not published on the Hugging Face hub",
                                    fix="download its weights and pass the directory (local-dir layout)")
    return replace(spec, id="hf-hub:" + cfg["hf_hub"].strip("/"))


def load_embedder(spec: SpecLike = None, *, preset: str = "default", device: Any = "auto",
                  dtype: Any = None) -> "ClipEmbedder":
    """Load the open_clip embedder by preset, `hf-hub:` id, `ARCH:TAG`, `tiny:clip` or local directory."""
    from ..embedder import ClipEmbedder

    spec = _open_clip_hub_id(resolve("embedder", spec, preset=preset))
    path = local_dir(spec, allow_patterns=OPEN_CLIP_PATTERNS)
    config_file = path / "open_clip_config.json"
    if not config_file.is_file():
        raise ModelUnavailableError(spec.role, spec.id, f"{str(path)!r} has no open_clip_config.json",
                                    fix="pass a directory in open_clip's local-dir layout, or `--preset tiny`")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)

    def build():
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        return model, preprocess, tokenizer

    model, preprocess, tokenizer = _load(spec, path, "an open_clip model", build)
    model = model.to(device=dev, dtype=dt).eval()
    dim = int(json.loads(config_file.read_text())["model_cfg"]["embed_dim"])
    return ClipEmbedder(model, preprocess, tokenizer, name=spec.id, dim=dim, device=dev, dtype=dt)


# --------------------------------------------------------------------------------------------- VLM


@dataclass
class LoadedVLM:
    """An image-text-to-text model with its processor; `generate` runs one chat turn."""

    model: Any
    processor: Any
    spec: ModelSpec
    device: "torch.device"
    dtype: "torch.dtype"

    def inputs(self, messages: list[dict]) -> Any:
        """Tokenize `messages` (transformers chat format, images inline) with the model's own chat template."""
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        return inputs.to(self.device, dtype=self.dtype) if hasattr(inputs, "to") else inputs

    def generate(self, messages: list[dict], *, max_new_tokens: int = 64, **kwargs: Any) -> str:
        """Answer one chat turn; returns only the newly generated text."""
        import torch

        inputs = self.inputs(messages)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


def load_vlm(spec: SpecLike = None, *, preset: str = "default", device: Any = "auto", dtype: Any = None) -> LoadedVLM:
    """Load any transformers image-text-to-text model (Qwen2/2.5-VL, LLaVA, ...) with its processor."""
    spec = resolve("vlm", spec, preset=preset)
    path = local_dir(spec, allow_patterns=TRANSFORMERS_PATTERNS)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)

    def build():
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path))
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dt)
        return processor, model

    processor, model = _load(spec, path, "an image-text-to-text model", build)
    if getattr(processor, "chat_template", None) is None:
        raise ModelUnavailableError(spec.role, spec.id, "its processor has no chat template",
                                    fix="use an instruction-tuned (chat) checkpoint")
    return LoadedVLM(model.to(dev).eval(), processor, spec, dev, dt)


# --------------------------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class Detection:
    """One detected region: its label, score and box `(x0, y0, x1, y1)` in pixels, clipped to the image."""

    label: str
    score: float
    box: tuple[int, int, int, int]


@dataclass
class Detector:
    """An open-vocabulary (zero-shot) object detector behind transformers' pipeline."""

    pipeline: Any
    spec: ModelSpec

    def detect(self, image: ImageInput, labels: list[str], *, threshold: float = 0.1,
               top_k: int | None = None) -> list[Detection]:
        """Boxes for `labels` in `image`, best first; boxes are clipped to the image and empty ones dropped."""
        labels = [label for label in (str(x).strip() for x in labels) if label]
        if not labels:
            raise MmpersonaError("detect: `labels` must hold at least one non-empty label")
        img = load_image(image)
        width, height = img.size
        found = []
        for hit in self.pipeline(img, candidate_labels=labels, threshold=threshold):
            b = hit["box"]
            x0, y0 = max(0, min(width, int(b["xmin"]))), max(0, min(height, int(b["ymin"])))
            x1, y1 = max(0, min(width, int(b["xmax"]))), max(0, min(height, int(b["ymax"])))
            if x1 > x0 and y1 > y0:
                found.append(Detection(hit["label"], float(hit["score"]), (x0, y0, x1, y1)))
        found.sort(key=lambda d: d.score, reverse=True)
        return found[:top_k] if top_k is not None else found


def load_detector(spec: SpecLike = None, *, preset: str = "default", device: Any = "auto",
                  dtype: Any = None) -> Detector:
    """Load a zero-shot object detector (OWLv2, OWL-ViT, Grounding DINO, ...)."""
    spec = resolve("detector", spec, preset=preset)
    path = local_dir(spec, allow_patterns=TRANSFORMERS_PATTERNS)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)

    def build():
        from transformers import pipeline

        return pipeline("zero-shot-object-detection", model=str(path), device=dev, dtype=dt)

    return Detector(_load(spec, path, "a zero-shot object detector", build), spec)


# --------------------------------------------------------------------------------------------- text-to-image


@dataclass
class LoadedT2I:
    """A diffusers text-to-image pipeline and what was loaded into it."""

    pipeline: Any
    spec: ModelSpec
    ip_adapter: bool = False
    extras: dict = field(default_factory=dict)

    @property
    def is_xl(self) -> bool:
        return hasattr(self.pipeline, "text_encoder_2")


def load_t2i(spec: SpecLike = None, *, role: str = "t2i", preset: str = "default", device: Any = "auto",
             dtype: Any = None, ip_adapter: bool = True) -> LoadedT2I:
    """Load a Stable Diffusion (`role="t2i"`) or SDXL (`role="t2i_xl"`) pipeline, with its IP-Adapter.

    The pipeline family is read from the model's own files, and must match the role.
    """
    if role not in ("t2i", "t2i_xl"):
        raise MmpersonaError(f"load_t2i: `role` must be 't2i' or 't2i_xl', got {role!r}")
    spec = resolve(role, spec, preset=preset)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)

    def download(local_only: bool) -> Path:
        from diffusers import DiffusionPipeline

        return Path(DiffusionPipeline.download(spec.id, revision=spec.revision, local_files_only=local_only))

    path = local_dir(spec, fetcher=download if spec.source == "hub" else None)

    def build():
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image.from_pretrained(str(path), dtype=dt)

    pipe = _load(spec, path, "a diffusers text-to-image pipeline", build)
    xl = hasattr(pipe, "text_encoder_2")
    if xl != (role == "t2i_xl"):
        raise ModelUnavailableError(
            role, spec.id, f"it is a {type(pipe).__name__}, which belongs to role {'t2i_xl' if xl else 't2i'}",
            fix="pass SD 1.5-family models as t2i and SDXL models as t2i_xl")
    pipe = pipe.to(dev)
    loaded = LoadedT2I(pipe, spec)
    if ip_adapter and spec.ip_adapter is not None:
        load_ip_adapter(loaded)
    return loaded


def load_ip_adapter(loaded: LoadedT2I) -> None:
    """Load the spec's IP-Adapter (weights + image encoder) through diffusers' `load_ip_adapter`."""
    ip = loaded.spec.ip_adapter
    ip_spec = ModelSpec(loaded.spec.role, ip.id)
    patterns = [f"{ip.subfolder}/{ip.weight_name}", f"{ip.subfolder}/{ip.image_encoder_folder}/*.json",
                f"{ip.subfolder}/{ip.image_encoder_folder}/*.safetensors"]
    path = local_dir(ip_spec, allow_patterns=patterns)
    _load(ip_spec, path, "an IP-Adapter", lambda: loaded.pipeline.load_ip_adapter(
        str(path), subfolder=ip.subfolder, weight_name=ip.weight_name,
        image_encoder_folder=ip.image_encoder_folder))
    loaded.ip_adapter = True


# --------------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ModelStatus:
    role: str
    id: str
    source: str
    available: bool
    location: str | None


def model_status(spec: ModelSpec) -> ModelStatus:
    """Whether `spec` can be loaded without the network, and from where. Never downloads or builds."""
    from .tiny import is_built, tiny_path

    if spec.source == "tiny":
        return ModelStatus(spec.role, spec.id, "tiny", is_built(spec.tiny_name), str(tiny_path(spec.tiny_name)))
    if spec.source == "local":
        return ModelStatus(spec.role, spec.id, "local", spec.local_path.is_dir(), str(spec.local_path))
    location = None
    if ":" not in spec.id.removeprefix("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        repo = spec.id.removeprefix("hf-hub:")
        marker = {"embedder": "open_clip_config.json", "t2i": "model_index.json",
                  "t2i_xl": "model_index.json"}.get(spec.role, "config.json")
        try:
            hit = try_to_load_from_cache(repo, marker, revision=spec.revision)
        except Exception:  # an id huggingface_hub rejects is simply not cached
            hit = None
        location = str(Path(hit).parent) if isinstance(hit, str) else None
    return ModelStatus(spec.role, spec.id, "hub", location is not None, location)
