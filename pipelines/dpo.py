"""A per-user LoRA trained with Diffusion-DPO on the user's pairwise choices.

Diffusion-DPO (Wallace et al., 2023): for a pair (prompt, chosen x_w, rejected x_l), noise both latents with the
same noise and timestep, and compare how much the LoRA-adapted UNet improves the denoising error over the frozen
reference on x_w versus x_l:

    loss = -log sigmoid(-beta / 2 * ((e_w - e_w_ref) - (e_l - e_l_ref)))

with e the per-sample MSE of the noise (or v) prediction. The reference is the same UNet with the adapter
disabled, so no second copy of the model is held. Only the LoRA parameters (peft, on the attention projections)
train; they are stored per user as safetensors in diffusers' LoRA format and served by adapter name.

What real checkpoints need, and this does:
- Training noise comes from a DDPM scheduler made from the pipeline's scheduler config, as diffusers' own DPO
  scripts do. SDXL ships EulerDiscreteScheduler, whose `add_noise` returns x + sigma * noise (sigma up to
  ~14.6) for inputs it expects to be scaled first, and which after any generation in the same process noises
  every timestep with the last step's sigma (0).
- LoRA weights and their optimizer state are float32 even when the UNet is bf16/fp16 (peft creates them in the
  base layer's dtype, where AdamW's 1e-4 steps round away, and fp16's eps of 1e-8 rounds to 0).
- Training images are encoded with the VAE in float32 (the SDXL VAE overflows in fp16).
- The UNet stays on the pipeline's device (`--device cuda:1` included): accelerate does not place it.
- Gradient checkpointing (on by default) and a training resolution option, for consumer GPUs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmpersona.errors import MmpersonaError

from .t2i import LORA_BLOB

if TYPE_CHECKING:
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.models import LoadedT2I

logger = logging.getLogger(__name__)
ADAPTER = "dpo_training"


@dataclass
class DPOConfig:
    """rank / alpha: LoRA size; beta: DPO strength; steps, lr; early stopping after `patience` checks (every
    `eval_every` steps) without a better average loss; mixed_precision for accelerate; gradient_checkpointing
    in the UNet; resolution: training image size (None: the UNet's native size, 512 for SD 1.5, 1024 for
    SDXL; a multiple of 64).

    Why rank 16 and lr 3e-4 (they were 4 and 1e-4): a rank-4 LoRA can change the attention only along the 4
    random input directions its `A` starts with (B starts at 0, so A learns slowly), and whether those let it
    express the user's preference was luck: on the planted-hue world, 8 users' LoRAs won 0.73 / 0.61 / 0.75
    against vanilla with training seeds 0 / 1 / 2, and no change of beta, learning rate, pairs per step or
    mirrored pairs at rank 4 closed that gap. At rank 16 the seeds agree (0.73 / 0.73 / 0.72), and lr 3e-4 lifts
    them (0.80 / 0.77 / 0.78). Rank 16 is 4x the stored LoRA (SD 1.5: about 13 MB). On builds of the trained
    tiny preset that check their own hue coverage (three builds: seeds 0, 1, 2, on 2 threads and 1) the same 8
    users' LoRAs win 0.80-0.95 over training seeds 0, 1, 2 (0.45-0.55 on an unchecked build that had collapsed to
    two hues: what a LoRA can reach depends first on what its base model can draw).

    Diversity watch: every `diversity_every` steps, `diversity_images` images of the user's latest pair prompt
    (seeds 0, 1, ...; `diversity_steps` denoising steps) are generated with the LoRA and their diversity (mean
    pairwise CLIP distance) compared with vanilla's for the same prompt and seeds. Below `diversity_floor` x
    vanilla's, "stop" ends training with the LoRA of the last check that kept the floor (none: the first
    check's), "warn" logs it and goes on; both are in `DPOResult.diversity`. diversity_floor 0: not watched."""

    rank: int = 16
    alpha: int | None = None
    beta: float = 2000.0
    steps: int = 200
    lr: float = 3e-4
    eval_every: int = 20
    patience: int = 3
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = True
    resolution: int | None = None
    diversity_floor: float = 0.8
    diversity_action: str = "stop"
    diversity_every: int = 50
    diversity_images: int = 4
    diversity_steps: int = 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.diversity_floor <= 1.0:
            raise MmpersonaError(f"DPOConfig.diversity_floor must be in [0, 1], got {self.diversity_floor}")
        if self.diversity_action not in ("stop", "warn"):
            raise MmpersonaError(f"DPOConfig.diversity_action must be 'stop' or 'warn', got {self.diversity_action!r}")
        if self.diversity_every < 1 or self.diversity_images < 2 or self.diversity_steps < 1:
            raise MmpersonaError("DPOConfig: diversity_every and diversity_steps must be at least 1, "
                                 "diversity_images at least 2")
        if self.rank < 1 or self.steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise MmpersonaError("DPOConfig: rank, steps, eval_every and patience must be at least 1")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 64):
            raise MmpersonaError(f"DPOConfig.resolution must be a multiple of 64 (>= 64), got {self.resolution}")
        if not self.beta > 0 or not self.lr > 0:
            raise MmpersonaError("DPOConfig: beta and lr must be positive")


