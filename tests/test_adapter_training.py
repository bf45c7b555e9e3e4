"""Adapter training as real checkpoints need it (the issue "Real checkpoints, second pass", defects 1-5, 10, 13):
each process on its own device, defaults that fit a GPU, held-out users evaluated in chunks, the data prepared in
shares and cached, SDXL's time ids per image, the IP-Adapter scale of generation, and "off" meaning vanilla on
SDXL too. Two CPU processes under `accelerate launch` train the adapter one process trains."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmpersona import ConceptDB
from mmpersona.models import synthetic
from mmpersona.preferences import PreferenceProfile
from pipelines import PersonalizedT2IPipeline
from pipelines.adapter_training import AdapterTrainConfig, PairRow, Prepared, heldout_accuracy, train_adapter
from pipelines.preference_adapter import PreferenceAdapter, append_tokens
from test_preference_adapter import planted_rows, png  # the tests' folder is on sys.path


SMALL = dict(hidden=32, batch_size=2, gradient_accumulation=1, context=2, heldout_users=0.0, eval_draws=2)


# ------------------------------------------------------------------------------------------ defaults and devices


def test_the_defaults_fit_a_gpu_and_the_cli_has_the_same():
    """32 users per step as before, but 4 per micro-batch (8 samples kept for backward) with checkpointing: the
    old default kept 64 samples' activations, about 57 GiB for SD 1.5 at 512 px (README's table has the rest)."""
    import inspect

    from mmpersona.cli.adapter import adapter_train

    config = AdapterTrainConfig()
    assert config.batch_size * config.gradient_accumulation == 32
    assert 2 * config.batch_size <= 8 and config.gradient_checkpointing
    assert config.eval_batch_size <= 8 and config.encode_batch_size <= 4
    options = {p.name: p.default.default for p in inspect.signature(adapter_train).parameters.values()
               if hasattr(p.default, "default")}
    for name in ("batch_size", "gradient_accumulation", "gradient_checkpointing", "steps", "lr", "beta", "context"):
        assert options[name] == getattr(config, name), name


class TwoProcesses:
    """accelerate's state as process 1 of 2 on a machine with two GPUs sees it."""

    process_index, num_processes = 1, 2
    device = torch.device("cuda", 1)

    def __init__(self, cpu=False):
        pass


def test_each_process_loads_its_models_on_its_own_gpu(monkeypatch, tmp_path):
    import accelerate
    from typer.testing import CliRunner

    from mmpersona.cli import adapter as adapter_cli
    from mmpersona.cli import app
    from mmpersona.devices import process_device

    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    assert process_device("auto")[1] == torch.device("cuda", 1)
    assert process_device("cuda")[1] == torch.device("cuda", 1)
    assert process_device("cuda:0")[1] == "cuda:0"  # asked for by name: kept
    seen = []

    def opened(s):
        seen.append(s.device)
        raise SystemExit(0)

    monkeypatch.setattr(adapter_cli, "open_db", opened)
    result = CliRunner().invoke(app, ["--preset", "tiny", "--device", "cuda", "--db", str(tmp_path / "c.db"),
                                      "adapter", "train", "--out", str(tmp_path / "a")])
    assert seen == ["cuda:1"], result.output  # the CLIP embedder and the pipeline: GPU 1, not cuda (= cuda:0)


# ------------------------------------------------------------------------------------------ evaluation, data


def test_held_out_pairs_go_to_the_unet_in_chunks_with_the_same_result(trained, tiny_embedder):
    rows = planted_rows(2, 14)
    prep = Prepared(trained, tiny_embedder, rows, None, False)
    adapter = PreferenceAdapter.for_pipeline(trained, tiny_embedder, hidden=32)
    users = sorted(prep.by_user)
    batches = []
    handle = trained.pipeline.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        chunked = heldout_accuracy(prep, adapter, users, AdapterTrainConfig(**{**SMALL, "eval_batch_size": 3}))
        assert max(batches) == 2 * 3  # chosen and rejected of 3 pairs; a user has 12 to score
        batches.clear()
        whole = heldout_accuracy(prep, adapter, users, AdapterTrainConfig(**{**SMALL, "eval_batch_size": 64}))
        assert max(batches) == 2 * 12
    finally:
        handle.remove()
    assert chunked == whole


