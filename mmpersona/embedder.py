"""open_clip embedder: images and texts into one L2-normalised float32 space.

Query side and source side are separate methods (`embed_texts`, `embed_images`) since for multimodal data the
stored side may be images while the query is text. Both are batched and return `(n, dim)` float32 arrays.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .errors import MmpersonaError
from .images import ImageInput, load_image

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)


class ClipEmbedder:
    """An open_clip model with its preprocessing and tokenizer.

    Build it with `mmpersona.models.load_embedder(...)`. `name` and `dim` identify the embedding space:
    vectors from embedders with different names are not comparable.
    """

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, *, name: str, dim: int,
                 device: "torch.device", dtype: "torch.dtype"):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.dim = dim
        self.device = device
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"ClipEmbedder(name={self.name!r}, dim={self.dim}, device={str(self.device)!r})"

    def embed_images(self, images: Sequence[ImageInput], *, batch_size: int = 32,
                     progress: bool = False) -> "np.ndarray":
        """Embed images (paths, bytes, file objects or PIL images), `batch_size` at a time.

        Every image goes through the project's safe loader; an unreadable one raises `ImageLoadError` naming it.
        """
        import torch

        def encode(batch: list[ImageInput]) -> "torch.Tensor":
            pixels = torch.stack([self.preprocess(load_image(item)) for item in batch])
            return self.model.encode_image(pixels.to(self.device, self.dtype))

        return self._run(list(images), batch_size, encode, progress, "embedding images")

    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> "np.ndarray":
        """Embed texts, `batch_size` at a time; texts longer than the context are truncated by the tokenizer."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise MmpersonaError(f"embed_texts: item {i} is {type(text).__name__}, not str")

        def encode(batch: list[str]) -> "torch.Tensor":
            return self.model.encode_text(self.tokenizer(batch).to(self.device))

        return self._run(texts, batch_size, encode, progress, "embedding texts")

    def _run(self, items: list, batch_size: int, encode, progress: bool, label: str) -> "np.ndarray":
        return embed_batched(items, self.dim, batch_size, encode, progress, label)


def embed_batched(items: list, dim: int, batch_size: int, encode, progress: bool, label: str) -> "np.ndarray":
    """`encode` over `items`, `batch_size` at a time, without autograd: L2-normalised float32 rows (n, dim); a
    progress bar when asked for and there is more than one batch. Serves every embedder (CLIP, DINOv2)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise MmpersonaError(f"`batch_size` must be at least 1, got {batch_size}")
    out = np.empty((len(items), dim), dtype=np.float32)
    starts: Iterable[int] = range(0, len(items), batch_size)
    if progress and len(items) > batch_size:
        starts = tqdm(starts, desc=label, unit="batch")
    with torch.inference_mode():
        for start in starts:
            feats = encode(items[start : start + batch_size]).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
            out[start : start + len(feats)] = feats.cpu().numpy()
    return out
