"""Learned concept tokens on the tiny VLMs (real model classes, tiny weights with the real checkpoints'
padded vocabularies: Qwen tied, LLaVA untied)."""

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from fake_device import fake_device, on_fake_device
from mmpersona import ConceptDB, MmpersonaError
from mmpersona.models import load_vlm
from pipelines import PersonalizedVLMPipeline
from pipelines.tokens import TENSOR_NAME, LearnConfig, TokenManager, TokenMismatchError, learn_concept
import pipelines.tokens as tokens_module

CONFIG = LearnConfig(tokens=4, steps=24, eval_every=8, lr=2e-2)
VLMS = ["tiny:qwen2.5-vl", "tiny:llava"]


def drawn(color, kind="ellipse", shift=0, size=64) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 225))
    getattr(ImageDraw.Draw(img), kind)((10 + shift, 10, size - 10 + shift, size - 10), fill=color)
    return img


@pytest.fixture
def db(tmp_path, tiny_embedder):
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as database:
        database.add("alice", "bo", [drawn((200, 30, 30)), drawn((190, 40, 30), shift=3)], info="a shiba inu")
        database.add("alice", "mug", [drawn((30, 60, 200), "rectangle")], info="a blue mug")
        database.add("alice", "leaf", [drawn((30, 160, 40))])
        yield database


def probe(vlm, text="Is <bo> here?"):
    msgs = [{"role": "user", "content": [{"type": "image", "image": drawn((120, 120, 120))},
                                         {"type": "text", "text": text}]}]
    with torch.inference_mode():
        return vlm.model(**vlm.inputs(msgs)).logits[0, -1].float().cpu().clone()


def snapshot(vlm):
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


@pytest.mark.parametrize("name", VLMS)
def test_training_changes_only_the_new_rows_and_lowers_the_loss(db, tiny_cache, name):
    vlm = load_vlm(name, device="cpu")
    before = snapshot(vlm)
    manager = vlm.tokens
    base = manager.base_vocab
    result = learn_concept(vlm, db, "alice", "bo", config=CONFIG, progress=False)
    bo = db.get("alice", "bo")
    ids = manager.ids(bo)
    assert len(ids) == CONFIG.tokens + 1 and ids == list(range(base, base + CONFIG.tokens + 1))
    after = vlm.model.state_dict()
    for key, old in before.items():
        new = after[key]
        assert new.shape == old.shape, f"{key}: the padded matrix must not be resized"
        if "embed_tokens" in key or "lm_head" in key:  # only the new rows moved
            keep = torch.ones(old.shape[0], dtype=torch.bool)
            keep[ids] = False
            assert torch.equal(new[keep], old[keep]), key
            assert not torch.equal(new[ids], old[ids]), key
        else:
            assert torch.equal(new, old), f"{key} changed"
    first, last = result.losses[:3], result.losses[-3:]
    assert sum(last) / 3 < sum(first) / 3, result.losses
    stored = db.store.get_tensor("alice", bo.id, TENSOR_NAME)
    assert stored.model == name and stored.fingerprint == manager.fingerprint


@pytest.mark.parametrize("name", VLMS)
def test_unload_restores_the_original_rows_and_outputs_exactly(db, tiny_cache, name):
    """Real checkpoints have more rows than tokens (Qwen2.5-VL 151,936 for 151,665): resizing to the tokenizer
    would drop rows and grow back random ones. New tokens use the unused rows; unloading puts them back."""
    vlm = load_vlm(name, device="cpu")
    rows = vlm.model.get_input_embeddings().weight.shape[0]
    assert rows > len(vlm.processor.tokenizer)  # the padded layout the real checkpoints have
    original, weights = probe(vlm, "Is the ball here?"), snapshot(vlm)
    learn_concept(vlm, db, "alice", "bo", config=LearnConfig(tokens=4, steps=3), progress=False)
    assert vlm.model.get_input_embeddings().weight.shape[0] == rows  # loaded: they took unused rows, none dropped
    vlm.tokens.unload_all()
    assert vlm.model.get_input_embeddings().weight.shape[0] == rows
    assert torch.equal(probe(vlm, "Is the ball here?"), original)
    assert all(torch.equal(v, weights[k]) for k, v in vlm.model.state_dict().items())
    # past the unused rows the matrix grows, and unloading cuts it back
    many = vlm.tokens.add_concept(db.get("alice", "mug"), rows - len(vlm.processor.tokenizer) + 5)
    assert vlm.model.get_input_embeddings().weight.shape[0] == max(many) + 1 > rows
    vlm.tokens.unload_all()
    assert vlm.model.get_input_embeddings().weight.shape[0] == rows
    assert torch.equal(probe(vlm, "Is the ball here?"), original)
    assert all(torch.equal(v, weights[k]) for k, v in vlm.model.state_dict().items())


