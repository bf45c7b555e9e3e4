"""The one place that knows how to build the `tiny` preset's models.

Each tiny model is architecturally real (the same classes as the real checkpoints), randomly initialised with a
fixed seed, and written with `save_pretrained` (or open_clip's `local-dir:` layout) into the user cache. The
loaders then read it back through exactly the same code path as a downloaded model. Nothing here is used at
inference time: after the first build, a tiny model is just a local directory.

Builds are atomic (written to a temporary sibling, then renamed), so concurrent processes (pytest workers,
`accelerate launch`) never see half a model.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import MmpersonaError, UnknownPresetError
from ..libraries import silenced
from ..paths import cache_dir
from . import published

logger = logging.getLogger(__name__)

#: Bump when a builder changes, so stale builds in users' caches are not reused.
TINY_VERSION = 4
SEED = 0

# The real checkpoints the tiny VLMs stand in for; their published files (chat templates, processor limits,
# generation configs, added tokens) are copied from `published/`, so the tiny ones behave the same where it
# matters: Qwen2.5-VL renders images inline and resizes within 3136..12,845,056 pixels; LLaVA-1.5 renders a
# message's images before its text; both have more embedding rows than tokens (Qwen tied, LLaVA untied).
QWEN_REPO = "Qwen/Qwen2.5-VL-3B-Instruct"
LLAVA_REPO = "llava-hf/llava-1.5-7b-hf"


def qwen_special_tokens() -> list[str]:
    return published.facts(QWEN_REPO)["added_tokens"]


def padded_rows(repo: str, n_tokens: int) -> int:
    """Embedding rows for a tiny model whose tokenizer has `n_tokens`: as many unused rows past the tokenizer
    as the real checkpoint has (Qwen2.5-VL 151,936 - 151,665 = 271; LLaVA-1.5 32,064 - 32,002 = 62)."""
    f = published.facts(repo)
    return n_tokens + f["embedding_rows"] - f["tokenizer_length"]


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
        with silenced(), build_threads():
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


def build_threads_for(cores: int, busy: float) -> int:
    """torch threads for a build on `cores` cores while other processes keep `busy` of them busy: only the idle
    cores. torch's OpenMP threads wait for each other at every parallel region, and a thread that another process
    has taken the core from stalls the whole team: sharing 2 cores with another job made the trained preset's
    build about 10x slower (45 minutes against 4), while 1 thread only loses its share
    (`benchmarks/tiny_build.py` measures both)."""
    return max(1, min(cores, cores - round(busy)))


def busy_cores(seconds: float = 0.25) -> float:
    """Cores other processes keep busy, measured over `seconds` while this one sleeps (Linux `/proc/stat`;
    elsewhere the 1-minute load average, which counts this process too)."""
    import time

    def sample() -> tuple[int, float]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(x) for x in f.readline().split()[1:9]]
        return sum(values) - values[3] - values[4], time.monotonic()

    try:
        (b0, t0), own0 = sample(), sum(os.times()[:2])
        time.sleep(seconds)
        (b1, t1), own1 = sample(), sum(os.times()[:2])
    except (OSError, ValueError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    return max(0.0, (b1 - b0) / os.sysconf("SC_CLK_TCK") / (t1 - t0) - (own1 - own0) / (t1 - t0))


@contextlib.contextmanager
def build_threads():
    """torch's thread count for a build: the idle cores (`MMPERSONA_BUILD_THREADS` overrides), then back."""
    import torch

    before = torch.get_num_threads()
    raw = os.environ.get("MMPERSONA_BUILD_THREADS")
    threads = max(1, int(raw)) if raw else build_threads_for(before, busy_cores())
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


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
    """Deterministic training text for the tiny chat tokenizers: common English sub-words from CLIP's merges
    plus the phrases this toolkit's prompts and the chat templates use."""
    from open_clip import tokenizer as oct

    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1:6001]
    words = ["".join(line.split()).replace("</w>", " ") for line in lines]
    phrases = [
        "You are a helpful assistant. Answer the question about the image.",
        "Is <bo> in this image? Yes. No. What is <bo> doing? A photo of my dog playing in the park.",
        "The user's personal concepts: name, category, description. Who is in this photo?",
        "USER: ASSISTANT: Reference photo of Image 1 is the user's photo.",
    ]
    return ["".join(words[i : i + 200]) for i in range(0, len(words), 200)] + phrases * 20


