"""The one place that knows how to build the `tiny` preset's models.

Each tiny model is architecturally real (the same classes as the real checkpoints), randomly initialised with a
fixed seed, and written with `save_pretrained` (or open_clip's `local-dir:` layout) into the user cache. The
loaders then read it back through exactly the same code path as a downloaded model. Nothing here is used at
inference time: after the first build, a tiny model is just a local directory.

Builds are atomic (written to a temporary sibling, then renamed), so concurrent processes (pytest workers,
`accelerate launch`) never see half a model.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UnknownPresetError
from ..paths import cache_dir

logger = logging.getLogger(__name__)

#: Bump when a builder changes, so stale builds in users' caches are not reused.
TINY_VERSION = 2
SEED = 0

# Chat templates of the tiny VLMs, written in the style of their real counterparts (ChatML for Qwen2-VL,
# "USER: <image>\n... ASSISTANT:" for LLaVA-1.5). System turns may be a string or a list of text parts.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['role'].upper() ~ ': ' }}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '<|im_end|>' }}{%- endif -%}{{ '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

QWEN_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>"]


@dataclass(frozen=True)
class TinyModel:
    """One buildable tiny model: its `tiny:<name>` id, the role it serves and its builder."""

    name: str
    role: str
    description: str
    build: Callable[[Path], None]
    requires: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"tiny:{self.name}"


def tiny_root() -> Path:
    return cache_dir() / "tiny" / f"v{TINY_VERSION}"


def tiny_path(name: str) -> Path:
    return tiny_root() / name


def is_built(name: str) -> bool:
    return (tiny_path(name) / ".complete").is_file()


def ensure_tiny(name: str) -> Path:
    """Build tiny model `name` if it is not in the cache yet; return its directory."""
    if name not in TINY_MODELS:
        raise UnknownPresetError(f"unknown tiny model {name!r}; valid: {', '.join(sorted(TINY_MODELS))}")
    target = tiny_path(name)
    if is_built(name):
        return target
    entry = TINY_MODELS[name]
    for dep in entry.requires:
        ensure_tiny(dep)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        logger.info("building tiny model %s into %s", entry.id, target)
        entry.build(tmp)
        (tmp / ".complete").write_text(json.dumps({"id": entry.id, "version": TINY_VERSION, "seed": SEED}))
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_built(name):  # a half-written leftover, not a concurrent winner: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_all() -> dict[str, Path]:
    return {name: ensure_tiny(name) for name in TINY_MODELS}


# --------------------------------------------------------------------------------------------- tokenizers


def write_clip_bpe(folder: Path, n_merges: int | None = None) -> int:
    """Write the real CLIP BPE vocabulary (from open_clip's package data) as `vocab.json` + `merges.txt`.

    With `n_merges=None` this is the full 49408-token CLIP tokenizer; a prefix of the merges gives a smaller,
    still valid vocabulary for tiny text towers. Returns the vocabulary size.
    """
    from open_clip import tokenizer as oct

    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    total = 49408 - 256 * 2 - 2
    merges = [tuple(line.split()) for line in lines[1 : 1 + (n_merges if n_merges is not None else total)]]
    base = list(oct.bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return len(vocab)


def clip_tokenizer(folder: Path, n_merges: int = 486, max_length: int = 77):
    """A small CLIP tokenizer (1000 tokens by default) for tiny text encoders."""
    from transformers import CLIPTokenizer

    write_clip_bpe(folder, n_merges)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def _chat_corpus() -> list[str]:
    """Deterministic training text for the tiny chat tokenizer: common English sub-words from CLIP's merges
    plus the phrases this toolkit's prompts use."""
    from open_clip import tokenizer as oct

    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1:6001]
    words = ["".join(line.split()).replace("</w>", " ") for line in lines]
    phrases = [
        "You are a helpful assistant. Answer the question about the image.",
        "Is <bo> in this image? Yes. No. What is <bo> doing? A photo of my dog playing in the park.",
        "The user's personal concepts: name, category, description. Who is in this photo?",
    ]
    return ["".join(words[i : i + 200]) for i in range(0, len(words), 200)] + phrases * 20


def chat_tokenizer(extra_special: list[str]):
    """A byte-level BPE chat tokenizer (Qwen2 style) trained offline in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(_chat_corpus(), trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(
        vocab=bpe.get_vocab(), merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS + extra_special})
    return tok


# --------------------------------------------------------------------------------------------- builders


def _seed() -> None:
    import torch

    torch.manual_seed(SEED)


def build_clip(folder: Path) -> None:
    """open_clip ViT with the real 49408-token CLIP tokenizer, in open_clip's `local-dir:` layout."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    preprocess_cfg = {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    _seed()
    model = CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))


