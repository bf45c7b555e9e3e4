"""Population scorers beside the personal reward: PickScore's kind by hub id (a tiny double here), your own
object, the documented rule that mixes them, and reranking with one from a new user's first call."""

import numpy as np
import pytest
from PIL import Image

from mmpersona import ConceptDB, MmpersonaError, ModelUnavailableError
from mmpersona.scorers import ClipScorer, combine, load_scorer


def test_a_pickscore_double_scores_through_from_pretrained(tiny_cache):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from mmpersona.models.tiny import ensure_tiny

    scorer = load_scorer("tiny:pickscore", device="cpu")
    assert isinstance(scorer, ClipScorer) and scorer.name == "tiny:pickscore"
    images = [Image.new("RGB", (48, 40), c) for c in [(250, 0, 0), (0, 0, 250), (30, 200, 30)]]
    scores = scorer.score(images, "a red square")
    assert scores.shape == (3,) and np.isfinite(scores).all() and len(set(scores.round(6))) == 3
    assert np.array_equal(scores, scorer.score(images, "a red square"))
    # the same numbers by PickScore's published recipe, from the folder
    folder = ensure_tiny("pickscore")
    model, processor = CLIPModel.from_pretrained(str(folder)).eval(), CLIPProcessor.from_pretrained(str(folder))
    with torch.no_grad():
        inputs = processor(images=images, return_tensors="pt")
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(**processor(text=["a red square"], padding=True, return_tensors="pt"))
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
        expected = model.logit_scale.exp() * (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1,
                                                                                                   keepdim=True))[0]
    assert np.allclose(scores, expected.numpy(), atol=1e-5)
    assert scorer.score([], "x").shape == (0,)


def test_a_missing_scorer_fails_fast_naming_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="someorg/no-such-scorer"):
        load_scorer("someorg/no-such-scorer", device="cpu")
    with pytest.raises(MmpersonaError, match="score"):
        load_scorer(object())


def test_the_rule_moves_from_the_population_to_the_user():
    personal, population = [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]
    assert np.argmax(combine(None, population, 0)) == 2  # a new user: the population alone
    assert np.argmax(combine(personal, population, 0)) == 2
    assert np.argmax(combine(personal, population, 32)) == 0  # 32 choices: 80% their own
    even = combine(personal, population, 8)  # at the prior: equal weights, the two cancel
    assert np.allclose(even, 0)
    assert np.array_equal(combine(personal, None, 5), personal)
    assert np.array_equal(combine([1.0, 1.0], [5.0, 5.0], 3), [0.0, 0.0])  # no spread, no preference
    with pytest.raises(MmpersonaError, match="population scores"):
        combine([1.0], [1.0, 2.0], 3)


class Reddest:
    name = "reddest"

    def score(self, images, prompt):
        return np.array([np.asarray(im.convert("RGB"), np.float32)[..., 0].mean() for im in images])


def test_a_new_user_is_reranked_by_a_population_scorer(tmp_path, tiny_cache, tiny_embedder):
    from pipelines import PersonalizedT2IPipeline
    from pipelines.t2i import RerankConfig

    db = ConceptDB(tmp_path / "c.db", embedder=tiny_embedder)
    pipe = PersonalizedT2IPipeline(db, preset="tiny", device="cpu", strategies=["rerank"],
                                   configs={"rerank": RerankConfig(population="reddest", diversity_floor=0)})
    pipe.scorers["reddest"] = Reddest()
    out = pipe("a ball", user="newcomer", n=1, steps=2, seed=7)
    meta = out.metadata[0]
    assert meta["candidates"] == 4 and meta["notes"]["rerank"]["cold_start"] is True
    candidates = pipe("a ball", user="newcomer", n=4, steps=2, seed=7, strategies=[]).images
    reds = Reddest().score(candidates, "a ball")
    assert meta["seed"] == 7 + int(np.argmax(reds)) and meta["population_score"] == pytest.approx(reds.max())
    tiny = PersonalizedT2IPipeline(db, t2i=pipe.t2i, strategies=["rerank"],
                                   configs={"rerank": RerankConfig(population="tiny:pickscore", diversity_floor=0)})
    got = tiny("a ball", user="newcomer", n=2, steps=2, seed=7)
    assert [m["candidates"] for m in got.metadata] == [8, 8] and "population_score" in got.metadata[0]
    assert got.scores == sorted(got.scores, reverse=True)
    assert isinstance(tiny.scorers["tiny:pickscore"], ClipScorer)  # loaded once, kept
    with pytest.raises(MmpersonaError, match="population"):
        RerankConfig(population=Reddest())
    db.close()
