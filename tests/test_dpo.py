"""Diffusion-DPO LoRA on the tiny SD and SDXL pipelines."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmpersona import ConceptDB, MmpersonaError
from mmpersona.preferences import PreferenceProfile
from pipelines import PersonalizedT2IPipeline
from pipelines.dpo import ADAPTER, DPOConfig, add_lora, dpo_loss, prepare_pairs, train_dpo_lora


def drawn(color, kind="ellipse"):
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    getattr(ImageDraw.Draw(img), kind)((8, 8, 56, 56), fill=color)
    return img


@pytest.fixture
def db(tmp_path, tiny_embedder):
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as database:
        profile = PreferenceProfile(database, "alice")
        for i in range(3):
            profile.compare("a ball", drawn((230, 60 + 30 * i, 20)), drawn((20, 60 + 30 * i, 230), "rectangle"))
        yield database


@pytest.mark.parametrize("role", ["t2i", "t2i_xl"])
def test_one_step_changes_only_lora_and_lowers_the_loss(db, tiny_cache, role):
    from mmpersona.models import load_t2i

    t2i = load_t2i(role=role, preset="tiny", device="cpu", ip_adapter=False)
    pipe = t2i.pipeline
    item = prepare_pairs(t2i, db, "alice")[0]
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    params = add_lora(pipe, DPOConfig(rank=4))
    t = torch.tensor([500])
    noise = torch.randn(item["latents"][:1].shape, generator=torch.Generator().manual_seed(0))
    loss0 = dpo_loss(pipe, item, 2000.0, t, noise)
    lora_before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    loss0.backward()
    optimizer.step()
    with torch.no_grad():
        loss1 = dpo_loss(pipe, item, 2000.0, t, noise)
    assert float(loss1) < float(loss0.detach())
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, params, strict=True))
    after = pipe.unet.state_dict()
    for key, old in before.items():  # base weights keep their names inside peft's wrapper
        new_key = key if key in after else key.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(after[new_key], old), key
    pipe.unet.delete_adapters(ADAPTER)


def test_train_store_and_serve_by_adapter_name(db, tiny_cache):
    pipe = PersonalizedT2IPipeline(db, preset="tiny", device="cpu")
    result = train_dpo_lora(pipe.t2i, db, "alice", DPOConfig(steps=6, eval_every=3, lr=1e-3), progress=False)
    assert result.steps <= 6 and result.pairs == 3 and len(result.losses) == result.steps
    assert db.store.get_blob("alice", "dpo_lora")[1] == "tiny:sd"
    assert not any("lora" in n for n, _ in pipe.diffusers.unet.named_parameters())  # training left no adapter
    plain = pipe("a ball", user="alice", steps=2, strategies=[]).images[0]
    steered = pipe("a ball", user="alice", steps=2, strategies=["lora"])
    assert steered.metadata[0]["notes"]["lora"]["weight"] == 1.0
    assert not np.array_equal(np.asarray(plain), np.asarray(steered.images[0]))
    again = pipe("a ball", user="alice", steps=2, strategies=[]).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(again))  # the LoRA is off when not asked for
    steered_again = pipe("a ball", user="alice", steps=2, strategies=["lora"]).images[0]
    assert np.array_equal(np.asarray(steered.images[0]), np.asarray(steered_again))  # and on again when asked
    with pytest.raises(MmpersonaError, match="no pairwise choices"):
        train_dpo_lora(pipe.t2i, db, "bob", DPOConfig(steps=1), progress=False)


def test_a_second_user_trains_after_the_pipeline_served_a_lora(db, tiny_cache):
    """Serving LoRAs leaves them disabled between calls; that switch held for a new adapter too, so a second
    user's LoRA got no gradient at all (found on the trained tiny preset)."""
    pipe = PersonalizedT2IPipeline(db, preset="tiny", device="cpu")
    train_dpo_lora(pipe.t2i, db, "alice", DPOConfig(steps=2, lr=1e-2), progress=False)
    alice = pipe("a ball", user="alice", steps=2, strategies=["lora"]).images[0]
    pipe("a ball", user="alice", steps=2, strategies=[])  # the LoRA is now disabled
    profile = PreferenceProfile(db, "bob")
    profile.compare("a ball", drawn((20, 200, 20)), drawn((200, 20, 200), "rectangle"))
    result = train_dpo_lora(pipe.t2i, db, "bob", DPOConfig(steps=3, lr=1e-2, patience=10), progress=False)
    assert result.losses[-1] != result.losses[0]  # it learned
    bob = pipe("a ball", user="bob", steps=2, strategies=["lora"]).images[0]
    assert not np.array_equal(np.asarray(alice), np.asarray(bob))
    # a second pipeline over the same model loads its LoRAs under names of its own
    other = PersonalizedT2IPipeline(db, t2i=pipe.t2i)
    again = other("a ball", user="alice", steps=2, strategies=["lora"]).images[0]
    assert np.array_equal(np.asarray(alice), np.asarray(again))
    # a retrained LoRA is served afresh, not the one loaded before
    train_dpo_lora(pipe.t2i, db, "alice", DPOConfig(steps=2, lr=5e-2, seed=3), progress=False)
    retrained = pipe("a ball", user="alice", steps=2, strategies=["lora"]).images[0]
    assert not np.array_equal(np.asarray(alice), np.asarray(retrained))


