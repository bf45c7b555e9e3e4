import pytest
import torch

from mmpersona.devices import resolve_device, resolve_dtype
from mmpersona.errors import MmpersonaError


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    with pytest.raises(MmpersonaError, match="`device` must be"):
        resolve_device("gpu-please")


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) is torch.float32
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("torch.float16", cpu) is torch.float16
    assert resolve_dtype(torch.float64, cpu) is torch.float64
    with pytest.raises(MmpersonaError, match="`dtype` must be one of"):
        resolve_dtype("int3", cpu)


def test_loaders_honour_dtype(tiny_cache):
    from mmpersona.models import load_embedder, load_vlm

    assert next(load_vlm(preset="tiny", device="cpu", dtype="bfloat16").model.parameters()).dtype is torch.bfloat16
    emb = load_embedder(preset="tiny", device="cpu", dtype="bfloat16")
    vec = emb.embed_texts(["a dog"])
    assert vec.dtype.name == "float32" and abs(float((vec**2).sum()) - 1) < 1e-3