def test_reload_into_fresh_model_gives_identical_logits(db, tiny_cache):
    vlm = load_vlm("tiny:qwen2.5-vl", device="cpu")
    learn_concept(vlm, db, "alice", "bo", config=CONFIG, progress=False)
    trained = probe(vlm)
    fresh = load_vlm("tiny:qwen2.5-vl", device="cpu")
    fresh.tokens.load(db, "alice", db.get("alice", "bo"))
    assert torch.equal(probe(fresh), trained)


def test_learn_then_ask_with_the_same_model(db, tiny_cache):
    """The natural order in an app or a notebook: learn, then answer with the model still loaded."""
    vlm = load_vlm("tiny:qwen2.5-vl", device="cpu")
    learn_concept(vlm, db, "alice", "bo", config=LearnConfig(tokens=4, steps=3), progress=False)
    pipe = PersonalizedVLMPipeline(db, vlm=vlm, preset="tiny", device="cpu", mode="tokens", max_new_tokens=2)
    assert pipe.tokens is vlm.tokens is TokenManager(vlm)  # one manager per model
    out = pipe(drawn((120, 120, 120)), "Is <bo> here?", user="alice")
    assert "<bo> is <bo|0><bo|1><bo|2><bo|3>." in out.messages[0]["content"][0]["text"]
    ids = vlm.processor.tokenizer("Is <bo> here?")["input_ids"]
    assert vlm.processor.tokenizer.convert_tokens_to_ids("<bo>") in ids  # the question's handle is the token


@pytest.mark.parametrize("name", VLMS)
def test_handles_stay_in_answers_in_tokens_mode(db, tiny_cache, name):
    """Concept tokens are not special tokens: answers are decoded without the model's special tokens and
    "Yes, <bo> is in this image" must keep its handle, in plain and in streamed answers."""
    vlm = load_vlm(name, device="cpu")
    learn_concept(vlm, db, "alice", "bo", config=LearnConfig(tokens=2, steps=2), progress=False)
    bo = vlm.processor.tokenizer.convert_tokens_to_ids("<bo>")
    pipe = PersonalizedVLMPipeline(db, vlm=vlm, preset="tiny", device="cpu", mode="hybrid", max_new_tokens=3)
    force = {"sequence_bias": {(bo,): 100.0}}
    out = pipe(drawn((120, 120, 120)), "Is <bo> here?", user="alice", **force)
    assert "<bo>" in out.answer
    stream = pipe.stream(drawn((120, 120, 120)), "Is <bo> here?", user="alice", **force)
    assert "<bo>" in "".join(stream)
    assert vlm.decode([bo]) == "<bo>"


def test_two_concepts_at_once_then_unload_restores_everything(db, tiny_cache):
    vlm = load_vlm("tiny:llava", device="cpu")
    original_logits = probe(vlm, "Is the ball here?")
    original_vocab = len(vlm.processor.tokenizer)
    original_rows = vlm.model.get_input_embeddings().weight.shape[0]
    for name in ("bo", "mug"):  # each concept is learned on the base model, then unloaded
        learn_concept(vlm, db, "alice", name, config=CONFIG, progress=False)
        vlm.tokens.unload_all()
    assert torch.equal(probe(vlm, "Is the ball here?"), original_logits)
    fresh = load_vlm("tiny:llava", device="cpu")
    pipe = PersonalizedVLMPipeline(db, vlm=fresh, preset="tiny", device="cpu", mode="tokens", max_new_tokens=3)
    chat = pipe.chat("alice", drawn((120, 120, 120)))
    out = chat.ask("Is <bo> next to <mug>?")
    system = out.messages[0]["content"][0]["text"]
    assert "<bo> is <bo|0><bo|1><bo|2><bo|3>." in system and "<mug> is <mug|0>" in system
    assert '"a shiba inu"' not in system  # tokens mode: learned tokens, not the text description
    assert len(fresh.tokens.loaded) == 2 and len(fresh.processor.tokenizer) == original_vocab + 10
    ids = fresh.processor.tokenizer("Is <bo> next to <mug>?")["input_ids"]
    assert fresh.processor.tokenizer.convert_tokens_to_ids("<bo>") in ids  # the handle is one learned token
    fresh.tokens.unload_all()
    assert len(fresh.processor.tokenizer) == original_vocab
    assert fresh.model.get_input_embeddings().weight.shape[0] == original_rows
    assert torch.equal(probe(fresh, "Is the ball here?"), original_logits)


