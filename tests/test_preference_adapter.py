"""The preference adapter (user embedding -> condition tokens), its multi-user DPO training, and the `preference` and
`viper` strategies, on the trained tiny SD (and the tiny SDXL for the pooled path). The planted-signal targets are
measured by benchmarks/preference_adapter.py; these tests prove the mechanics and the contracts."""

import io
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpersona import ConceptDB, MmpersonaError
from mmpersona.errors import ModelUnavailableError
from mmpersona.models import synthetic
from mmpersona.preferences import PreferenceProfile
from mmpersona.user_embedding import interpolate, user_embedding
from pipelines import PersonalizedT2IPipeline
from pipelines.adapter_training import (AdapterTrainConfig, PairRow, read_pickapic, rows_from_db, split_users,
                                        train_adapter)
from pipelines.preference_adapter import CONFIG, WEIGHTS, AdapterConfig, PreferenceAdapter, resolve


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ the user embedding


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_user_embedding_is_order_invariant_and_fixed_size(n, seed):
    rng = np.random.default_rng(seed)
    chosen, rejected = rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=(n, 8)).astype(np.float32)
    liked, disliked = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(2, 8)).astype(np.float32)
    u = user_embedding(chosen, rejected, liked=liked, disliked=disliked)
    order = rng.permutation(n)
    v = user_embedding(chosen[order], rejected[order], liked=liked[::-1], disliked=disliked[::-1])
    assert u.shape == (8,) and abs(float(np.linalg.norm(u)) - 1) < 1e-5
    np.testing.assert_allclose(u, v, atol=1e-5)
    # the pairs term points from rejected to chosen
    only_pairs = user_embedding(chosen, rejected)
    assert float(only_pairs @ (chosen - rejected).mean(0)) > 0


def test_user_embedding_needs_a_signal_and_matching_shapes():
    assert user_embedding(np.zeros((0, 4)), np.zeros((0, 4))) is None
    assert user_embedding(np.zeros((0, 4)), np.zeros((0, 4)), liked=np.ones((2, 4))) is None  # likes alone: no contrast
    same = np.ones((2, 4), np.float32)
    assert user_embedding(same, same) is None  # the choices cancel out
    with pytest.raises(MmpersonaError, match="2 chosen but 1 rejected"):
        user_embedding(np.ones((2, 4)), np.ones((1, 4)))
    with pytest.raises(MmpersonaError, match="different dimensions"):
        user_embedding(np.ones((1, 4)), np.zeros((1, 4)), liked=np.ones((1, 3)), disliked=np.zeros((1, 3)))


def test_interpolation_runs_between_two_users_on_the_sphere():
    a, b = np.array([1.0, 0, 0], np.float32), np.array([0, 1.0, 0], np.float32)
    np.testing.assert_allclose(interpolate(a, b, 0), a, atol=1e-6)
    np.testing.assert_allclose(interpolate(a, b, 1), b, atol=1e-6)
    mid = interpolate(a, b, 0.5)
    assert abs(float(np.linalg.norm(mid)) - 1) < 1e-6 and abs(mid[0] - mid[1]) < 1e-6
    with pytest.raises(MmpersonaError):
        interpolate(a, b, 1.5)


def test_the_profile_keeps_its_embedding_and_refreshes_it_when_it_changes(tmp_path, tiny_embedder, monkeypatch):
    rng = random.Random(0)
    user = synthetic.PlantedUser("alice", 0.0)
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        profile = PreferenceProfile(db, "alice")
        assert profile.user_embedding() is None
        for a, b in user.pairs(rng, 3):
            profile.compare("a shape", a, b)
        first = profile.user_embedding()
        assert first.shape == (tiny_embedder.dim,)
        calls = []
        monkeypatch.setattr(tiny_embedder, "embed_images", lambda *a, **k: calls.append(1) or 1 / 0)
        again = PreferenceProfile(db, "alice").user_embedding()  # a new profile object reads the stored vector
        np.testing.assert_array_equal(first, again)
        assert not calls
        monkeypatch.undo()
        profile.like(user.pairs(rng, 1)[0][0], comment="warm red")
        profile.dislike(user.pairs(rng, 1)[0][1], comment="cold blue")
        changed = profile.user_embedding()
        assert not np.allclose(first, changed)
        assert PreferenceProfile(db, "bob").user_embedding() is None  # another user's data is not theirs
        profile.reset()
        assert profile.user_embedding() is None