def _merges(bpe) -> list[tuple[str, str]]:
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(bpe.to_str())["model"]["merges"]]


def chat_tokenizer(extra_special: list[str] = ()):
    """A byte-level BPE chat tokenizer (Qwen2 style) trained offline in about a second, with Qwen2.5's added
    tokens: the special ones (ChatML, vision, boxes) and the plain ones (tool calls, fill-in-the-middle)."""
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
    tok = Qwen2Tokenizer(
        vocab=bpe.get_vocab(), merges=_merges(bpe), unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": qwen_special_tokens()[1:] + list(extra_special)})
    tok.add_tokens(published.facts(QWEN_REPO)["added_plain_tokens"], special_tokens=False)
    return tok


def llama_tokenizer():
    """A SentencePiece-style BPE (Llama: `▁` word prefixes, byte fallback, `<s>` added in front) as LLaVA-1.5
    uses, with its added `<image>` and `<pad>` tokens at the end of the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False, initial_alphabet=[])
    bpe.train_from_iterator(_chat_corpus(), trainer)
    tok = LlamaTokenizer(vocab=bpe.get_vocab(), merges=_merges(bpe), add_bos_token=True, legacy=False)
    tok.add_special_tokens({"additional_special_tokens": published.facts(LLAVA_REPO)["added_tokens"]})
    tok.pad_token = "<pad>"
    return tok


def bert_tokenizer(n_words: int = 2000):
    """A lowercasing WordPiece tokenizer (BERT uncased, as Grounding DINO's text encoder uses) with the ids of
    bert-base-uncased where models read them: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then the
    printable ASCII characters from 999, so "." is 1012 and "?" 1029 (Grounding DINO hard-codes [CLS], [SEP], "."
    and "?" as the ids that delimit its phrases); then "##" pieces and whole words from CLIP's merges. Any word
    outside the vocabulary becomes several pieces, so labels cost more tokens than with the real vocabulary."""
    from open_clip import tokenizer as oct
    from transformers import BertTokenizer

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 999 - len(vocab))]
    chars = [chr(c) for c in range(33, 127) if not "A" <= chr(c) <= "Z"]
    vocab += chars + ["##" + c for c in chars if c.isalnum()]
    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1:]
    words = ["".join(line.split())[:-4] for line in lines if line.endswith("</w>")]
    vocab += list(dict.fromkeys(w for w in words if len(w) > 1 and w.isalpha() and w.isascii()))[:n_words]
    ids = {token: i for i, token in enumerate(vocab)}
    assert (ids["[CLS]"], ids["[SEP]"], ids["."], ids["?"]) == (101, 102, 1012, 1029)
    return BertTokenizer(vocab=ids, do_lower_case=True, model_max_length=512)


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


def _zero_unused_rows(model, n_tokens: int) -> None:
    """Rows past the tokenizer are never a target in training, so a real checkpoint never predicts them; zero
    rows (logit 0, below the best real token's) keep a random tiny model from predicting them either."""
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[n_tokens:] = 0
        model.get_output_embeddings().weight[n_tokens:] = 0


def _qwen_text_config(tok, ids: dict[str, int]) -> dict:
    head_dim = 32 // 2
    # M-RoPE sections (temporal, height, width) must sum to head_dim / 2 (real 3B: [16, 24, 24] of 128)
    section = [2, 3, 3]
    assert sum(section) == head_dim // 2
    return {
        "vocab_size": padded_rows(QWEN_REPO, len(tok)), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": True,
    }


def _qwen_ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in qwen_special_tokens()}


def _qwen_generation(model, ids: dict[str, int]) -> None:
    """The published generation config (sampling at temperature 1e-6, two end tokens), with our ids."""
    real = published.config(QWEN_REPO, "generation_config.json")
    gc = model.generation_config
    gc.bos_token_id = gc.pad_token_id = ids["<|endoftext|>"]
    gc.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gc.do_sample, gc.temperature = real["do_sample"], real["temperature"]
    gc.repetition_penalty = real["repetition_penalty"]


def _qwen_image_processor():
    from transformers import Qwen2VLImageProcessor

    real = published.config(QWEN_REPO, "preprocessor_config.json")
    keep = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    return Qwen2VLImageProcessor(**{k: real[k] for k in keep})


def _build_qwen(folder: Path, config_cls, model_cls, processor_cls, vision_config: dict) -> None:
    """A tiny Qwen2-VL-family chat model with Qwen2.5-VL's published template, limits and generation config."""
    from transformers import Qwen2VLVideoProcessor

    tok = chat_tokenizer()
    ids = _qwen_ids(tok)
    config = config_cls(
        text_config=_qwen_text_config(tok, ids), vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    _seed()
    model = model_cls(config).eval()
    _zero_unused_rows(model, len(tok))
    _qwen_generation(model, ids)
    template = published.chat_template(QWEN_REPO)
    tok.chat_template = template
    processor = processor_cls(image_processor=_qwen_image_processor(), tokenizer=tok,
                              video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def build_qwen2_5_vl(folder: Path) -> None:
    """Qwen2.5-VL chat model: window-attention vision tower, M-RoPE, tied embeddings with padded rows, and the
    published chat template, image-processor limits and generation config."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    # real 3B: 32 blocks, full attention in blocks 7, 15, 23, 31 and 112-pixel windows in the others
    vision = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [1, 3], "tokens_per_second": 2}
    _build_qwen(folder, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision)


def build_qwen2_vl(folder: Path) -> None:
    """Qwen2-VL chat model: dynamic-resolution vision tower, M-RoPE; Qwen2.5-VL's template and limits."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    _build_qwen(folder, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision)


def build_llava(folder: Path) -> None:
    """LLaVA-1.5: CLIP vision tower + projector + Llama language model with untied, padded embeddings, a
    Llama-style tokenizer and the published chat template (all of a message's images before its text)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = llama_tokenizer()
    image_token = tok.convert_tokens_to_ids("<image>")
    real = published.config(LLAVA_REPO)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=padded_rows(LLAVA_REPO, len(tok)), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                tie_word_embeddings=False),
        image_token_id=image_token,
        vision_feature_select_strategy=real["vision_feature_select_strategy"],
        vision_feature_layer=real["vision_feature_layer"],
        tie_word_embeddings=False,
    )
    _seed()
    model = LlavaForConditionalGeneration(config).eval()
    _zero_unused_rows(model, len(tok))
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    template = published.chat_template(LLAVA_REPO)
    tok.chat_template = template
    proc_cfg = published.config(LLAVA_REPO, "processor_config.json")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy=proc_cfg["vision_feature_select_strategy"],
        num_additional_image_tokens=proc_cfg["num_additional_image_tokens"], chat_template=template,
        image_token="<image>",
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


def build_grounding_dino(folder: Path) -> None:
    """Grounding DINO (IDEA-Research/grounding-dino-tiny's architecture): Swin backbone at out_indices 2-4 plus one
    extra level, a BERT text encoder whose labels share one prompt ("a dog. a cat.") of at most 256 tokens
    (`max_text_len`), two-stage query selection; the image processor keeps the real 800..1333 ratio at 64..107."""
    import torch
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    tok = bert_tokenizer()
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2], window_size=2, out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=512),
        d_model=32, num_queries=30, encoder_layers=1, decoder_layers=2,  # decoder: at least 2 (its box heads tie)
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=2, decoder_n_points=2, num_feature_levels=4, max_text_len=256,
    )
    _seed()
    model = GroundingDinoForObjectDetection(config).eval()
    # Random weights score every box about 1.0: a logit is the dot product of a layer-normed query and text
    # feature (32-d). A real model scores most pairs low and a few high. Scaling the queries' last norm spreads
    # the logits less; a constant in one dimension of both norms, whose feature is zeroed there, shifts every
    # logit by -1.5**2, so scores fall on both sides of the thresholds (0.35 box, 0.25 text) as a real model's.
    with torch.no_grad():
        query_norm = model.model.decoder.layer_norm
        text_norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
        query_norm.weight.mul_(0.15)
        for norm, sign in ((query_norm, -1.0), (text_norm, 1.0)):
            norm.weight[0] = 0.0
            norm.bias[0] = sign * 1.5
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 107}), tokenizer=tok)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def build_dinov2(folder: Path) -> None:
    """DINOv2 (the instance embedder): patch 14, layer scale, LayerNorm eps 1e-6 as facebook/dinov2-base, and its
    BitImageProcessor's rule (bicubic resize of the short side, then a centre crop of 224/256 of it: a region
    crop loses its borders), at 64 -> 56 pixels."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, patch_size=14,
                          image_size=56, layer_norm_eps=1e-6, layerscale_value=1.0)
    _seed()
    Dinov2Model(config).eval().save_pretrained(str(folder))
    BitImageProcessor(do_resize=True, size={"shortest_edge": 64}, resample=3, do_center_crop=True,
                      crop_size={"height": 56, "width": 56}, do_rescale=True, rescale_factor=1 / 255,
                      do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      do_convert_rgb=True).save_pretrained(str(folder))


def build_pickscore(folder: Path) -> None:
    """A population scorer of PickScore's kind: a transformers CLIPModel (projection, learned logit scale) with a
    CLIPProcessor whose image side resizes the short edge and centre-crops, as laion/CLIP-ViT-H-14's does at 224,
    here at 32 pixels."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = clip_tokenizer(folder / "_tok")
    config = CLIPConfig(text_config=_text_encoder_config(tok).to_dict(),
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16, logit_scale_init_value=4.6052)
    _seed()
    CLIPModel(config).eval().save_pretrained(str(folder))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                                resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                image_std=[0.26862954, 0.26130258, 0.27577711])
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(folder))
    shutil.rmtree(folder / "_tok")


def _text_encoder_config(tok, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"


def _tiny_vae(repo: str):
    """A tiny VAE with the real one's latent scaling and upcast flag (SDXL's VAE overflows in fp16)."""
    from diffusers import AutoencoderKL

    real = published.config(repo, "vae/config.json")
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=4, sample_size=64,
                         scaling_factor=real.get("scaling_factor", 0.18215), force_upcast=real.get("force_upcast", True))


def _scheduler(repo: str):
    """The real repository's scheduler (SD 1.5: PNDM; SDXL: Euler), from its published config."""
    import diffusers

    real = published.config(repo, "scheduler/scheduler_config.json")
    return getattr(diffusers, real["_class_name"]).from_config(real)


def _save_pipeline(pipe, folder: Path) -> None:
    """Full-precision files and an fp16 variant beside them, as the real repositories publish."""
    import torch

    pipe.save_pretrained(str(folder))
    pipe.to(torch.float16).save_pretrained(str(folder), variant="fp16")


def build_sd(folder: Path) -> None:
    """Stable Diffusion 1.5-family pipeline (UNet, VAE, CLIP text encoder, PNDM as published); 64x64 images."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel

    tok = clip_tokenizer(folder / "_tok")
    _seed()
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(SD_REPO), text_encoder=CLIPTextModel(_text_encoder_config(tok)), tokenizer=tok, unet=unet,
        scheduler=_scheduler(SD_REPO),
        safety_checker=None, image_encoder=None, requires_safety_checker=False,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
    _save_pipeline(pipe, folder)
    shutil.rmtree(folder / "_tok")


#: what the trained tiny text-to-image preset trains, for how long (about 4 minutes on 2 CPU cores), and the checks
#: its build must pass before it is kept: the VAE keeps hue (median error of reconstructions), and samples of the
#: generic prompt cover the hues (share of 12 sectors that 64 samples reach). Each part trains its first steps,
#: then on in rounds until its check passes, up to its maximum.
TRAINED_SD = {"size": 32, "images": 4096, "vae_steps": 600, "vae_batch": 32, "unet_steps": 2000, "unet_batch": 128,
              "generic_share": 0.45, "uncond_share": 0.1,
              "vae_max_steps": 1500, "vae_round": 150, "vae_hue_error": 0.04,
              "unet_max_steps": 5000, "unet_round": 500, "hue_coverage": 0.75}


class TinyBuildError(MmpersonaError):
    """A tiny model's build did not pass its own check (it is not kept)."""


_RETRY = ("Nothing was kept: the next use builds it again. Its floats follow the CPU and the thread count "
          "(MMPERSONA_BUILD_THREADS=1 builds another); if it fails again, report it with your CPU and torch version")


def _trained_until(train_step, check, first: int, most: int, every: int, passes) -> tuple[int, float]:
    """Train `first` steps, then rounds of `every` until `passes(check())` or `most` steps; (steps, last check)."""
    done = 0
    while True:
        for _ in range(first if done == 0 else every):
            train_step()
        done += first if done == 0 else every
        value = check()
        if passes(value) or done + every > most:
            return done, value


def build_sd_trained(folder: Path) -> None:
    """A Stable Diffusion 1.5-family pipeline that has learned something: its VAE (8x down, as the real one) and
    UNet trained for a few CPU minutes on the synthetic domain of `synthetic` (a shape of some hue, brightness and
    kind on a grey ground, 32x32). Generation from `synthetic.GENERIC_PROMPT` ("a shape") covers the domain, and
    captions ("a bright red circle") steer it, so a learned preference has something to move. The random tiny SD
    cannot show that: its VAE decodes red and blue to the same grey. Text encoder, tokenizer and scheduler are
    tiny:sd's (the published PNDM); the text encoder stays frozen."""
    import random

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from . import synthetic

    cfg = TRAINED_SD
    base = StableDiffusionPipeline.from_pretrained(str(tiny_path("sd")), torch_dtype=torch.float32)
    _seed()
    rng, g = random.Random(SEED), torch.Generator().manual_seed(SEED)
    images, drawn = synthetic.batch(rng, cfg["images"], cfg["size"])
    x_all = torch.from_numpy(images)
    held_out, held_drawn = synthetic.batch(random.Random(SEED + 7919), 128, cfg["size"])  # for the VAE's check
    held_out = torch.from_numpy(held_out)
    vae = AutoencoderKL(block_out_channels=[16, 32, 32, 32], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        latent_channels=4, norm_num_groups=8, sample_size=cfg["size"], layers_per_block=1,
                        scaling_factor=0.18215, force_upcast=True)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)

    def vae_step() -> None:
        x = x_all[torch.randint(0, len(x_all), (cfg["vae_batch"],), generator=g)]
        posterior = vae.encode(x).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.sample(generator=g)).sample, x) \
            + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def vae_hue_error() -> float:
        # 450 steps learned colour on one machine and not on another (median hue error 0.02 against 0.12: the
        # build's floats depend on its CPU kernels and thread count), and every sample of that build came out in
        # two hues
        vae.eval()
        with torch.no_grad():
            out = vae.decode(vae.encode(held_out).latent_dist.mean).sample
        vae.train()
        return synthetic.hue_error(base.image_processor.postprocess(out, output_type="pil"), held_drawn)

    vae.train()
    vae_steps, vae_error = _trained_until(vae_step, vae_hue_error, cfg["vae_steps"], cfg["vae_max_steps"],
                                          cfg["vae_round"], lambda e: e <= cfg["vae_hue_error"])
    if vae_error > cfg["vae_hue_error"]:
        raise TinyBuildError(f"tiny:sd-trained: its VAE did not learn colour in {vae_steps} steps (median hue "
                             f"error {vae_error:.3f} > {cfg['vae_hue_error']}). {_RETRY}")
    vae.eval()
    with torch.no_grad():  # the latents once, and a scaling factor that gives them unit variance (as SD's does)
        dists = [vae.encode(x_all[i:i + 512]).latent_dist for i in range(0, len(x_all), 512)]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    scale = float(1 / mean.std())
    vae.register_to_config(scaling_factor=round(scale, 5))
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=cfg["size"] // 8,
                                in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=8)
    tok, text = base.tokenizer, base.text_encoder
    captions = sorted({"", synthetic.GENERIC_PROMPT} | {d.caption() for d in drawn})
    with torch.no_grad():
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        embeds = text(ids)[0]
    index = {c: i for i, c in enumerate(captions)}
    own = torch.tensor([index[d.caption()] for d in drawn])
    noise_schedule = DDPMScheduler.from_config(base.scheduler.config)  # the training schedule SD 1.5 was trained on
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    n = cfg["unet_batch"]

    def unet_step() -> None:
        i = torch.randint(0, len(x_all), (n,), generator=g)
        z = (mean[i] + std[i] * torch.randn(mean[i].shape, generator=g)) * vae.config.scaling_factor
        r = torch.rand(n, generator=g)  # each image under its caption, the generic prompt, or none (for guidance)
        which = torch.where(r < cfg["uncond_share"], index[""],
                            torch.where(r < cfg["uncond_share"] + cfg["generic_share"], index[synthetic.GENERIC_PROMPT],
                                        own[i]))
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (n,), generator=g)
        loss = torch.nn.functional.mse_loss(
            unet(noise_schedule.add_noise(z, noise, t), t, encoder_hidden_states=embeds[which]).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=base.scheduler,
                                   safety_checker=None, image_encoder=None, requires_safety_checker=False,
                                   feature_extractor=base.feature_extractor)
    pipe.set_progress_bar_config(disable=True)

    def coverage() -> float:
        unet.eval()
        with torch.no_grad():
            samples = pipe(synthetic.GENERIC_PROMPT, num_images_per_prompt=64, num_inference_steps=20,
                           generator=torch.Generator().manual_seed(0)).images
        unet.train()
        return synthetic.hue_coverage(samples)

    unet.train()
    unet_steps, hue_coverage = _trained_until(unet_step, coverage, cfg["unet_steps"], cfg["unet_max_steps"],
                                              cfg["unet_round"], lambda c: c >= cfg["hue_coverage"])
    if hue_coverage < cfg["hue_coverage"]:
        raise TinyBuildError(f"tiny:sd-trained: its samples reach {hue_coverage:.2f} of the hues after {unet_steps} "
                             f"UNet steps (< {cfg['hue_coverage']}). {_RETRY}")
    unet.eval()
    pipe.set_progress_bar_config(disable=False)
    pipe.save_pretrained(str(folder))  # no fp16 variant: it stands in for no published repository
    checks = {"vae_steps_trained": vae_steps, "vae_hue_error_measured": round(vae_error, 4),
              "unet_steps_trained": unet_steps, "hue_coverage_measured": round(hue_coverage, 4)}
    logger.info("tiny:sd-trained passed its checks: %s", checks)
    (folder / "training.json").write_text(json.dumps({**cfg, **checks, "seed": SEED,
                                                      "domain": "mmpersona.models.synthetic",
                                                      "generic_prompt": synthetic.GENERIC_PROMPT}, indent=1))