@dataclass
class DPOResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    pairs: int = 0
    diversity: list[dict[str, Any]] = field(default_factory=list)  # each check: step, ratio to vanilla's
    diversity_stopped: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "pairs": self.pairs, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "seconds": round(self.seconds, 3),
                "stopped_early": self.stopped_early, "diversity": self.diversity,
                "diversity_stopped": self.diversity_stopped, "warnings": self.warnings}


def _size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def noise_scheduler(pipe):
    """The scheduler training noise comes from: DDPM with the pipeline's own betas and prediction type (its
    sampling scheduler may be Euler, whose `add_noise` expects scaled inputs and tracks the sampling step)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


@contextmanager
def vae_in_float32(vae):
    """The VAE in float32 for encoding training images (the SDXL VAE gives NaN in fp16), then back."""
    import torch

    dtype = vae.dtype
    if dtype != torch.float32:
        vae.to(torch.float32)
    try:
        yield vae
    finally:
        if dtype != torch.float32:
            vae.to(dtype)


@contextmanager
def ip_adapter_scale(pipe, scale: float):
    """The pipeline's IP-Adapter scale set to `scale` inside, then put back as it was (each attention processor's
    own). Training sets it: after loading it is 1.0, after an `ip_adapter` or `subject` call 0.6-0.7, and
    generation without liked images runs at 0."""
    if pipe.unet.encoder_hid_proj is None:
        yield
        return
    before = {name: list(proc.scale) for name, proc in pipe.unet.attn_processors.items()
              if isinstance(getattr(proc, "scale", None), list)}
    pipe.set_ip_adapter_scale(scale)
    try:
        yield
    finally:
        processors = pipe.unet.attn_processors
        for name, value in before.items():
            processors[name].scale = value


def prepare_pairs(t2i: "LoadedT2I", db: "ConceptDB", user: str,
                  resolution: int | None = None) -> list[dict[str, Any]]:
    """Latents of each chosen / rejected image and the prompt conditioning, computed once."""
    import torch

    from mmpersona.images import load_image
    from mmpersona.preferences import PreferenceProfile

    pairs = PreferenceProfile(db, user).events("pair")
    if not pairs:
        raise MmpersonaError(f"user {user!r} has no pairwise choices to train on (add some with "
                             "`mmpersona profile compare`)")
    pipe = t2i.pipeline
    size = resolution or _size(pipe)
    device, dtype = t2i.device, pipe.unet.dtype
    xl = t2i.is_xl
    vae = pipe.vae
    out = []
    with vae_in_float32(vae):
        pixels_of = {}
        for e in pairs:
            for h in (e.image, e.other):
                if h not in pixels_of:
                    pixels_of[h] = pipe.image_processor.preprocess(load_image(db.store.image_bytes(user, h)),
                                                                   height=size, width=size)
        with torch.no_grad():
            for e in pairs:
                x = torch.cat([pixels_of[e.image], pixels_of[e.other]]).to(device, torch.float32)
                latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
                if not bool(torch.isfinite(latents).all()):
                    raise MmpersonaError("the VAE gave non-finite latents for a training image")
                out.append({"latents": latents.to(dtype), "prompt": e.prompt})
    with torch.no_grad():
        for item in out:
            e_prompt = item.pop("prompt")
            if xl:
                embeds, _, pooled, _ = pipe.encode_prompt(e_prompt, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
                time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
                cond = {"text_embeds": pooled.repeat(2, 1).to(dtype), "time_ids": time_ids.to(device).repeat(2, 1)}
            else:
                embeds, _ = pipe.encode_prompt(e_prompt, device, 1, False)
                cond = None
            neutral = neutral_image_embeds(pipe, 2, device, dtype)
            if neutral is not None:
                cond = {**(cond or {}), "image_embeds": neutral}
            item.update({"embeds": embeds.repeat(2, 1, 1).to(dtype), "added": cond})
    return out


def neutral_image_embeds(pipe, n: int, device: Any, dtype: Any) -> "list | None":
    """The UNet's `image_embeds` input when an IP-Adapter is loaded (it must get one): zeros, a neutral image
    prompt for `n` samples, in diffusers' list-per-adapter form; None without an IP-Adapter."""
    import torch

    if pipe.unet.encoder_hid_proj is None:
        return None
    return [torch.zeros(n, 1, pipe.image_encoder.config.projection_dim, device=device, dtype=dtype)]


