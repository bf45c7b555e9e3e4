"""Detector post-processing runs in float32 whatever the model's dtype: with OWLv2 in bfloat16 the outputs'
`pred_boxes` are bf16, and scaled to a 4000 px photo in bf16 (8 significant bits) every coordinate lands on a
16 px step (8 px below 2048)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmpersona.models import load_detector


@pytest.fixture(scope="module")
def tiny_owlv2():
    from mmpersona.models.tiny import ensure_tiny

    return ensure_tiny("owlv2")


class SmallInput:
    """The detector's processor, fed a small copy of the image: OWLv2's anti-aliasing blur before its resize to
    the tiny model's 64 px input takes minutes on a 4000 px photo (a 187 px Gaussian kernel; the real model's
    960 px input needs an 11 px one). What is tested here is post-processing at the photo's size, which only
    reads the size passed in `target_sizes`."""

    def __init__(self, processor):
        self._processor = processor

    def __call__(self, *args, images=None, **kwargs):
        return self._processor(*args, images=None if images is None else images.resize((64, 48)), **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


def test_bf16_detector_boxes_are_post_processed_in_float32(tiny_owlv2):
    detector = load_detector(preset="tiny", device="cpu", dtype=torch.bfloat16)
    detector.processor = SmallInput(detector.processor)
    photo = Image.new("RGB", (4000, 3000), (120, 130, 140))
    outputs = []
    hook = detector.model.register_forward_hook(lambda module, args, kwargs_or_out, *rest: outputs.append(
        rest[0] if rest else kwargs_or_out), with_kwargs=True)
    try:
        found = detector.detect(photo, ["dog", "cat"], threshold=0.0)
    finally:
        hook.remove()
    assert found and outputs[0].pred_boxes.dtype == torch.bfloat16  # the model itself runs in bf16
    boxes = np.array([d.box for d in found])
    big = boxes[(boxes >= 2048) & (boxes < 3000)]  # below the clipped edges, where bf16 steps are 16 px
    assert big.size and (big % 16 != 0).any(), f"coordinates on a 16 px grid: scaled in bf16 ({big.tolist()})"
    # exactly what float32 post-processing of the same outputs gives (clipped to the photo, as detect does)
    upcast = type(outputs[0])(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                                 for k, v in outputs[0].items()})
    ref = detector.processor.post_process_grounded_object_detection(
        upcast, threshold=0.0, target_sizes=[(3000, 4000)], text_labels=[["dog", "cat"]])[0]
    expected = sorted(
        (round(float(s), 4), tuple(max(0, min(lim, int(c))) for c, lim in zip(b, (4000, 3000, 4000, 3000), strict=True)))
        for s, b in zip(ref["scores"].tolist(), ref["boxes"].tolist(), strict=True))
    expected = [e for e in expected if e[1][2] > e[1][0] and e[1][3] > e[1][1]]
    assert sorted((round(d.score, 4), d.box) for d in found) == expected