def test_data_is_prepared_once_on_the_cpu_and_read_back(tmp_path, trained, tiny_embedder, monkeypatch):
    rows = planted_rows(2, 3)
    first = Prepared(trained, tiny_embedder, rows, None, False, cache=tmp_path / "prep")
    assert first.latents.device.type == "cpu" and first.embeds.device.type == "cpu"
    vae = trained.pipeline.vae
    monkeypatch.setattr(vae, "encode", lambda *a, **k: pytest.fail("the cached latents were encoded again"))
    again = Prepared(trained, tiny_embedder, rows, None, False, cache=tmp_path / "prep")
    assert torch.equal(first.latents, again.latents) and torch.equal(first.embeds, again.embeds)
    np.testing.assert_array_equal(first.vectors, again.vectors)


def test_sdxl_time_ids_carry_each_images_size_and_crop(tiny_cache, tiny_embedder):
    from mmpersona.models import load_t2i

    xl = load_t2i("tiny:sdxl", role="t2i_xl", device="cpu", ip_adapter=False)
    rng = np.random.default_rng(0)

    def photo(w, h):
        return png(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))

    rows = [PairRow("u", "a shape", photo(96, 64), photo(40, 120)), PairRow("u", "a shape", photo(64, 64),
                                                                             photo(64, 32))]
    prep = Prepared(xl, tiny_embedder, rows, None, False)
    size = prep.size
    assert size == 64
    expected = [[64, 96, 0, 16, size, size],  # (h, w), then the crop's top-left after the short side is resized
                [120, 40, 64, 0, size, size], [64, 64, 0, 0, size, size], [32, 64, 0, 32, size, size]]
    assert prep.time_ids.tolist() == expected


def test_training_runs_at_the_ip_adapter_scale_of_generation_and_restores_it(tmp_path, tiny_cache, tiny_embedder):
    from mmpersona.models import load_t2i

    t2i = load_t2i(role="t2i", preset="tiny", device="cpu", ip_adapter=True)
    pipe = t2i.pipeline
    pipe.set_ip_adapter_scale(0.7)  # as after an `ip_adapter` or `subject` call
    processor = next(p for p in pipe.unet.attn_processors.values() if hasattr(p, "scale"))
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(list(processor.scale)))
    try:
        train_adapter(t2i, tiny_embedder, planted_rows(3, 3), tmp_path / "a",
                      AdapterTrainConfig(steps=1, **{**SMALL, "heldout_users": 0.3}), progress=False)
    finally:
        handle.remove()
    assert seen and all(s == [0.0] for s in seen)  # training and the held-out evaluation
    assert processor.scale == [0.7]


# ------------------------------------------------------------------------------------------ off means vanilla


@pytest.mark.parametrize("model", ["tiny:sd-trained", "tiny:sdxl"])
def test_viper_at_beta_0_and_preference_at_scale_0_are_vanilla(model, tmp_path, tiny_cache, tiny_embedder):
    """SDXL's `force_zeros_for_empty_prompt`: vanilla's empty negative is zeros, and the strategies' must be too."""
    from mmpersona.models import load_t2i
    from pipelines.t2i import PreferenceConfig, ViperConfig

    xl = model == "tiny:sdxl"
    t2i = load_t2i(model, role="t2i_xl" if xl else "t2i", device="cpu", ip_adapter=False)
    assert not xl or t2i.pipeline.config.force_zeros_for_empty_prompt
    adapter = PreferenceAdapter.for_pipeline(t2i, tiny_embedder, hidden=32)
    with torch.no_grad():
        adapter.module.to_tokens.bias.add_(1.0)  # tokens that would show
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        profile = PreferenceProfile(db, "alice")
        profile.set_attributes(liked=["bright red"], disliked=["dark blue"])
        for a, b in synthetic.PlantedUser("alice", 0.0).pairs(random.Random(1), 3):
            profile.compare(synthetic.GENERIC_PROMPT, a, b)
        pipe = PersonalizedT2IPipeline(db, t2i=t2i, strategies=[], adapter=adapter,
                                       configs={"viper": ViperConfig(beta=0.0), "preference": PreferenceConfig(scale=0)})
        vanilla = np.asarray(pipe("a shape", user="alice", steps=2, strategies=[]).images[0])
        for strategy in ("viper", "preference"):
            got = np.asarray(pipe("a shape", user="alice", steps=2, strategies=[strategy]).images[0])
            np.testing.assert_array_equal(got, vanilla, err_msg=strategy)
        cond, _ = pipe.condition("a shape", "alice", pipe._strategies(["viper"]))
        text = pipe.embeddings(cond, True)
        if xl:
            assert not text["negative_prompt_embeds"].any() and not text["negative_pooled_prompt_embeds"].any()
    pe, ne = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    out = append_tokens(torch.randn(1, 4, 8), None, pe, ne, scale=0.0)
    assert out[0] is pe and out[1] is ne  # nothing appended at scale 0


