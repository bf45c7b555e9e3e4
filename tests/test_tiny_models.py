"""Every tiny model builds, saves, reloads through the public loader and runs one step."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpersona.models import (TINY_MODELS, load_detector, load_embedder, load_t2i, load_vlm, model_status,
                              resolve)
from mmpersona.models.tiny import TINY_VERSION, ensure_tiny, is_built, tiny_path


def _digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.safetensors"))}


def test_all_built_small_and_listed(tiny_cache):
    total = 0
    for name in TINY_MODELS:
        assert is_built(name)
        folder = tiny_path(name)
        assert folder.parent.name == f"v{TINY_VERSION}"
        assert _digest(folder), f"{name} has no safetensors weights"
        assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
        total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < 20e6
    for role in ("embedder", "vlm", "detector", "instance", "t2i", "t2i_xl"):
        status = model_status(resolve(role, preset="tiny"))
        assert status.available and status.source == "tiny"


def test_builds_are_deterministic(tiny_cache, tmp_path):
    """A second build in a fresh cache (another process) gives bit-identical weights."""
    code = "from mmpersona.models.tiny import ensure_tiny\nfor n in ('clip', 'qwen2.5-vl', 'sd'): ensure_tiny(n)"
    env = dict(os.environ, MMPERSONA_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    for name in ("clip", "qwen2.5-vl", "sd"):
        fresh = tmp_path / "tiny" / f"v{TINY_VERSION}" / name
        assert _digest(fresh) == _digest(tiny_path(name)), name


def test_ensure_tiny_reuses_and_recovers(tiny_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("MMPERSONA_CACHE_DIR", str(tmp_path))
    half = tiny_path("owlv2")
    half.mkdir(parents=True)
    (half / "config.json").write_text("{")  # a build that died half-way: no completion marker
    path = ensure_tiny("owlv2")
    assert is_built("owlv2") and path == half
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny("owlv2") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_embedder_runs(tiny_embedder):
    vecs = tiny_embedder.embed_images([Image.new("RGB", (40, 30), (200, 0, 0))])
    assert vecs.shape == (1, tiny_embedder.dim) == (1, 32)


@pytest.mark.parametrize("name", ["tiny:qwen2.5-vl", "tiny:qwen2-vl", "tiny:llava"])
def test_vlm_chat_template_and_generation(tiny_cache, name):
    vlm = load_vlm(name, device="cpu")
    assert vlm.spec.id == name
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You know the user's dog <bo>."}]},
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 48), (10, 200, 10))},
                                     {"type": "text", "text": "What is <bo> doing?"}]},
    ]
    prompt = vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "What is <bo> doing?" in prompt and "You know the user's dog <bo>." in prompt
    inputs = vlm.inputs(messages)
    image_token = vlm.model.config.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) > 0  # the image became vision tokens
    with torch.inference_mode():
        logits = vlm.model(**inputs).logits
    assert logits.shape[-1] == vlm.model.get_input_embeddings().weight.shape[0]
    out = vlm.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert isinstance(vlm.generate(messages, max_new_tokens=3), str)


def test_detector_runs_once_for_all_labels_and_matches_the_pipeline(tiny_cache):
    """One processor call and one forward for every label (the transformers pipeline runs one per label),
    with the logits the per-label passes give and boxes the pipeline also finds."""
    from transformers import pipeline

    detector = load_detector(preset="tiny", device="cpu")
    image = Image.new("RGB", (80, 60), (120, 120, 120))
    labels = ["dog", "cat", "mug"]
    calls = []
    hook = detector.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        found = detector.detect(image, labels, threshold=0.0)
    finally:
        hook.remove()
    assert len(calls) == 1 and found
    with torch.inference_mode():  # each query's logits do not depend on the other queries
        together = detector.model(**detector.processor(text=[labels], images=image, return_tensors="pt")).logits
        for j, label in enumerate(labels):
            alone = detector.model(**detector.processor(text=[[label]], images=image, return_tensors="pt")).logits
            assert torch.allclose(together[0, :, j], alone[0, :, 0], atol=1e-4)
    reference = pipeline("zero-shot-object-detection", model=str(tiny_path("owlv2")), device="cpu")
    scores: dict = {}
    for hit in reference(image, candidate_labels=labels, threshold=0.0):
        b = hit["box"]
        key = (max(0, min(80, b["xmin"])), max(0, min(60, b["ymin"])), max(0, min(80, b["xmax"])),
               max(0, min(60, b["ymax"])))
        scores.setdefault(key, {})[hit["label"]] = hit["score"]
    for det in found:  # each box once, with (one of) its best-scoring labels
        x0, y0, x1, y1 = det.box
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60
        best = max(scores[det.box].values())
        assert abs(det.score - best) < 1e-5 and abs(scores[det.box][det.label] - best) < 1e-5


@pytest.mark.parametrize("role", ["t2i", "t2i_xl"])
def test_t2i_with_ip_adapter(tiny_cache, role):
    t2i = load_t2i(role=role, preset="tiny", device="cpu")
    assert t2i.ip_adapter and t2i.is_xl == (role == "t2i_xl")
    pipe = t2i.pipeline
    pipe.set_progress_bar_config(disable=True)
    ref = Image.new("RGB", (48, 48), (0, 90, 200))

    def run(scale):
        pipe.set_ip_adapter_scale(scale)
        return pipe("a photo of a dog", num_inference_steps=2, ip_adapter_image=ref, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    plain, steered = run(0.0), run(1.0)
    assert plain.shape == (1, 64, 64, 3)
    assert not (plain == steered).all(), "the IP-Adapter image had no effect"


def test_wrong_role_for_tiny_id(tiny_cache):
    from mmpersona.errors import ModelUnavailableError

    with pytest.raises(ModelUnavailableError, match="embedder model"):
        load_embedder("tiny:sd", device="cpu")


# ------------------------------------------------------------------ what the tiny models share with the real ones


@pytest.mark.parametrize("name,repo", [("tiny:qwen2.5-vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
                                       ("tiny:qwen2-vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
                                       ("tiny:llava", "llava-hf/llava-1.5-7b-hf")])
def test_tiny_vlms_have_the_real_vocabulary_layout_template_and_limits(tiny_cache, name, repo):
    from mmpersona.models import published

    vlm = load_vlm(name, device="cpu")
    facts = published.facts(repo)
    rows = vlm.model.get_input_embeddings().weight.shape[0]
    tokens = len(vlm.processor.tokenizer)
    # more embedding rows than tokens, by as many as the real checkpoint has
    assert rows - tokens == facts["embedding_rows"] - facts["tokenizer_length"] > 0
    tied = vlm.model.get_output_embeddings().weight.data_ptr() == vlm.model.get_input_embeddings().weight.data_ptr()
    assert tied == facts["tied_embeddings"]
    assert vlm.processor.chat_template == published.chat_template(repo)
    assert vlm.interleaves_images == (repo != "llava-hf/llava-1.5-7b-hf")  # LLaVA renders images first
    if "qwen" in repo.lower():
        real = published.config(repo, "preprocessor_config.json")
        vlm.set_visual_budget(None)
        assert vlm.max_pixels == real["max_pixels"] and vlm.pixels_per_token == 28 * 28
        assert type(vlm.model).__name__ == ("Qwen2_5_VLForConditionalGeneration" if name == "tiny:qwen2.5-vl"
                                            else "Qwen2VLForConditionalGeneration")


def test_tiny_preset_vlm_is_qwen2_5_vl(tiny_cache):
    vlm = load_vlm(preset="tiny", device="cpu")
    assert vlm.spec.id == "tiny:qwen2.5-vl"
    config = vlm.model.config.vision_config
    assert config.window_size == 112 and list(config.fullatt_block_indexes) == [1, 3]  # window attention runs


def test_tiny_schedulers_and_vaes_are_the_published_ones(tiny_cache):
    from mmpersona.models import published

    for role, repo in (("t2i", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                       ("t2i_xl", "stabilityai/stable-diffusion-xl-base-1.0")):
        pipe = load_t2i(role=role, preset="tiny", device="cpu", ip_adapter=False).pipeline
        real = published.config(repo, "scheduler/scheduler_config.json")
        assert type(pipe.scheduler).__name__ == real["_class_name"]  # SD 1.5: PNDM; SDXL: Euler
        assert pipe.scheduler.config.timestep_spacing == real.get("timestep_spacing", "leading")
        vae = published.config(repo, "vae/config.json")
        assert pipe.vae.config.scaling_factor == vae.get("scaling_factor", 0.18215)
        assert pipe.vae.config.force_upcast is vae.get("force_upcast", True)
        files = {p.name for p in tiny_path("sd" if role == "t2i" else "sdxl").rglob("*.safetensors")}
        assert "diffusion_pytorch_model.fp16.safetensors" in files  # the fp16 variant the real repos publish
