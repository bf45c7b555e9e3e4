"""The published configurations behind benchmarks/real_shapes.py build the real architectures: their full
parameter counts (built on the meta device, no memory) are the known sizes of the default checkpoints."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_shapes  # noqa: E402


def test_full_architectures_have_the_published_sizes():
    import torch

    full = real_shapes.FULL
    assert real_shapes._meta_params(lambda lv: [real_shapes.qwen_model(lv)]) == 3_754_622_976  # "3.75B"
    assert real_shapes._meta_params(lambda lv: [real_shapes.clip_model(lv)[0]]) == 427_944_193  # ViT-L/14-336
    dinov2 = real_shapes._meta_params(lambda lv: [real_shapes.dinov2_model(lv)])
    assert abs(dinov2 - 86.6e6) < 0.5e6  # dinov2-base: "86M parameters" (its 518-px grid: 1370 positions)
    with torch.device("meta"):
        sd = real_shapes.t2i_modules(real_shapes.SD, full)
        xl = real_shapes.t2i_modules(real_shapes.SDXL, full)
        qwen = real_shapes.qwen_model(full)
    assert real_shapes._params(sd[0]) == 859_520_964  # the SD 1.5 UNet
    assert real_shapes._params(xl[0]) == 2_567_463_684  # the SDXL UNet
    assert qwen.get_input_embeddings().weight.shape == (151_936, 2048)
    assert qwen.get_output_embeddings().weight is qwen.get_input_embeddings().weight  # tied, as published
    assert qwen.config.vision_config.fullatt_block_indexes == [7, 15, 23, 31]


@pytest.mark.parametrize("level", [1, 2])
def test_reduced_depths_keep_the_widths(level):
    import torch

    with torch.device("meta"):
        qwen = real_shapes.qwen_model(level)
    assert qwen.config.text_config.num_hidden_layers == level and qwen.config.text_config.hidden_size == 2048
    vision = qwen.config.vision_config
    assert vision.depth == 2 * level and vision.fullatt_block_indexes == [2 * level - 1]
    assert vision.hidden_size == 1280 and vision.window_size == 112