def build_sdxl(folder: Path) -> None:
    """Stable Diffusion XL pipeline (two CLIP text encoders, text_time conditioning, Euler as published, a VAE
    that must be upcast); 64x64 images."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
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
        vae=_tiny_vae(SDXL_REPO),
        text_encoder=CLIPTextModel(_text_encoder_config(tok)),
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(tok, projection_dim=pooled_dim)),
        tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=_scheduler(SDXL_REPO),
        image_encoder=None, feature_extractor=None,
    )
    _save_pipeline(pipe, folder)
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
        TinyModel("qwen2.5-vl", "vlm", "Qwen2.5-VL chat VLM (window attention, tied padded vocabulary)",
                  build_qwen2_5_vl),
        TinyModel("qwen2-vl", "vlm", "Qwen2-VL chat VLM (tied padded vocabulary)", build_qwen2_vl),
        TinyModel("llava", "vlm", "LLaVA-1.5 chat VLM (CLIP vision + Llama, untied padded vocabulary, images "
                  "first)", build_llava),
        TinyModel("owlv2", "detector", "OWLv2 zero-shot object detector", build_owlv2),
        TinyModel("grounding-dino", "detector", "Grounding DINO zero-shot object detector (Swin + BERT, labels in "
                  "one prompt of at most 256 tokens)", build_grounding_dino),
        TinyModel("dinov2", "instance", "DINOv2 instance embedder (patch 14, layer scale, 224/256 centre crop)",
                  build_dinov2),
        TinyModel("sd", "t2i", "Stable Diffusion 1.5-family pipeline", build_sd),
        TinyModel("sdxl", "t2i_xl", "Stable Diffusion XL pipeline", build_sdxl),
        TinyModel("sd-trained", "t2i", "SD 1.5-family pipeline trained a few CPU minutes on a synthetic domain (hue, "
                  "brightness, shape): vanilla samples cover it, a preference can move them", build_sd_trained,
                  requires=("sd",)),
        TinyModel("pickscore", "scorer", "PickScore-style population scorer (transformers CLIPModel + CLIPProcessor)",
                  build_pickscore),
        TinyModel("ip-adapter", "ip_adapter", "IP-Adapter for tiny SD and SDXL (h94/IP-Adapter layout)",
                  build_ip_adapter, requires=("sd", "sdxl")),
    )
}