# ------------------------------------------------------------------------------------------ the adapter files



def test_adapter_round_trips_through_safetensors_and_json(tmp_path, trained, tiny_embedder):
    adapter = PreferenceAdapter.for_pipeline(trained, tiny_embedder, tokens=3, hidden=16)
    assert adapter.config.cross_attention_dim == trained.pipeline.unet.config.cross_attention_dim
    assert adapter.config.pooled_dim is None and adapter.config.embedder == tiny_embedder.name
    folder = adapter.save(tmp_path / "a")
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, CONFIG])
    loaded = PreferenceAdapter.load(folder)
    u = np.random.default_rng(0).normal(size=tiny_embedder.dim).astype(np.float32)
    with torch.no_grad():
        torch.testing.assert_close(adapter.tokens(u)[0], loaded.tokens(u)[0])
    assert loaded.tokens(u)[0].shape == (1, 3, adapter.config.cross_attention_dim)
    assert PreferenceAdapter.load(folder / WEIGHTS).config == adapter.config  # the weights file's path works too
    with pytest.raises(MmpersonaError, match="must have 32 values"):
        loaded.tokens(np.zeros(5))


def test_bad_adapter_files_give_clear_errors(tmp_path, trained, tiny_embedder):
    folder = PreferenceAdapter.for_pipeline(trained, tiny_embedder, hidden=16).save(tmp_path / "a")
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "tokens": 5}))
    with pytest.raises(MmpersonaError, match="does not match"):
        PreferenceAdapter.load(folder)
    for bad, message in ((b"{not json", "JSON"), (json.dumps({**config, "extra": 1}).encode(), "unknown fields"),
                         (json.dumps({**config, "tokens": "4"}).encode(), "tokens must be an integer"),
                         (json.dumps({**config, "format": 9}).encode(), "format 9")):
        (folder / CONFIG).write_bytes(bad)
        with pytest.raises(MmpersonaError, match=message):
            PreferenceAdapter.load(folder)
    (folder / CONFIG).write_text(json.dumps(config))
    (folder / WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(MmpersonaError, match="not a readable safetensors"):
        PreferenceAdapter.load(folder)
    with pytest.raises(ModelUnavailableError, match="preference_adapter.*no-such-org/adapter"):
        resolve("no-such-org/adapter")  # HF_HUB_OFFLINE in the tests: fails at once, naming the id
    with pytest.raises(ModelUnavailableError, match="neither an existing folder"):
        resolve(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="has no preference_adapter.safetensors"):
        resolve(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ training data


def test_pickapic_rows_are_read_and_ties_skipped(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(0)
    a, b, c = (png(synthetic.sample(rng, 32)[0]) for _ in range(3))
    table = pa.table({"caption": ["x", "y", "z"], "jpg_0": [a, b, c], "jpg_1": [b, c, a],
                      "label_0": [1.0, 0.0, 0.5], "user_id": [7, 7, 8], "extra": [1, 2, 3]})
    pq.write_table(table, tmp_path / "train.parquet")
    rows = read_pickapic([tmp_path / "train.parquet"])
    assert rows == [PairRow("pickapic:7", "x", a, b), PairRow("pickapic:7", "y", c, b)]
    assert len(read_pickapic([tmp_path / "train.parquet"], limit=1)) == 1
    pq.write_table(table.drop(["label_0"]), tmp_path / "bad.parquet")
    with pytest.raises(MmpersonaError, match="lacks Pick-a-Pic's columns \\['label_0'\\]"):
        read_pickapic([tmp_path / "bad.parquet"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(MmpersonaError, match="not a readable parquet file"):
        read_pickapic([tmp_path / "junk.parquet"])


def test_held_out_users_are_the_same_every_run():
    users = [f"u{i}" for i in range(20)]
    train, held = split_users(users, 0.2)
    assert len(held) == 4 and not set(train) & set(held) and sorted(train + held) == sorted(users)
    assert split_users(reversed(users), 0.2) == (train, held)
    assert split_users(users, 0.0) == (sorted(users), [])


def planted_rows(n_users, pairs, seed=0, prefix="u"):
    rng = random.Random(seed)
    rows = []
    for user in synthetic.planted_users(prefix, n_users, rng):
        rows += [PairRow(user.name, synthetic.GENERIC_PROMPT, png(a), png(b)) for a, b in user.pairs(rng, pairs)]
    return rows


SMALL = dict(hidden=32, batch_size=4, gradient_accumulation=1, context=2, heldout_users=0.25, checkpoint_every=3,
             eval_draws=2)


def test_training_saves_an_adapter_that_loads_and_resumes_exactly(tmp_path, trained, tiny_embedder):
    rows = planted_rows(4, 4)
    straight = train_adapter(trained, tiny_embedder, rows, tmp_path / "straight",
                             AdapterTrainConfig(steps=6, **SMALL), progress=False)
    assert straight.steps == 6 and len(straight.losses) == 6 and straight.train_users == 3
    assert straight.heldout_users and 0.0 <= straight.heldout_pair_accuracy <= 1.0
    info = json.loads((tmp_path / "straight" / "training.json").read_text())
    assert info["heldout"] == straight.heldout_users and info["model"] == "tiny:sd-trained"
    # stopped after 3 steps, then resumed to 6: the same adapter as one run of 6
    train_adapter(trained, tiny_embedder, rows, tmp_path / "resumed", AdapterTrainConfig(steps=3, **SMALL),
                  progress=False)
    resumed = train_adapter(trained, tiny_embedder, rows, tmp_path / "resumed",
                            AdapterTrainConfig(steps=6, **SMALL), progress=False)
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses
    a = PreferenceAdapter.load(tmp_path / "straight").module.state_dict()
    b = PreferenceAdapter.load(tmp_path / "resumed").module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    untrained = PreferenceAdapter.for_pipeline(trained, tiny_embedder, hidden=32).module.state_dict()
    assert any(not torch.equal(a[k], untrained[k]) for k in a)  # it learned something
    with pytest.raises(MmpersonaError, match="different run"):
        train_adapter(trained, tiny_embedder, planted_rows(4, 4, seed=1), tmp_path / "resumed",
                      AdapterTrainConfig(steps=7, **SMALL), progress=False)
    with pytest.raises(MmpersonaError, match="at least 2 users"):
        train_adapter(trained, tiny_embedder, rows[:4], tmp_path / "one", AdapterTrainConfig(steps=1, **SMALL),
                      progress=False)


def test_the_adapter_trains_in_float32_beside_a_half_precision_unet(tmp_path, tiny_cache, tiny_embedder):
    from mmpersona.models import load_t2i

    t2i = load_t2i("tiny:sd-trained", device="cpu", dtype="bfloat16", ip_adapter=False)
    result = train_adapter(t2i, tiny_embedder, planted_rows(3, 3), tmp_path / "bf16",
                           AdapterTrainConfig(steps=2, gradient_checkpointing=True, **SMALL), progress=False)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    state = PreferenceAdapter.load(tmp_path / "bf16").module.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert not t2i.pipeline.unet.is_gradient_checkpointing  # put back as it was


def test_the_adapter_trains_beside_a_loaded_ip_adapter(tmp_path, tiny_cache, tiny_embedder):
    """A UNet with an IP-Adapter demands an image prompt on every call: training gives it the neutral one."""
    from mmpersona.models import load_t2i

    t2i = load_t2i(role="t2i", preset="tiny", device="cpu", ip_adapter=True)
    assert t2i.pipeline.unet.encoder_hid_proj is not None
    result = train_adapter(t2i, tiny_embedder, planted_rows(3, 3), tmp_path / "ip",
                           AdapterTrainConfig(steps=2, **SMALL), progress=False)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    assert 0.0 <= result.heldout_pair_accuracy <= 1.0


# ------------------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, trained, tiny_embedder):
    out = tmp_path_factory.mktemp("adapter")
    train_adapter(trained, tiny_embedder, planted_rows(4, 4), out, AdapterTrainConfig(steps=4, **SMALL),
                  progress=False)
    return out


@pytest.fixture
def profiles(tmp_path, tiny_embedder):
    rng = random.Random(5)
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        for user in (synthetic.PlantedUser("alice", 0.0), synthetic.PlantedUser("bob", 0.6)):
            profile = PreferenceProfile(db, user.name)
            for a, b in user.pairs(rng, 4):
                profile.compare(synthetic.GENERIC_PROMPT, a, b)
        yield db


def unet_calls(pipe):
    calls = []
    handle = pipe.diffusers.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_preference_strategy_is_one_unet_pass_per_step_and_steers(profiles, trained, adapter_dir):
    pipe = PersonalizedT2IPipeline(profiles, t2i=trained, strategies=[], adapter=str(adapter_dir))
    calls, handle = unet_calls(pipe)
    try:
        vanilla = pipe(synthetic.GENERIC_PROMPT, user="alice", steps=4, strategies=[])
        plain_calls = list(calls)
        calls.clear()
        mine = pipe(synthetic.GENERIC_PROMPT, user="alice", steps=4, strategies=["preference"])
    finally:
        handle.remove()
    assert calls == plain_calls and set(calls) == {2}  # as many UNet passes as vanilla, guidance batched in each
    assert mine.metadata[0]["notes"]["preference"] == {"adapter": str(adapter_dir), "tokens": 4, "scale": 1.0,
                                                       "embedding": "the user's own"}
    assert not np.array_equal(np.asarray(vanilla.images[0]), np.asarray(mine.images[0]))
    bob = pipe(synthetic.GENERIC_PROMPT, user="bob", steps=4, strategies=["preference"])
    assert not np.array_equal(np.asarray(bob.images[0]), np.asarray(mine.images[0]))  # each user their own
    again = pipe(synthetic.GENERIC_PROMPT, user="alice", steps=4, strategies=["preference"])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(mine.images[0]))  # bob changed nothing of alice's
    # composes with the text and reranking strategies in the same single call
    both = pipe(synthetic.GENERIC_PROMPT, user="alice", steps=2, strategies=["attributes", "preference", "rerank"])
    assert set(both.metadata[0]["notes"]) == {"attributes", "preference", "rerank"}
    newcomer = pipe(synthetic.GENERIC_PROMPT, user="carol", steps=2, strategies=["preference"])
    assert "skipped" in newcomer.metadata[0]["notes"]["preference"]


def test_interpolating_two_users_embeddings(profiles, trained, adapter_dir):
    from pipelines.t2i import PreferenceConfig

    alice = PreferenceProfile(profiles, "alice").user_embedding()
    bob = PreferenceProfile(profiles, "bob").user_embedding()

    def image(t):
        pipe = PersonalizedT2IPipeline(profiles, t2i=trained, adapter=str(adapter_dir), strategies=["preference"],
                                       configs={"preference": PreferenceConfig(embedding=interpolate(alice, bob, t))})
        return np.asarray(pipe(synthetic.GENERIC_PROMPT, user="anyone", steps=4).images[0], np.float32)

    own = PersonalizedT2IPipeline(profiles, t2i=trained, adapter=str(adapter_dir), strategies=["preference"])
    as_alice = np.asarray(own(synthetic.GENERIC_PROMPT, user="alice", steps=4).images[0], np.float32)
    start, middle, end = image(0.0), image(0.5), image(1.0)
    np.testing.assert_allclose(start, as_alice, atol=1)  # t=0 is alice's own embedding
    assert not np.array_equal(start, end)
    assert 0 < np.abs(middle - start).mean() and 0 < np.abs(middle - end).mean()


def test_preference_errors_are_clear(profiles, trained, tiny_cache, tmp_path, tiny_embedder):
    pipe = PersonalizedT2IPipeline(profiles, t2i=trained, strategies=[])
    with pytest.raises(MmpersonaError, match="needs a trained preference adapter"):
        pipe(synthetic.GENERIC_PROMPT, user="alice", steps=1, strategies=["preference"])
    from mmpersona.models import load_t2i

    xl = load_t2i("tiny:sdxl", role="t2i_xl", device="cpu", ip_adapter=False)
    folder = PreferenceAdapter.for_pipeline(xl, tiny_embedder, hidden=16).save(tmp_path / "xl")
    wrong = PersonalizedT2IPipeline(profiles, t2i=trained, strategies=[], adapter=str(folder))
    with pytest.raises(MmpersonaError, match="trained for 'tiny:sdxl'"):
        wrong(synthetic.GENERIC_PROMPT, user="alice", steps=1, strategies=["preference"])


def test_sdxl_takes_tokens_and_a_pooled_shift(profiles, tiny_cache, tmp_path):
    from mmpersona.models import load_t2i

    xl = load_t2i("tiny:sdxl", role="t2i_xl", device="cpu", ip_adapter=False)
    rows = rows_from_db(profiles) + planted_rows(2, 4, prefix="x")
    result = train_adapter(xl, profiles.embedder, rows, tmp_path / "xl", AdapterTrainConfig(steps=2, **SMALL),
                           progress=False)
    adapter = PreferenceAdapter.load(tmp_path / "xl")
    assert result.steps == 2 and adapter.config.pooled_dim == xl.pipeline.text_encoder_2.config.projection_dim
    with torch.no_grad():
        adapter.module.to_pooled.bias.fill_(0.5)  # a visible pooled shift
    pipe = PersonalizedT2IPipeline(profiles, t2i=xl, role="t2i_xl", strategies=[], adapter=adapter)
    text = pipe.embeddings(pipe.condition("a shape", "alice", pipe._strategies(["preference"]))[0], True)
    assert text["prompt_embeds"].shape[1] == 77 + adapter.config.tokens
    assert text["negative_prompt_embeds"].shape == text["prompt_embeds"].shape
    assert text["pooled_prompt_embeds"].shape == (1, adapter.config.pooled_dim)
    out = pipe("a shape", user="alice", steps=2, strategies=["preference"])
    assert out.images[0].size == (64, 64)
    assert out.metadata[0]["notes"]["preference"]["adapter"] == str(tmp_path / "xl")  # where it came from


def test_viper_arithmetic_is_one_pass_and_beta_zero_is_vanilla(profiles, trained):
    from pipelines.preference_adapter import encode
    from pipelines.t2i import ViperConfig

    PreferenceProfile(profiles, "alice").set_attributes(liked=["bright red"], disliked=["dark blue"])
    pipe = PersonalizedT2IPipeline(profiles, t2i=trained, strategies=[],
                                   configs={"viper": ViperConfig(beta=0.5)})
    cond, _ = pipe.condition("a shape", "alice", pipe._strategies(["viper"]))
    got = pipe.embeddings(cond, True)
    e = encode(trained, ["a shape", "bright red", "dark blue"], None, cfg=False)[0]
    torch.testing.assert_close(got["prompt_embeds"], e[:1] + 0.5 * (e[1:2] - e[2:3]))
    split = PersonalizedT2IPipeline(profiles, t2i=trained, strategies=[],
                                    configs={"viper": ViperConfig(beta=0.5, split=True)})
    cond, _ = split.condition("a shape", "alice", split._strategies(["viper"]))
    got = split.embeddings(cond, True)
    neg = encode(trained, [""], None, cfg=False)[0]
    torch.testing.assert_close(got["prompt_embeds"], e[:1] + 0.5 * e[1:2])
    torch.testing.assert_close(got["negative_prompt_embeds"], neg + 0.5 * e[2:3])
    calls, handle = unet_calls(pipe)
    try:
        vanilla = pipe("a shape", user="alice", steps=3, strategies=[])
        plain_calls = list(calls)
        calls.clear()
        steered = pipe("a shape", user="alice", steps=3, strategies=["viper"])
    finally:
        handle.remove()
    assert calls == plain_calls and set(calls) == {2}
    zero = PersonalizedT2IPipeline(profiles, t2i=trained, strategies=[], configs={"viper": ViperConfig(beta=0.0)})
    same = zero("a shape", user="alice", steps=3, strategies=["viper"])
    np.testing.assert_array_equal(np.asarray(same.images[0]), np.asarray(vanilla.images[0]))
    assert not np.array_equal(np.asarray(steered.images[0]), np.asarray(vanilla.images[0]))
    assert "skipped" in pipe("a shape", user="bob", steps=1, strategies=["viper"]).metadata[0]["notes"]["viper"]


def test_cli_trains_an_adapter_and_generates_with_it(tmp_path, profiles, tiny_cache):
    from typer.testing import CliRunner

    from mmpersona.cli import app

    db_path = str(tmp_path / "c.db")
    profiles.close()
    runner = CliRunner()
    base = ["--preset", "tiny", "--db", db_path, "--model", "t2i=tiny:sd-trained", "--json"]
    out = tmp_path / "adapter"
    result = runner.invoke(app, base + ["adapter", "train", "--out", str(out), "--steps", "3", "--batch-size", "2",
                                        "--gradient-accumulation", "1", "--context", "2", "--heldout", "0.5"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["steps"] == 3 and data["train_users"] == 1 and data["heldout_users"] == 1
    assert (out / WEIGHTS).is_file() and (out / CONFIG).is_file()
    result = runner.invoke(app, base + ["--user", "alice", "generate", "--prompt", "a shape", "--out",
                                        str(tmp_path / "img"), "--steps", "2", "--strategies", "preference",
                                        "--adapter", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads(next((tmp_path / "img").rglob("*.json")).read_text())
    assert sidecar["notes"]["preference"]["tokens"] == AdapterConfig.__dataclass_fields__["tokens"].default


def test_training_and_generation_run_where_the_pipeline_is(tmp_path, profiles, tiny_cache, tiny_embedder):
    """On a second device (see fake_device.py): latents, noise, timesteps, the adapter and its tokens follow the
    pipeline, and the results are those of the CPU."""
    from fake_device import fake_device, on_fake_device

    from mmpersona.models import load_t2i

    rows = planted_rows(4, 4)
    config = AdapterTrainConfig(steps=2, **SMALL)
    cpu = load_t2i("tiny:sd-trained", device="cpu", ip_adapter=False)
    expected = train_adapter(cpu, tiny_embedder, rows, tmp_path / "cpu", config, progress=False)
    plain = PersonalizedT2IPipeline(profiles, t2i=cpu, adapter=str(tmp_path / "cpu"), strategies=["preference"])
    want = np.asarray(plain(synthetic.GENERIC_PROMPT, user="alice", steps=2).images[0], dtype=int)
    t2i = load_t2i("tiny:sd-trained", device="cpu", ip_adapter=False)
    with fake_device() as dev:
        t2i.pipeline.to(dev)
        result = train_adapter(t2i, tiny_embedder, rows, tmp_path / "dev", config, progress=False)
        assert all(on_fake_device(p) for p in t2i.pipeline.unet.parameters())
        pipe = PersonalizedT2IPipeline(profiles, t2i=t2i, adapter=str(tmp_path / "dev"), strategies=["preference"])
        got = np.asarray(pipe(synthetic.GENERIC_PROMPT, user="alice", steps=2).images[0], dtype=int)
        assert all(on_fake_device(p) for p in pipe.preference_adapter().module.parameters())
    assert result.losses == pytest.approx(expected.losses, abs=1e-3)
    assert result.heldout_pair_accuracy == expected.heldout_pair_accuracy
    assert np.abs(got - want).max() <= 1
