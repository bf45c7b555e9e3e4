"""Each default architecture at its real widths, through the toolkit's own code: does every stage run, and
what would it cost at full depth?

    python benchmarks/real_shapes.py [--stages embed,retrieve,answer,learn_tokens,generate,dpo,adapter,generate_xl,...]
                                     [--device cpu|cuda|cuda:N] [--dtype float32|bfloat16|float16] [--full]
                                     [--resolution 512] [--resolution-xl 1024] [--out report.json]

The architectures are built from the published configuration files kept in `mmpersona/models/published/`
(Qwen2.5-VL-3B-Instruct, open_clip ViT-L-14-336, OWLv2 base, SD 1.5, SDXL base and their IP-Adapter image
encoders), with random weights and no download: real hidden sizes, head counts, vocabulary rows (151,936 for
Qwen, tied), vision windows, processor limits and schedulers, but few layers. Each stage runs in a process of
its own, twice, at two reduced depths; its memory at full depth is extrapolated linearly in the parameters the
extra depth adds (`full_depth_estimate_mb`; the full parameter count comes from the full model built on the
`meta` device). With `--full` (what `scripts/gpu_check.sh` runs on a GPU) each stage runs once at full depth and
full resolution, and the estimate is the measurement.

Stages (the toolkit's code path each one goes through):
- embed: `ClipEmbedder.embed_images` on a 4000x3000 photo (ViT-L/14 at 336 px).
- retrieve: `ConceptDB.add` of 20 concepts, then `Retriever.by_image` and `by_regions` with the OWLv2 detector
  (960x960, one pass for all categories) on the photo.
- instance: `InstanceEmbedder.embed_images` on the photo and 8 region crops (DINOv2 ViT-B/14: transformers'
  Dinov2Config defaults are facebook/dinov2-base's widths, with its 518-px position grid and its BitImageProcessor
  rule, resize 256 then centre crop 224; no config file of it is vendored, see README "Models").
- answer: `PersonalizedVLMPipeline` one chat turn about the 4000x3000 photo with one reference image
  (Qwen2.5-VL-3B widths, the default visual-token budget).
- learn_tokens: one `learn_concept` step (16 latent tokens) on the photo.
- generate / generate_xl: `PersonalizedT2IPipeline` one denoising step with attributes + IP-Adapter (SD 1.5 /
  SDXL widths).
- serve / serve_xl: `mmpersona serve`'s largest allowed generation with its defaults: 4 images in one diffusers
  call (`--batch-size`), VAE slicing, at the largest side a request may ask for (`ServeConfig.largest_side`).
- dpo / dpo_xl: one `train_dpo_lora` step on one pair, `DPOConfig`'s defaults otherwise.
- adapter / adapter_xl: one multi-user `train_adapter` step with `adapter train`'s defaults (a micro-batch of 4
  users, gradient checkpointing, images encoded 2 at a time, held-out users evaluated 4 pairs per UNet call) on
  non-square photos (the preference adapter at the UNet's real cross-attention width, SDXL's pooled head too),
  then one denoising step with attributes + viper + preference.

Every stage runs at the model's real resolution by default (SD 1.5 512 px, SDXL 1024 px), with the toolkit's
own default settings: what a first user's first run needs.

Memory: on CUDA the peak of `torch.cuda.max_memory_allocated`; on CPU the process's peak RSS above what it held
before building the model. Prints one JSON line per stage with `stage`, `params`, `visual_tokens`, `peak_mb`,
`seconds`, `full_depth_estimate_mb`, `ok` (and `full_params`, `depth`, `resolution`, `error`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T2I_STAGES = ("generate", "serve", "dpo", "adapter", "generate_xl", "serve_xl", "dpo_xl", "adapter_xl")
STAGES = ("embed", "retrieve", "instance", "answer", "learn_tokens", *T2I_STAGES)
#: `mmpersona serve --batch-size`'s default: images per diffusers call
SERVE_BATCH = 4
QWEN = "Qwen/Qwen2.5-VL-3B-Instruct"
SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
OWL = "google/owlv2-base-patch16-ensemble"
IPA = "h94/IP-Adapter"
#: full depth as published; a reduced run uses `level` blocks per stack instead
FULL = 10**6


def photo(size=(4000, 3000), seed=0):
    """A phone-sized photo with some structure (noise and shapes), made here."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    small = (rng.random((h // 40, w // 40, 3)) * 255).astype("uint8")
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    d = ImageDraw.Draw(img)
    d.ellipse((w // 5, h // 5, w // 2, h // 2), fill=(200, 40, 30))
    d.rectangle((w // 2, h // 2, 4 * w // 5, 4 * h // 5), fill=(30, 60, 200))
    return img


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_params(build) -> int:
    """Parameters of the full-depth model, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return sum(_params(m) for m in build(FULL))


# ------------------------------------------------------------------------------------------ architectures


def clip_model(level: int):
    from open_clip.model import CLIP

    from mmpersona.models import published

    cfg = published.config("open_clip/ViT-L-14-336", "ViT-L-14-336.json")
    cfg["vision_cfg"]["layers"] = min(level, cfg["vision_cfg"]["layers"])
    cfg["text_cfg"]["layers"] = min(level, cfg["text_cfg"]["layers"])
    return CLIP(**cfg, quick_gelu=True), cfg  # the OpenAI weights use QuickGELU


def embedder(level: int, device, dtype):
    import open_clip
    from open_clip.transform import image_transform

    from mmpersona.embedder import ClipEmbedder

    model, cfg = clip_model(level)
    model = model.to(device=device, dtype=dtype).eval()
    preprocess = image_transform(cfg["vision_cfg"]["image_size"], is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                 std=open_clip.OPENAI_DATASET_STD, resize_mode="shortest", interpolation="bicubic")
    return ClipEmbedder(model, preprocess, open_clip.get_tokenizer("ViT-L-14-336"), name="real-shapes:ViT-L-14-336",
                        dim=cfg["embed_dim"], device=device, dtype=dtype)


def owlv2(level: int, device, dtype):
    from transformers import Owlv2ImageProcessor, Owlv2Processor

    from mmpersona.models import published
    from mmpersona.models.loaders import Detector
    from mmpersona.models.registry import ModelSpec
    from mmpersona.models.tiny import clip_tokenizer

    with torch_device(device):
        model = owlv2_model(level)
    tok = clip_tokenizer(Path(tempfile.mkdtemp()), n_merges=None,
                         max_length=model.config.text_config.max_position_embeddings)
    pre = published.config(OWL, "preprocessor_config.json")
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size=pre["size"]), tokenizer=tok)
    return Detector(model.to(device=device, dtype=dtype).eval(), processor, ModelSpec("detector", OWL), device, dtype)


def torch_device(device):
    """Build directly where the model will run (a full-depth model built on the CPU first would be slow)."""
    import torch

    return torch.device(device)


def qwen_config(level: int, tok):
    from transformers import Qwen2_5_VLConfig

    from mmpersona.models import published

    raw = published.config(QWEN)
    raw.pop("architectures", None)
    cfg = Qwen2_5_VLConfig(**raw)
    text, vision = cfg.text_config, cfg.vision_config
    text.num_hidden_layers = min(level, text.num_hidden_layers)
    if level < FULL:  # keep both kinds of vision block: windowed ones and a full-attention one last
        vision.depth = 2 * level
        vision.fullatt_block_indexes = [2 * level - 1]
    if tok is not None:  # our stand-in tokenizer's ids for the special tokens (the rows stay 151,936)
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                         "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
        cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
        text.eos_token_id, text.pad_token_id, text.bos_token_id = ids["<|im_end|>"], ids["<|endoftext|>"], None
    return cfg


def qwen(level: int, device, dtype):
    """Qwen2.5-VL-3B at its real widths (151,936 tied rows), with a stand-in tokenizer (the real one cannot be
    downloaded here) and the published processor, template and limits."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    from mmpersona.models import LoadedVLM, published
    from mmpersona.models.registry import ModelSpec
    from mmpersona.models.tiny import _qwen_image_processor, chat_tokenizer

    tok = chat_tokenizer()
    template = published.chat_template(QWEN)
    tok.chat_template = template
    processor = Qwen2_5_VLProcessor(image_processor=_qwen_image_processor(), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    with torch_device(device):
        model = Qwen2_5_VLForConditionalGeneration(qwen_config(level, tok))
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedVLM(model, processor, ModelSpec("vlm", QWEN), device, dtype)


def _unet_config(repo: str, level: int) -> dict:
    from mmpersona.models import published

    cfg = published.config(repo, "unet/config.json")
    cfg["layers_per_block"] = min(level, cfg["layers_per_block"])
    tl = cfg.get("transformer_layers_per_block")
    if isinstance(tl, list):
        cfg["transformer_layers_per_block"] = [min(level, n) for n in tl]
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _text_config(repo: str, sub: str, level: int, cls):
    from mmpersona.models import published

    raw = {k: v for k, v in published.config(repo, f"{sub}/config.json").items() if not k.startswith("_")}
    raw.pop("architectures", None)
    cfg = cls(**raw)
    cfg.num_hidden_layers = min(level, cfg.num_hidden_layers)
    return cfg


def t2i_modules(repo: str, level: int) -> list:
    """UNet, VAE, text encoder(s) and IP-Adapter image encoder at `level` (for counting parameters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from mmpersona.models import published

    xl = repo == SDXL
    vae = {k: v for k, v in published.config(repo, "vae/config.json").items() if not k.startswith("_")}
    mods = [UNet2DConditionModel(**_unet_config(repo, level)), AutoencoderKL(**vae),
            CLIPTextModel(_text_config(repo, "text_encoder", level, CLIPTextConfig))]
    if xl:
        mods.append(CLIPTextModelWithProjection(_text_config(repo, "text_encoder_2", level, CLIPTextConfig)))
    enc = published.config(IPA, f"{'sdxl_models' if xl else 'models'}/image_encoder/config.json")
    enc = {k: v for k, v in enc.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}
    vision = CLIPVisionConfig(**{k: v for k, v in enc.items() if k in CLIPVisionConfig().to_dict()})
    vision.num_hidden_layers = min(level, vision.num_hidden_layers)
    mods.append(CLIPVisionModelWithProjection(vision))
    return mods


def t2i(repo: str, level: int, device, dtype):
    """A diffusers pipeline at the real widths with the published scheduler and VAE, the real 49,408-token CLIP
    tokenizer, and an IP-Adapter (published image encoder shapes, 4 tokens) loaded through diffusers."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from mmpersona.models import LoadedT2I
    from mmpersona.models.registry import IPAdapterSpec, ModelSpec
    from mmpersona.models.tiny import _scheduler, ip_adapter_state_dict, write_clip_bpe

    xl = repo == SDXL
    folder = Path(tempfile.mkdtemp(prefix="mmpersona-real-shapes-"))
    write_clip_bpe(folder / "tok")
    tok = CLIPTokenizer.from_pretrained(str(folder / "tok"), model_max_length=77)
    with torch_device(device):
        mods = t2i_modules(repo, level)
    unet, vae, text, *rest = mods
    encoder = rest[-1]
    parts = {"vae": vae, "text_encoder": text, "tokenizer": tok, "unet": unet, "scheduler": _scheduler(repo),
             "image_encoder": None, "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 224},
                                                                            crop_size={"height": 224, "width": 224})}
    if xl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=rest[0], tokenizer_2=tok)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, requires_safety_checker=False)
    save_file({k: v.contiguous() for k, v in ip_adapter_state_dict(unet, encoder.config.projection_dim).items()},
              str(folder / "ip.safetensors"))
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    pipe.register_modules(image_encoder=encoder)
    pipe.to(device=device, dtype=dtype)
    loaded = LoadedT2I(pipe, ModelSpec("t2i_xl" if xl else "t2i", repo,
                                       ip_adapter=IPAdapterSpec(IPA, "", "ip.safetensors")), ip_adapter=True)
    return loaded, mods


# ------------------------------------------------------------------------------------------ stages


def run_stage(stage: str, level: int, device, dtype, resolution: int) -> dict:
    """One stage at one depth, in this process; returns what it measured."""
    from mmpersona import ConceptDB
    from mmpersona.preferences import PreferenceProfile

    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-real-shapes-db-"))
    out: dict = {"visual_tokens": None}
    if stage in ("embed", "retrieve"):
        emb = embedder(level, device, dtype)
        out["params"] = _params(emb.model)
        out["full_params"] = _meta_params(lambda lv: [clip_model(lv)[0]])
        size = emb.model.visual.image_size
        out["visual_tokens"] = (size[0] // 14) * (size[1] // 14)
        big = photo()
        start = time.perf_counter()
        if stage == "embed":
            vec = emb.embed_images([big])
            out["ok"] = bool(abs(float((vec**2).sum()) - 1) < 1e-3)
        else:
            detector = owlv2(level, device, dtype)
            out["params"] += _params(detector.model)
            out["full_params"] += _meta_params(lambda lv: [owlv2_model(lv)])
            from pipelines.retrieval import Retriever

            db = ConceptDB(tmp / "c.db", embedder=emb)
            for i in range(20):
                db.add("alice", f"c{i}", [photo((256, 192), seed=i + 1)], category=["dog", "mug", "plant"][i % 3])
            start = time.perf_counter()
            retriever = Retriever(db, detector)
            hits = retriever.by_image("alice", big, k=3) + retriever.by_regions("alice", big, k=3)
            vision = detector.model.config.vision_config
            out["visual_tokens"] = (vision.image_size // vision.patch_size) ** 2
            out["ok"] = bool(hits)
            db.close()
        out["seconds"] = time.perf_counter() - start
        return out
    if stage == "instance":
        emb = instance_embedder(level, device, dtype)
        out["params"] = _params(emb.model)
        out["full_params"] = _meta_params(lambda lv: [dinov2_model(lv)])
        out["visual_tokens"] = (224 // 14) ** 2
        big = photo()
        start = time.perf_counter()
        crops = [big.crop((x, y, x + 900, y + 700)) for x in (0, 1000, 2000, 3000) for y in (0, 2000)]
        vectors = emb.embed_images([big, *crops])
        out["ok"] = bool(vectors.shape == (9, 768) and abs(float((vectors[0] ** 2).sum()) - 1) < 1e-3)
        out["seconds"] = time.perf_counter() - start
        return out
    if stage in ("answer", "learn_tokens"):
        from pipelines import PersonalizedVLMPipeline, PromptBudget
        from pipelines.tokens import LearnConfig, learn_concept

        vlm = qwen(level, device, dtype)
        out["params"] = _params(vlm.model)
        out["full_params"] = _meta_params(lambda lv: [qwen_model(lv)])
        tiny_clip = tiny_embedder()
        db = ConceptDB(tmp / "c.db", embedder=tiny_clip)
        db.add("alice", "bo", [photo(seed=1)], category="dog", info="Alice's Shiba Inu")
        db.add("alice", "mug", [photo((640, 480), seed=2)], category="mug", info="a blue mug")
        big = photo()
        out["visual_tokens"] = vlm.visual_tokens(big)
        start = time.perf_counter()
        if stage == "answer":
            pipe = PersonalizedVLMPipeline(db, vlm=vlm, max_new_tokens=4, budget=PromptBudget(max_images=1))
            answer = pipe(big, "What is <bo> doing?", user="alice")
            out["ok"] = isinstance(answer.answer, str) and bool(answer.retrieved)
        else:
            result = learn_concept(vlm, db, "alice", "bo", config=LearnConfig(tokens=16, steps=1), progress=False,
                                   save=False, negatives=[photo((800, 600), seed=3)])
            out["ok"] = all(x == x for x in result.losses) and result.steps == 1
        out["seconds"] = time.perf_counter() - start
        db.close()
        return out
    if stage in T2I_STAGES:
        from pipelines import PersonalizedT2IPipeline
        from pipelines.dpo import DPOConfig, train_dpo_lora

        repo = SDXL if stage.endswith("_xl") else SD
        loaded, mods = t2i(repo, level, device, dtype)
        out["params"] = sum(_params(m) for m in mods)
        out["full_params"] = _meta_params(lambda lv: t2i_modules(repo, lv))
        out["resolution"] = resolution
        db = ConceptDB(tmp / "c.db", embedder=tiny_embedder())
        profile = PreferenceProfile(db, "alice")
        profile.like(photo((512, 512), seed=4), comment="warm light")
        profile.set_attributes(liked=["warm light"], disliked=["blue cast"])
        profile.compare("a dog on a sofa", photo((512, 512), seed=5), photo((512, 512), seed=6))
        start = time.perf_counter()
        if stage.startswith("generate"):
            pipe = PersonalizedT2IPipeline(db, t2i=loaded, strategies=["attributes", "ip_adapter"])
            result = pipe("a dog on a sofa", user="alice", steps=1, height=resolution, width=resolution)
            out["ok"] = result.images[0].size == (resolution, resolution)
        elif stage.startswith("serve"):
            # `mmpersona serve`'s largest allowed generation with its defaults: --batch-size 4 images per diffusers
            # call, VAE slicing, sides up to 2x native (routes/images.py `within_budget`)
            from mmpersona.server.config import ServeConfig

            loaded.pipeline.vae.enable_slicing()  # as `load_t2i(vae_slicing=True)` does
            pipe = PersonalizedT2IPipeline(db, t2i=loaded, strategies=["attributes", "ip_adapter"],
                                           batch_size=SERVE_BATCH)
            side = ServeConfig().largest_side(pipe.native_size)
            out["resolution"] = side
            result = pipe("a dog on a sofa", user="alice", n=SERVE_BATCH, steps=1, height=side, width=side)
            out["ok"] = len(result.images) == SERVE_BATCH and result.images[0].size == (side, side)
        elif stage.startswith("adapter"):
            import io

            from pipelines.adapter_training import AdapterTrainConfig, PairRow, train_adapter

            def png(seed, size):
                buf = io.BytesIO()
                photo(size, seed=seed).save(buf, format="PNG")
                return buf.getvalue()

            # `adapter train`'s defaults (micro-batch, checkpointing, held-out evaluation in chunks, encoding in
            # small batches), one step of one micro-batch: accumulation and more steps add no memory
            config = AdapterTrainConfig(steps=1, gradient_accumulation=1, eval_draws=1, heldout_users=0.3,
                                        resolution=resolution)
            users = ("u1", "u2", "u3")
            rows = [PairRow(u, f"a dog on a sofa {i}", png(100 * k + 2 * i, (768, 512)), png(100 * k + 2 * i + 1,
                                                                                              (512, 768)))
                    for k, u in enumerate(users) for i in range(config.context + config.eval_batch_size)]
            trained = train_adapter(loaded, db.embedder, rows, tmp / "adapter", config, progress=False)
            pipe = PersonalizedT2IPipeline(db, t2i=loaded, adapter=str(tmp / "adapter"),
                                           strategies=["attributes", "viper", "preference"])
            result = pipe("a dog on a sofa", user="alice", steps=1, height=resolution, width=resolution)
            out["ok"] = (trained.steps == 1 and all(x == x for x in trained.losses)
                         and trained.heldout_pair_accuracy is not None
                         and result.images[0].size == (resolution, resolution))
        else:
            result = train_dpo_lora(loaded, db, "alice", DPOConfig(steps=1, resolution=resolution), progress=False,
                                    save=False)
            out["ok"] = result.steps == 1 and all(x == x for x in result.losses)
        out["seconds"] = time.perf_counter() - start
        db.close()
        return out
    raise SystemExit(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")


def owlv2_model(level):
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    from mmpersona.models import published

    cfg = Owlv2Config(**published.config(OWL))
    cfg.text_config.num_hidden_layers = min(level, cfg.text_config.num_hidden_layers)
    cfg.vision_config.num_hidden_layers = min(level, cfg.vision_config.num_hidden_layers)
    return Owlv2ForObjectDetection(cfg)


def dinov2_model(level):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(image_size=518)  # the defaults are dinov2-base's: 768 wide, 12 x 12 heads, patch 14
    cfg.num_hidden_layers = min(level, cfg.num_hidden_layers)
    return Dinov2Model(cfg)


def instance_embedder(level: int, device, dtype):
    from transformers import BitImageProcessor

    from mmpersona.instance import InstanceEmbedder

    with torch_device(device):
        model = dinov2_model(level).to(dtype).eval()
    processor = BitImageProcessor(size={"shortest_edge": 256}, resample=3, crop_size={"height": 224, "width": 224},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return InstanceEmbedder(model, processor, name="facebook/dinov2-base", dim=model.config.hidden_size,
                            device=device, dtype=dtype)


def qwen_model(level):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(qwen_config(level, None))


def tiny_embedder():
    """The profile and concept side of the VLM and T2I stages (not what is measured)."""
    from mmpersona.models import load_embedder

    return load_embedder(preset="tiny", device="cpu")


def worker(args) -> None:
    """Run one stage and print its measurements as one JSON line (called in a process of its own)."""
    import torch

    from mmpersona.devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        out = run_stage(args.worker, args.level, device, dtype, args.resolution)
        out["error"] = None
    except Exception as e:  # reported in the stage's JSON line, with the traceback on stderr
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    print("RESULT " + json.dumps(out, default=str), flush=True)


def measure(stage: str, level: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, "--level", str(level), "--device", args.device,
           "--resolution", str(args.resolution_xl if stage.endswith("_xl") else args.resolution)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no result"])[-1][:500]}
    result = json.loads(lines[-1][len("RESULT "):])
    if not result.get("ok") and proc.stderr:
        print(proc.stderr[-3000:], file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--full", action="store_true", help="full depth and resolution (for a GPU)")
    parser.add_argument("--resolution", type=int, default=512, help="SD 1.5 image size (default: its native 512)")
    parser.add_argument("--resolution-xl", type=int, default=1024, help="SDXL image size (default: its native 1024)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per stage run")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    lines = []
    if args.out is not None:
        args.out.write_text("", encoding="utf-8")
    for stage in stages:
        print(f"{stage}: running", file=sys.stderr, flush=True)
        if args.full:
            r = measure(stage, FULL, args)
            estimate, depth = r.get("peak_mb"), "full"
        else:  # two reduced depths; memory extrapolated linearly in the parameters depth adds
            r1, r = measure(stage, 1, args), measure(stage, 2, args)
            depth = "2 (and 1)"
            estimate = None
            if r1.get("ok") and r.get("ok") and r["params"] > r1["params"]:
                per_param = (r["peak_mb"] - r1["peak_mb"]) / (r["params"] - r1["params"])
                estimate = r["peak_mb"] + max(per_param, 0) * (r["full_params"] - r["params"])
            elif r.get("ok") and r.get("full_params") == r.get("params"):
                estimate = r["peak_mb"]
            if r1.get("error") and not r.get("error"):
                r["error"] = r1["error"]
            r["ok"] = bool(r.get("ok") and r1.get("ok"))
        line = {"stage": stage, "params": r.get("params"), "visual_tokens": r.get("visual_tokens"),
                "peak_mb": _round(r.get("peak_mb")), "seconds": _round(r.get("seconds"), 2),
                "full_depth_estimate_mb": _round(estimate), "ok": bool(r.get("ok")),
                "full_params": r.get("full_params"), "depth": depth, "resolution": r.get("resolution"),
                "device": args.device, "error": r.get("error")}
        lines.append(line)
        print(json.dumps(line), flush=True)
        if args.out is not None:  # line by line: a run cut short keeps what it measured
            with args.out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
    if not all(x["ok"] for x in lines):
        sys.exit(1)


def _round(x, nd=1):
    return None if x is None else round(float(x), nd)


if __name__ == "__main__":
    main()