def dpo_loss(pipe, item: dict[str, Any], beta: float, timestep: Any, noise: Any, scheduler: Any = None):
    """The Diffusion-DPO loss of one pair at a given timestep and noise (the same for chosen and rejected).

    `scheduler` adds the training noise (default: `noise_scheduler(pipe)`, DDPM)."""
    import torch
    import torch.nn.functional as F

    unet = pipe.unet
    scheduler = scheduler if scheduler is not None else noise_scheduler(pipe)
    latents = item["latents"]  # (2, c, h, w): chosen, rejected
    noise2 = noise.expand_as(latents)
    t = timestep.expand(2)
    noisy = scheduler.add_noise(latents, noise2, t)
    target = noise2 if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise2, t)
    kwargs = {"encoder_hidden_states": item["embeds"]}
    if item["added"] is not None:
        kwargs["added_cond_kwargs"] = item["added"]
    pred = unet(noisy, t, **kwargs).sample
    with torch.no_grad():
        unet.disable_adapters()
        try:
            ref = unet(noisy, t, **kwargs).sample
        finally:
            unet.enable_adapters()
    err = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    err_ref = F.mse_loss(ref.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    inside = -0.5 * beta * ((err[0] - err_ref[0]) - (err[1] - err_ref[1]))
    return -F.logsigmoid(inside)


def add_lora(pipe, config: DPOConfig) -> list:
    """Attach a fresh LoRA (peft) to the UNet's attention projections; returns its trainable parameters, in
    float32 whatever the UNet's dtype (peft's layers cast their input to the LoRA weights' dtype and back)."""
    from peft import LoraConfig

    import torch

    unet = pipe.unet
    torch.manual_seed(config.seed)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=ADAPTER)
    unet.set_adapter(ADAPTER)
    # a pipeline that has served LoRAs leaves them disabled between calls (`disable_lora`), and that switch holds
    # for every adapter, a new one too: without this the adapter trains nothing (no gradient reaches it)
    unet.enable_adapters()
    unet.requires_grad_(False)
    params = []
    for name, p in unet.named_parameters():
        if "lora_" in name and ADAPTER in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_state_dict(pipe) -> dict:
    """The trained adapter in diffusers' LoRA format (keys `unet.*`), ready for `load_lora_weights`."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER))
    return {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()}


class DiversityWatch:
    """The LoRA's images against vanilla's, same prompt and seeds (`DPOConfig`'s diversity watch)."""

    def __init__(self, t2i: "LoadedT2I", db: "ConceptDB", prompt: str, config: DPOConfig, params: list):
        self.t2i, self.db, self.prompt, self.config, self.params = t2i, db, prompt, config, params
        self.size = config.resolution or _size(t2i.pipeline)
        self.vanilla = 0.0
        self.kept: list | None = None  # the LoRA's weights at the last check that kept the floor

    def sample(self) -> list:
        import torch

        pipe = self.t2i.pipeline
        kwargs: dict[str, Any] = {}
        # an IP-Adapter is loaded: a neutral image prompt for both halves of classifier-free guidance (scale 0)
        neutral = neutral_image_embeds(pipe, 2, self.t2i.device, pipe.unet.dtype)
        if neutral is not None:
            kwargs["ip_adapter_image_embeds"] = neutral
        n = self.config.diversity_images
        before = getattr(pipe, "_progress_bar_config", None)
        pipe.set_progress_bar_config(disable=True)
        training = pipe.unet.training
        pipe.unet.eval()
        try:
            with torch.no_grad():  # one image at a time: training's memory plus one sample's, as in generation
                return [pipe(self.prompt, num_inference_steps=self.config.diversity_steps,
                             generator=torch.Generator("cpu").manual_seed(i), height=self.size, width=self.size,
                             **kwargs).images[0] for i in range(n)]
        finally:
            pipe.unet.train(training)
            if before is None:
                del pipe._progress_bar_config
            else:
                pipe._progress_bar_config = before

    def diversity(self) -> float:
        from mmpersona.diversity import diversity

        return diversity(self.db.embedder.embed_images(self.sample()))

    def start(self) -> None:
        unet = self.t2i.pipeline.unet
        unet.disable_adapters()
        try:
            self.vanilla = self.diversity()
        finally:
            unet.enable_adapters()
        self.keep()

    def keep(self) -> None:
        self.kept = [p.detach().clone() for p in self.params]

    def check(self, step: int, result: "DPOResult") -> bool:
        """Measure; True when training should stop (the floor broken under "stop": the kept weights are back)."""
        ratio = self.diversity() / self.vanilla if self.vanilla > 0 else 1.0
        ok = ratio >= self.config.diversity_floor
        result.diversity.append({"step": step, "ratio": round(ratio, 4), "kept_floor": ok})
        if ok:
            self.keep()
            return False
        message = (f"the LoRA's images are {ratio:.2f} x as diverse as vanilla's at step {step}, under the floor of "
                   f"{self.config.diversity_floor}")
        if self.config.diversity_action == "warn":
            logger.warning("%s", message)
            result.warnings.append(message)
            return False
        for p, kept in zip(self.params, self.kept or [], strict=True):
            p.data.copy_(kept)
        result.diversity_stopped = True
        result.warnings.append(f"{message}: stopped, with the LoRA of the last check that kept it")
        return True


def train_dpo_lora(t2i: "LoadedT2I", db: "ConceptDB", user: str, config: DPOConfig | None = None, *,
                   progress: bool = True, save: bool = True) -> DPOResult:
    """Train the user's LoRA on their pairs and store it; the pipeline is left as it was."""
    import torch
    from accelerate import Accelerator
    from safetensors.torch import save as save_tensors
    from tqdm.auto import tqdm

    config = config or DPOConfig()
    items = prepare_pairs(t2i, db, user, config.resolution)
    pipe = t2i.pipeline
    device = t2i.device
    if pipe.unet.encoder_hid_proj is not None:
        pipe.set_ip_adapter_scale(0.0)  # train the LoRA on text conditioning alone; calls set the scale again
    params = add_lora(pipe, config)
    checkpointing = config.gradient_checkpointing and not pipe.unet.is_gradient_checkpointing
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    # the UNet stays where the pipeline put it: a non-distributed Accelerator would move it to its own device
    # (cuda:0 for --device cuda:1)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=config.mixed_precision,
                              device_placement=False)
    optimizer = torch.optim.AdamW(params, lr=config.lr)  # float32 parameters, float32 state
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    scheduler = noise_scheduler(pipe)
    rng = random.Random(config.seed)
    gen = torch.Generator("cpu").manual_seed(config.seed)
    result = DPOResult(0, pairs=len(items))
    best, stale, window = float("inf"), 0, []
    start = time.perf_counter()
    watch = None
    try:
        if config.diversity_floor > 0:
            from mmpersona.preferences import PreferenceProfile

            watch = DiversityWatch(t2i, db, PreferenceProfile(db, user).events("pair")[-1].prompt, config, params)
            watch.start()
        unet.train()
        for step in tqdm(range(config.steps), desc=f"DPO LoRA for {user}", disable=not progress, unit="step"):
            item = items[rng.randrange(len(items))]
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen).to(device)
            noise = torch.randn(item["latents"][:1].shape, generator=gen).to(device, item["latents"].dtype)
            loss = dpo_loss(pipe, item, config.beta, t, noise, scheduler)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise MmpersonaError(f"DPO training diverged: the loss became {value} at step {step + 1} with the "
                                     f"UNet in {str(pipe.unet.dtype).removeprefix('torch.')}; the LoRA is float32 "
                                     "already, so try `--dtype float32` or a smaller --beta")
            result.losses.append(value)
            result.steps = step + 1
            if watch is not None and result.steps % config.diversity_every == 0 and watch.check(result.steps, result):
                break
            window.append(result.losses[-1])
            if (step + 1) % config.eval_every == 0:
                avg = sum(window) / len(window)
                window.clear()
                if avg < best - 1e-4:
                    best, stale = avg, 0
                else:
                    stale += 1
                    if stale >= config.patience:
                        result.stopped_early = True
                        break
        if (watch is not None and not result.diversity_stopped and result.steps
                and (not result.diversity or result.diversity[-1]["step"] != result.steps)):
            watch.check(result.steps, result)  # the weights kept are checked too
        unet.eval()
        if save:
            state = lora_state_dict(pipe)
            db.store.put_blob(user, LORA_BLOB, save_tensors(state), model=t2i.spec.id)
    finally:
        pipe.unet.delete_adapters(ADAPTER)
        if getattr(pipe.unet, "peft_config", None):  # served LoRAs stay off until a call names them
            pipe.unet.disable_adapters()
        pipe.unet.requires_grad_(False)
        pipe.unet.eval()
        if checkpointing:
            pipe.unet.disable_gradient_checkpointing()
    result.seconds = time.perf_counter() - start
    return result