# ------------------------------------------------------------------------------------------ two processes


def test_two_processes_train_the_adapter_one_process_trains(tmp_path, trained, tiny_embedder):
    """`accelerate launch --num_processes 2` on the CPU (gloo): each process draws its own users and prepares its
    share of the data; with one micro-batch each, the adapter equals one process's with two micro-batches."""
    db_path = tmp_path / "c.db"
    with ConceptDB(db_path, embedder=tiny_embedder) as db:
        rng = random.Random(3)
        for user in synthetic.planted_users("p", 3, rng):
            profile = PreferenceProfile(db, user.name)
            for a, b in user.pairs(rng, 3):
                profile.compare(synthetic.GENERIC_PROMPT, a, b)
    base = ["--preset", "tiny", "--device", "cpu", "--db", str(db_path), "--model", "t2i=tiny:sd-trained", "--json",
            "adapter", "train", "--steps", "2", "--batch-size", "2", "--context", "2", "--heldout", "0",
            "--no-gradient-checkpointing"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmpersona"]
    two = subprocess.run(launcher + base + ["--out", str(tmp_path / "two"), "--gradient-accumulation", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads(chunk) for chunk in two.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert sorted(r["process"] for r in reports) == [0, 1] and all(r["processes"] == 2 for r in reports)
    shares = sorted(p.name for p in (tmp_path / "two" / "prepared").rglob("part-*"))
    assert shares == ["part-0-of-2.safetensors", "part-1-of-2.safetensors"]  # each prepared its half
    one = subprocess.run([sys.executable, "-m", "mmpersona"] + base + ["--out", str(tmp_path / "one"),
                                                                       "--gradient-accumulation", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = PreferenceAdapter.load(tmp_path / "two").module.state_dict()
    b = PreferenceAdapter.load(tmp_path / "one").module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    start = PreferenceAdapter.for_pipeline(trained, tiny_embedder, hidden=256).module.state_dict()
    assert any(not torch.allclose(a[k], start[k]) for k in a)  # both learned, the same


# ------------------------------------------------------------------------------------------ serve's defaults


def test_serve_generates_its_largest_request_in_batches_of_4_with_vae_slicing(tmp_path, tiny_cache, monkeypatch):
    """`mmpersona serve`'s own pipeline: a request for its most images at sides 2x native goes to the UNet 4 images
    (8 samples with guidance) at a time and is decoded one image at a time; with reranking's 4 candidates each,
    16 images were one diffusers call (real_shapes' `serve` stage measures what a call of 4 needs)."""
    import uvicorn
    from typer.testing import CliRunner

    from mmpersona.cli import app
    from mmpersona.server.app import preload_models

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda api, **k: served.update(api=api))
    result = CliRunner().invoke(app, ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "c.db"), "serve",
                                      "--no-chat", "--keys", str(tmp_path / "keys.json")])
    assert result.exit_code == 0, result.output
    api = served["api"]
    preload_models(api)
    pipe = api.state.images.get()
    assert pipe.batch_size == 4 and pipe.diffusers.vae.use_slicing
    limits = api.state.limits
    side = limits.largest_side(pipe.native_size)
    assert side == 2 * pipe.native_size
    calls = []
    handle = pipe.diffusers.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    decodes = []
    vae = pipe.diffusers.vae
    decode = vae._decode
    monkeypatch.setattr(vae, "_decode", lambda z, *a, **k: decodes.append(z.shape[0]) or decode(z, *a, **k))
    try:
        out = pipe("a shape", user="alice", n=limits.max_n, steps=1, height=side, width=side)
    finally:
        handle.remove()
    assert len(out.images) == limits.max_n and max(calls) == 2 * 4 and set(decodes) == {1}
