"""`mmpersona.personalize(pipe, user_embedding, adapter=..., scale=...)`: the preference conditioning on a plain
diffusers pipeline, with the toolkit pipeline's own images."""

import numpy as np
import pytest
import torch

import mmpersona
from mmpersona import ConceptDB, MmpersonaError, PreferenceProfile
from pipelines import PersonalizedT2IPipeline
from pipelines.preference_adapter import PreferenceAdapter
from pipelines.t2i import PreferenceConfig


@pytest.mark.parametrize("role", ["t2i", "t2i_xl"])
def test_a_plain_diffusers_pipeline_gives_the_toolkits_images(tmp_path, tiny_cache, tiny_embedder, role):
    from mmpersona.models import load_t2i

    t2i = load_t2i(role=role, preset="tiny", device="cpu", ip_adapter=False)
    db = ConceptDB(tmp_path / "c.db", embedder=tiny_embedder)
    adapter = PreferenceAdapter.for_pipeline(t2i, tiny_embedder, hidden=16)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: tokens far from the negative side's
        for p in adapter.module.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    folder = adapter.save(tmp_path / "adapter")
    u = np.random.default_rng(0).normal(size=tiny_embedder.dim).astype(np.float32)
    u /= np.linalg.norm(u)
    toolkit = PersonalizedT2IPipeline(db, t2i=t2i, strategies=[], adapter=str(folder),
                                      configs={"preference": PreferenceConfig(scale=0.7, embedding=tuple(u))})
    mine = toolkit("a red ball", user="alice", steps=3, seed=5, strategies=["preference"]).images[0]
    vanilla = toolkit("a red ball", user="alice", steps=3, seed=5, strategies=[]).images[0]
    pipe = mmpersona.personalize(t2i.pipeline, u, adapter=str(folder), scale=0.7)
    theirs = pipe("a red ball", num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(theirs), np.asarray(mine))
    assert not np.array_equal(np.asarray(theirs), np.asarray(vanilla))  # the tokens did something
    assert pipe.unet is t2i.pipeline.unet  # everything else is the pipeline's
    off = mmpersona.personalize(pipe, u, adapter=adapter, scale=0)("a red ball", num_inference_steps=3,
                                                                     generator=torch.Generator("cpu").manual_seed(5))
    assert np.array_equal(np.asarray(off.images[0]), np.asarray(vanilla))
    with pytest.raises(MmpersonaError, match="finite numbers"):
        mmpersona.personalize(t2i.pipeline, u[:3], adapter=adapter)
    with pytest.raises(MmpersonaError, match="no pairwise choices"):
        mmpersona.personalize(t2i.pipeline, PreferenceProfile(db, "nobody"), adapter=adapter)
    with pytest.raises(MmpersonaError, match="computes the prompt embeddings"):
        pipe(prompt_embeds=torch.zeros(1, 77, 32))
    with pytest.raises(MmpersonaError, match="diffusers Stable Diffusion"):
        mmpersona.personalize(object(), u, adapter=adapter)
    db.close()