def build_qwen2_vl(folder: Path) -> None:
    """Qwen2-VL chat model: ChatML template, dynamic-resolution vision tower, M-RoPE."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = chat_tokenizer([])
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = 32 // 2
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
            # M-RoPE sections (temporal, height, width) must sum to head_dim / 2
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": tok.pad_token_id,
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    _seed()
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    tok.chat_template = QWEN_CHAT_TEMPLATE
    # A small pixel budget keeps every image at a handful of vision tokens.
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def build_llava(folder: Path) -> None:
    """LLaVA-1.5-style model: CLIP vision tower + projector + Llama language model."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = chat_tokenizer(["<image>"])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                                bos_token_id=None, eos_token_id=eos, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    _seed()
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>",
    )
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def build_owlv2(folder: Path) -> None:
    """OWLv2 open-vocabulary detector with a small CLIP tokenizer."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tok = clip_tokenizer(folder / "_tok", max_length=16)
    config = Owlv2Config(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
        projection_dim=32,
    )
    _seed()
    model = Owlv2ForObjectDetection(config).eval()
    # Random box regressors predict zero-height boxes; a zero last layer leaves OWLv2's own per-patch box prior,
    # so the tiny detector proposes real grid-cell regions that the region pipeline can crop.
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    shutil.rmtree(folder / "_tok")


def _text_encoder_config(tok, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=4, sample_size=64)


def build_sd(folder: Path) -> None:
    """Stable Diffusion 1.5-family pipeline (UNet, VAE, CLIP text encoder, DDIM); 64x64 images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel

    tok = clip_tokenizer(folder / "_tok")
    _seed()
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_text_encoder_config(tok)), tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, image_encoder=None, requires_safety_checker=False,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
    pipe.save_pretrained(str(folder))
    shutil.rmtree(folder / "_tok")


def build_sdxl(folder: Path) -> None:
    """Stable Diffusion XL pipeline (two CLIP text encoders, text_time conditioning); 64x64 images."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer(folder / "_tok")
    _seed()
    time_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 1),
        # SDXL adds six time ids (original size, crop, target size) to the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        norm_num_groups=4,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(tok)),
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(tok, projection_dim=pooled_dim)),
        tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
        image_encoder=None, feature_extractor=None,
    )
    pipe.save_pretrained(str(folder))
    shutil.rmtree(folder / "_tok")


def ip_adapter_state_dict(unet, image_embed_dim: int, num_tokens: int = 4) -> dict:
    """Random IP-Adapter weights in the original checkpoint layout for `unet`.

    `image_proj.*` projects one image embedding to `num_tokens` cross-attention tokens; `ip_adapter.{k}.to_k_ip`
    / `to_v_ip` add a key/value projection to each cross-attention processor, k = 1, 3, 5, ... in processor order.
    """
    import torch

    cross_dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(SEED)
    state = {
        "image_proj.proj.weight": torch.randn(cross_dim * num_tokens, image_embed_dim, generator=g) * 0.02,
        "image_proj.proj.bias": torch.zeros(cross_dim * num_tokens),
        "image_proj.norm.weight": torch.ones(cross_dim),
        "image_proj.norm.bias": torch.zeros(cross_dim),
    }
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue  # self-attention gets no image branch
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden = attn.to_k.out_features
        state[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(hidden, cross_dim, generator=g) * 0.02
        state[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(hidden, cross_dim, generator=g) * 0.02
        key += 2
    return state


def build_ip_adapter(folder: Path) -> None:
    """IP-Adapter weights for the tiny SD and SDXL UNets, laid out like `h94/IP-Adapter`."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    for sub, base, weight in (("models", "sd", "ip-adapter_sd15.safetensors"),
                              ("sdxl_models", "sdxl", "ip-adapter_sdxl.safetensors")):
        _seed()
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=32))
        encoder.save_pretrained(str(folder / sub / "image_encoder"))
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            str(folder / sub / "image_encoder"))
        unet = UNet2DConditionModel.from_pretrained(str(tiny_path(base)), subfolder="unet")
        save_file(ip_adapter_state_dict(unet, encoder.config.projection_dim), str(folder / sub / weight))


TINY_MODELS: dict[str, TinyModel] = {
    m.name: m
    for m in (
        TinyModel("clip", "embedder", "open_clip ViT, real CLIP tokenizer, 32-d embeddings", build_clip),
        TinyModel("qwen2-vl", "vlm", "Qwen2-VL chat VLM (ChatML template)", build_qwen2_vl),
        TinyModel("llava", "vlm", "LLaVA-1.5-style chat VLM (CLIP vision + Llama)", build_llava),
        TinyModel("owlv2", "detector", "OWLv2 zero-shot object detector", build_owlv2),
        TinyModel("sd", "t2i", "Stable Diffusion 1.5-family pipeline", build_sd),
        TinyModel("sdxl", "t2i_xl", "Stable Diffusion XL pipeline", build_sdxl),
        TinyModel("ip-adapter", "ip_adapter", "IP-Adapter for tiny SD and SDXL (h94/IP-Adapter layout)",
                  build_ip_adapter, requires=("sd", "sdxl")),
    )
}