def test_training_noise_is_ddpm_even_after_sdxl_generated(db, tiny_cache):
    """SDXL samples with Euler, whose add_noise returns x + sigma * noise and, once a generation has set its
    begin_index, noises every timestep with the last step's sigma (0). Training noise is DDPM's."""
    from diffusers import DDPMScheduler

    from mmpersona.models import load_t2i

    t2i = load_t2i(role="t2i_xl", preset="tiny", device="cpu", ip_adapter=False)
    pipe = t2i.pipeline
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # as the real SDXL base ships
    pipe.set_progress_bar_config(disable=True)
    pipe("a ball", num_inference_steps=2, output_type="latent")  # leaves Euler's begin_index set
    item = prepare_pairs(t2i, db, "alice")[0]
    add_lora(pipe, DPOConfig(rank=2))
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].clone()),
                                               with_kwargs=True)
    t = torch.tensor([500])
    noise = torch.randn(item["latents"][:1].shape, generator=torch.Generator().manual_seed(0))
    try:
        dpo_loss(pipe, item, 2000.0, t, noise)
    finally:
        hook.remove()
        pipe.unet.delete_adapters(ADAPTER)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    alpha = ddpm.alphas_cumprod[500]
    expected = alpha.sqrt() * item["latents"] + (1 - alpha).sqrt() * noise.expand_as(item["latents"])
    torch.testing.assert_close(seen[0], expected)
    assert float((seen[0] - item["latents"]).abs().mean()) > 0.1  # there is noise at all


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lora_trains_in_float32_in_a_half_precision_unet(db, tiny_cache, dtype):
    """peft makes LoRA weights in the UNet's dtype: in bf16 a 1e-4 step rounds away, in fp16 AdamW's eps
    (1e-8) is 0 and the LoRA-A weights, whose first gradient is 0 (B starts at 0), become 0/0 = NaN."""
    from safetensors.torch import load

    from mmpersona.models import load_t2i

    t2i = load_t2i(role="t2i", preset="tiny", device="cpu", dtype=dtype, ip_adapter=False)
    assert t2i.pipeline.unet.dtype == getattr(torch, dtype)
    params = add_lora(t2i.pipeline, DPOConfig(rank=2))
    assert params and all(p.dtype == torch.float32 for p in params)
    t2i.pipeline.unet.delete_adapters(ADAPTER)
    encoded = []  # training images go through the VAE in float32 (SDXL's VAE overflows in fp16)
    hook = t2i.pipeline.vae.encoder.register_forward_pre_hook(lambda m, args: encoded.append(args[0].dtype))
    try:
        result = train_dpo_lora(t2i, db, "alice", DPOConfig(steps=3, eval_every=10, lr=1e-4), progress=False)
    finally:
        hook.remove()
    assert encoded and set(encoded) == {torch.float32} and t2i.pipeline.vae.dtype == getattr(torch, dtype)
    assert all(np.isfinite(result.losses))
    state = load(db.store.get_blob("alice", "dpo_lora")[0])
    assert all(torch.isfinite(v).all() for v in state.values())
    ups = [v for k, v in state.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(float(v.abs().max()) > 0 for v in ups)  # the steps moved B away from 0
    assert t2i.pipeline.unet.dtype == getattr(torch, dtype)  # the pipeline is left as it was


@pytest.mark.parametrize("role", ["t2i", "t2i_xl"])
def test_dpo_and_generation_run_where_the_pipeline_is(db, tiny_cache, role):
    """The pipeline on a second device (see fake_device.py): latents, noise, timesteps, time ids, LoRA and
    IP-Adapter inputs follow it, and nothing moves the UNet away (accelerate's placement moved it to device 0)."""
    from fake_device import fake_device, on_fake_device

    from mmpersona.models import load_t2i

    config = DPOConfig(steps=2, eval_every=10, lr=1e-3)
    expected = train_dpo_lora(load_t2i(role=role, preset="tiny", device="cpu"), db, "alice", config,
                              progress=False, save=False)
    t2i = load_t2i(role=role, preset="tiny", device="cpu")
    pipe = PersonalizedT2IPipeline(db, t2i=t2i)
    plain = pipe("a ball", user="alice", steps=2, strategies=["ip_adapter", "attributes"]).images[0]
    checkpointing = []
    with fake_device() as dev:
        t2i.pipeline.to(dev)
        assert t2i.device == dev
        hook = t2i.pipeline.unet.register_forward_hook(
            lambda m, a, o: checkpointing.append(m.is_gradient_checkpointing and m.training))
        try:
            result = train_dpo_lora(t2i, db, "alice", config, progress=False)
        finally:
            hook.remove()
        assert all(on_fake_device(p) for p in t2i.pipeline.unet.parameters())
        image = pipe("a ball", user="alice", steps=2, strategies=["ip_adapter", "attributes"]).images[0]
    # beta 2000 turns float noise between kernels into ~1e-4 after a step
    assert result.losses == pytest.approx(expected.losses, abs=1e-3)
    assert any(checkpointing) and not t2i.pipeline.unet.is_gradient_checkpointing  # on while training only
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(plain, dtype=int)).max() <= 1