def test_hybrid_mode_uses_text_for_concepts_without_tokens(db, tiny_cache):
    vlm = load_vlm("tiny:qwen2.5-vl", device="cpu")
    learn_concept(vlm, db, "alice", "bo", config=CONFIG, progress=False)
    fresh = load_vlm("tiny:qwen2.5-vl", device="cpu")
    pipe = PersonalizedVLMPipeline(db, vlm=fresh, preset="tiny", device="cpu", mode="hybrid", max_new_tokens=2)
    out = pipe(drawn((120, 120, 120)), "Is <bo> next to <mug>?", user="alice")
    system = out.messages[0]["content"][0]["text"]
    assert "<bo> is <bo|0>" in system and '"a blue mug"' in system
    pipe.mode = "retrieval"
    plain = pipe(drawn((120, 120, 120)), "Is <bo> next to <mug>?", user="alice")
    assert "<bo|0>" not in plain.messages[0]["content"][0]["text"] and not pipe.tokens.loaded


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_train_float32_rows(db, tiny_cache, dtype):
    """bf16 rows would round a 1e-4 AdamW step away; fp16 AdamW state divides 0 by 0 on frozen rows. The
    rows and their optimizer state are float32 whatever the model's dtype."""
    vlm = load_vlm("tiny:qwen2.5-vl", device="cpu", dtype=dtype)
    before = snapshot(vlm)
    bo = db.get("alice", "bo")
    initial = {}
    real_add = vlm.tokens.add_concept

    def spy(concept, k, seed=0):
        ids = real_add(concept, k, seed=seed)
        initial.update({n: r.detach().clone() for n, r in vlm.tokens.trained[concept.id].items()})
        return ids

    vlm.tokens.add_concept = spy
    result = learn_concept(vlm, db, "alice", "bo", config=LearnConfig(tokens=4, steps=6, lr=1e-4, eval_every=100),
                           progress=False)
    trained = vlm.tokens.trained[bo.id]["input_embeddings"]
    assert trained.dtype is torch.float32 and all(torch.isfinite(torch.tensor(result.losses)))
    moved = (trained - initial["input_embeddings"]).abs()
    assert float((moved > 0).float().mean()) > 0.9 and float(moved.mean()) > 6 * 1e-4 * 0.3
    keep = torch.ones(vlm.model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    keep[vlm.tokens.ids(bo)] = False
    for key, old in before.items():  # nothing else moved, and no NaN anywhere
        new = vlm.model.state_dict()[key]
        assert torch.isfinite(new.float()).all(), key
        if "embed_tokens" in key or "lm_head" in key:
            new, old = new[keep], old[keep]
        assert torch.equal(new, old), key


@pytest.mark.parametrize("name", VLMS)  # tied (Qwen) and untied (LLaVA) LM heads
def test_training_runs_where_the_model_is(db, tiny_cache, name):
    """The model on a second device (see fake_device.py): rows drawn on the CPU, inputs, masks and hooks all
    have to follow the model, and nothing may move the model away (accelerate put it on device 0)."""
    vlm = load_vlm(name, device="cpu")
    reference = load_vlm(name, device="cpu")
    config = LearnConfig(tokens=2, steps=3, eval_every=2)
    expected = learn_concept(reference, db, "alice", "bo", config=config, progress=False, save=False)
    with fake_device() as dev:
        vlm.model.to(dev)
        vlm.device = dev
        result = learn_concept(vlm, db, "alice", "bo", config=config, progress=False)
        rows = vlm.tokens.trained[db.get("alice", "bo").id]["input_embeddings"]
        assert on_fake_device(rows) and rows.device == dev
        assert all(p.device == dev for p in vlm.model.parameters())
        answer = PersonalizedVLMPipeline(db, vlm=vlm, preset="tiny", device="cpu", mode="tokens",
                                         max_new_tokens=2)(drawn((1, 2, 3)), "Is <bo> here?", user="alice")
        assert isinstance(answer.answer, str)
    assert result.losses == pytest.approx(expected.losses, rel=1e-4, abs=1e-5)


def test_what_does_not_change_is_computed_once(db, tiny_cache, monkeypatch):
    """Images are resized and tokenized once per run (not at every evaluation), the tokenizer is copied once
    per set of concepts, and only the answer positions' logits are computed."""
    import mmpersona.models.tokens as manager_mod
    import pipelines.tokens as tokens_mod

    vlm = load_vlm("tiny:qwen2.5-vl", device="cpu")
    prepared, copies, keeps = [], [], []
    real_prepare, real_copy, real_forward = vlm.prepare_image, copy.deepcopy, vlm.model.forward
    monkeypatch.setattr(vlm, "prepare_image", lambda image: prepared.append(1) or real_prepare(image))
    monkeypatch.setattr(manager_mod, "copy", SimpleNamespace(deepcopy=lambda x: copies.append(1) or real_copy(x)))

    checkpointing = []

    def forward(*args, **kwargs):
        keeps.append(kwargs.get("logits_to_keep"))
        checkpointing.append(tokens_mod._checkpointing(vlm.model))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(vlm.model, "forward", forward)
    learn_concept(vlm, db, "alice", "bo", config=LearnConfig(tokens=2, steps=12, eval_every=3, patience=100),
                  progress=False)
    examples = 2 + 2 + 1  # two positives, two negatives (the other concepts' images), one description QA
    assert len(prepared) == 2 * (examples - 1)  # each image once for the prompt, once for the full example
    assert len(copies) == 1
    assert keeps and all(k is not None and k > 0 for k in keeps)  # never the full sequence of logits
    assert any(checkpointing) and not tokens_mod._checkpointing(vlm.model)  # on while training, off after
    vlm.tokens.unload_all()
    vlm.tokens.load(db, "alice", db.get("alice", "bo"))
    vlm.tokens.unload_all()
    vlm.tokens.load(db, "alice", db.get("alice", "bo"))
    assert len(copies) == 1  # the same concept set again: the cached working tokenizer


def test_training_images_stay_within_the_visual_budget(tmp_path, tiny_embedder, tiny_cache, monkeypatch):
    import pipelines.tokens as tokens_mod

    with ConceptDB(tmp_path / "big.db", embedder=tiny_embedder) as database:
        database.add("alice", "bo", [drawn((200, 30, 30), size=2000)])
        database.add("alice", "mug", [drawn((30, 60, 200), size=64)])
        vlm = load_vlm("tiny:qwen2.5-vl", device="cpu", max_visual_tokens=64)
        seen = []
        real = tokens_mod._encode
        monkeypatch.setattr(tokens_mod, "_encode", lambda v, m, a: seen.append(real(v, m, a)) or seen[-1])
        learn_concept(vlm, database, "alice", "bo", config=LearnConfig(tokens=2, steps=1), progress=False)
    image_token = vlm.model.config.image_token_id
    counts = [int((e.inputs["input_ids"] == image_token).sum()) for e in seen]
    assert max(counts) <= 64 and max(counts) > 16  # the 2000x2000 image was cut to the budget, not below


def test_wrong_model_is_a_clear_error(db, tiny_cache):
    qwen = load_vlm("tiny:qwen2.5-vl", device="cpu")
    learn_concept(qwen, db, "alice", "bo", config=LearnConfig(tokens=2, steps=2), progress=False)
    llava = load_vlm("tiny:llava", device="cpu")
    with pytest.raises(TokenMismatchError, match="trained for model 'tiny:qwen2.5-vl'"):
        llava.tokens.load(db, "alice", db.get("alice", "bo"))
    bo = db.get("alice", "bo")
    stored = db.store.get_tensor("alice", bo.id, TENSOR_NAME)
    db.store.put_tensor("alice", bo.id, TENSOR_NAME, stored.data, model=stored.model, fingerprint="0" * 32)
    with pytest.raises(TokenMismatchError, match="tokenizer 00000000"):  # same model id, another tokenizer
        load_vlm("tiny:qwen2.5-vl", device="cpu").tokens.load(db, "alice", bo)
    from safetensors.torch import save

    no_tokens = save({"input_embeddings": torch.zeros(3, 32)})  # valid safetensors, but not our layout
    db.store.put_tensor("alice", bo.id, TENSOR_NAME, no_tokens, model=stored.model, fingerprint=stored.fingerprint)
    with pytest.raises(TokenMismatchError, match="unreadable"):
        load_vlm("tiny:qwen2.5-vl", device="cpu").tokens.load(db, "alice", bo)
    with pytest.raises(MmpersonaError, match="unknown|mode"):
        PersonalizedVLMPipeline(db, vlm=llava, preset="tiny", mode="magic")


def test_learn_cli(db, tiny_cache, tmp_path):
    db.close()
    proc = subprocess.run([sys.executable, "-m", "mmpersona", "--preset", "tiny", "--device", "cpu", "--db",
                           str(tmp_path / "c.db"), "--user", "alice", "--json", "concepts", "learn", "mug",
                           "--tokens", "2", "--steps", "6"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["concept"] == "<mug>" and data["steps"] <= 6 and data["model"] == "tiny:qwen2.5-vl"
    proc = subprocess.run([sys.executable, "-m", "mmpersona", "--preset", "tiny", "--db", str(tmp_path / "c.db"),
                           "--user", "alice", "concepts", "learn", "ghost"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 2 and "no concept 'ghost'" in proc.stderr


def test_mixed_precision_autocasts_the_frozen_model_only(db, tiny_cache):
    vlm = load_vlm("tiny:qwen2.5-vl", device="cpu")
    result = learn_concept(vlm, db, "alice", "bo", progress=False,
                           config=LearnConfig(tokens=2, steps=3, eval_every=10, mixed_precision="bf16"))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    rows = vlm.tokens.trained[db.get("alice", "bo").id]["input_embeddings"]
    assert rows.dtype is torch.float32 and next(vlm.model.parameters()).dtype is torch.float32
    with pytest.raises(MmpersonaError, match="mixed_precision"):
        LearnConfig(mixed_precision="fp8")


def test_joint_learning_with_held_out_accuracy_before_and_after(db, tiny_cache):
    """Two concepts learned together: one system turn defines both, each one's images are the other's
    negatives, both sets of rows train on every step, and held-out recognition accuracy is reported before
    (initial rows) and after, on images kept out of training."""
    from pipelines.tokens import learn_concepts

    db.add_images("alice", "mug", [drawn((40, 70, 210), "rectangle", shift=2), drawn((20, 50, 190), "rectangle")])
    vlm = load_vlm("tiny:qwen2.5-vl", device="cpu")
    seen = []
    encode = tokens_module._encode
    tokens_module._encode = lambda v, m, a: seen.append((m, a)) or encode(v, m, a)
    try:
        bo, mug = learn_concepts(vlm, db, "alice", ["bo", "mug"], held_out=1, progress=False,
                                 config=LearnConfig(tokens=2, steps=12, eval_every=6, lr=0.05))
    finally:
        tokens_module._encode = encode
    assert (bo.together, mug.together) == (["<mug>"], ["<bo>"])
    assert bo.steps == mug.steps and bo.losses == mug.losses  # one training run for both
    system = seen[0][0][0]["content"][0]["text"]
    assert "<bo>" in system and "<mug>" in system  # both defined in one system turn
    answers = [a for _, a in seen]
    assert "<bo>." in answers and "<mug>." in answers  # "which of them is in this image?"
    # held out: bo keeps 1 of 2 images, mug 1 of 3, and one of each one's negatives (the user's leaf)
    assert bo.held_out_items == 1 and mug.held_out_items == 1
    assert bo.held_out_before is not None and bo.held_out_after is not None
    # mug's two training images are bo's negatives, beside leaf (held out, there being just one)
    assert bo.negatives == 1 + 2 and mug.negatives == 1 + 1
    both = vlm.tokens.loaded
    assert {db.get("alice", "bo").id, db.get("alice", "mug").id} <= set(both)
    stored = db.store.list_tensors("alice", db.get("alice", "mug").id)
    assert TENSOR_NAME in stored


def test_hard_negatives_mined_from_a_folder_and_generated(db, tiny_cache, tmp_path, monkeypatch):
    """Mined: the folder's images most like the concept by CLIP, its own near-duplicates left out, the folder
    embedded once (cached). Generated: the text-to-image model's images of the category, made once."""
    from mmpersona.models import load_t2i
    from pipelines import negatives

    monkeypatch.setenv("MMPERSONA_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "pool"
    folder.mkdir()
    bo_image = drawn((200, 30, 30))
    bo_image.save(folder / "bo-itself.png")  # the concept's own image: a near-duplicate, never a negative
    for i, colour in enumerate([(180, 60, 40), (30, 60, 200), (30, 160, 40), (250, 250, 250)]):
        drawn(colour).save(folder / f"p{i}.png")
    calls = []
    embed = db.embedder.embed_images
    monkeypatch.setattr(db.embedder, "embed_images", lambda images, **kw: calls.append(len(images)) or embed(images, **kw))
    mined = negatives.mine(db, "alice", "bo", folder, n=2)
    assert len(mined) == 2 and folder / "bo-itself.png" not in mined
    sims = {}
    refs = db.store.vectors("alice", db.get("alice", "bo").id)[db.embedder.name][1]
    for p in sorted(folder.iterdir()):
        if p.name != "bo-itself.png":
            v = embed([p])[0]
            sims[p] = float((refs @ v).max())
    itself = float((refs @ embed([folder / "bo-itself.png"])[0]).max())
    assert itself >= negatives.DUPLICATE_SIMILARITY  # why it is left out
    expected = sorted((p for p in sims if sims[p] < negatives.DUPLICATE_SIMILARITY), key=lambda p: -sims[p])
    assert mined == expected[:2], sims  # the most similar first
    assert negatives.mine(db, "alice", "bo", folder, n=2) == mined and calls == [5]  # embedded once, cached
    t2i = load_t2i(preset="tiny", device="cpu", ip_adapter=False)
    made = negatives.generate(t2i, "dog", n=2, steps=2)
    assert [p.name for p in made] == ["0.png", "1.png"] and all(p.is_file() for p in made)
    stamp = made[0].stat().st_mtime_ns
    assert negatives.generate(t2i, "dog", n=2, steps=2) == made and made[0].stat().st_mtime_ns == stamp
    with pytest.raises(MmpersonaError, match="IP-Adapter"):
        negatives.generate(load_t2i(preset="tiny", device="cpu"), "dog", n=1, steps=1)
    vlm = load_vlm("tiny:qwen2.5-vl", device="cpu")
    result = learn_concept(vlm, db, "alice", "bo", hard_negatives=mined + made, progress=False,
                           config=LearnConfig(tokens=2, steps=2, eval_every=10))
    assert result.negatives == 2 + 4  # the user's other two concepts, then the mined and generated ones


def test_learn_cli_reports_held_out_accuracy_jointly(db, tiny_cache, tmp_path):
    db.add_images("alice", "mug", [drawn((40, 70, 210), "rectangle", shift=2)])
    db.close()
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        drawn((100 + 40 * i, 80, 60)).save(pool / f"{i}.png")
    proc = subprocess.run([sys.executable, "-m", "mmpersona", "--preset", "tiny", "--device", "cpu", "--db",
                           str(tmp_path / "c.db"), "--user", "alice", "concepts", "learn", "bo", "--with", "mug",
                           "--mine-negatives", str(pool), "--hard-negatives", "2", "--generate-negatives", "1",
                           "--tokens", "2", "--steps", "4"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("learned <bo> with <mug>") and lines[1].startswith("learned <mug> with <bo>")
    assert all("held-out recognition accuracy" in line and " -> " in line for line in lines)
