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


@pytest.mark.parametrize("major,emulates,expected", [(7, True, torch.float16),   # T4, V100: emulated bf16
                                                     (8, True, torch.bfloat16),  # A100, H100: native
                                                     (6, False, torch.float16)])
def test_bf16_only_where_the_gpu_has_it(monkeypatch, major, emulates, expected):
    """`torch.cuda.is_bf16_supported()` counts emulation (slow on T4 / V100) unless asked not to."""
    def supported(including_emulation: bool = True) -> bool:
        return major >= 8 or (including_emulation and emulates)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_dtype(None, torch.device("cuda")) is expected
    assert resolve_dtype("auto", torch.device("cuda", 1)) is expected
    assert resolve_dtype(None, torch.device("mps")) is torch.float16


def test_half_precision_downloads_the_fp16_files(tiny_cache, monkeypatch):
    """A hub SD/SDXL repository loaded in half precision is fetched with variant="fp16" (the fp32 SDXL UNet
    alone is ~10 GB), falling back to the full files for repositories that have no fp16 ones; the fp16 files
    are then the ones read."""
    import diffusers

    from mmpersona.models import load_t2i
    from mmpersona.models.tiny import tiny_path

    asked = []

    def download(repo, **kwargs):
        asked.append(kwargs.get("variant"))
        if repo == "org/no-fp16" and kwargs.get("variant"):
            raise ValueError("You are trying to load model files of the `variant=fp16`, but no such modeling files "
                             "are available.")
        return str(tiny_path("sd"))

    read = []
    real_from_pretrained = diffusers.AutoPipelineForText2Image.from_pretrained.__func__

    def from_pretrained(cls, path, **kwargs):
        read.append(kwargs.get("variant"))
        return real_from_pretrained(cls, path, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", staticmethod(download))
    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", classmethod(from_pretrained))
    half = load_t2i("org/sd", role="t2i", device="cpu", dtype="float16", ip_adapter=False)
    assert asked == ["fp16"] and read == ["fp16"] and half.pipeline.unet.dtype is torch.float16
    asked.clear(), read.clear()
    load_t2i("org/sd", role="t2i", device="cpu", dtype="float32", ip_adapter=False)
    assert asked == [None] and read == [None]
    asked.clear(), read.clear()
    load_t2i("org/no-fp16", role="t2i", device="cpu", dtype="bfloat16", ip_adapter=False)
    assert asked == ["fp16", None]


def test_memory_options(tiny_cache):
    from mmpersona.models import load_t2i

    t2i = load_t2i(role="t2i", preset="tiny", device="cpu", vae_slicing=True, vae_tiling=True, cpu_offload=True)
    vae = t2i.pipeline.vae
    assert vae.use_slicing and vae.use_tiling and t2i.extras["cpu_offload"] and t2i.ip_adapter
    assert t2i.device.type == "cpu"
