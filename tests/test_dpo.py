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
