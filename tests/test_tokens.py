"""Learned concept tokens on the tiny VLMs (real model classes, tiny weights)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from mmpersona import ConceptDB
from mmpersona.models import load_vlm
from pipelines import PersonalizedVLMPipeline
from pipelines.tokens import TENSOR_NAME, LearnConfig, TokenManager, TokenMismatchError, learn_concept

CONFIG = LearnConfig(tokens=4, steps=24, eval_every=8, lr=2e-2)


def drawn(color, kind="ellipse", shift=0) -> Image.Image:
    img = Image.new("RGB", (64, 64), (235, 235, 225))
    getattr(ImageDraw.Draw(img), kind)((10 + shift, 10, 54 + shift, 54), fill=color)
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
        return vlm.model(**vlm.inputs(msgs)).logits[0, -1].clone()


@pytest.mark.parametrize("name", ["tiny:qwen2-vl", "tiny:llava"])
def test_training_changes_only_the_new_rows_and_lowers_the_loss(db, tiny_cache, name):
    vlm = load_vlm(name, device="cpu")
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    manager = TokenManager(vlm)
    base = manager.base_vocab
    result = learn_concept(vlm, db, "alice", "bo", config=CONFIG, progress=False, manager=manager)
    ids = vlm.processor.tokenizer.convert_tokens_to_ids(manager.loaded[db.get("alice", "bo").id])
    assert len(ids) == CONFIG.tokens + 1 and min(ids) >= base
    after = vlm.model.state_dict()
    for key, old in before.items():
        new = after[key]
        if new.shape != old.shape:  # the resized embedding / LM head: old rows untouched
            assert torch.equal(new[:base], old), key
        else:
            assert torch.equal(new, old), f"{key} changed"
    # the new rows did move away from their initial values
    rows = manager.rows(db.get("alice", "bo"))["input_embeddings"]
    assert rows.shape == (CONFIG.tokens + 1, vlm.model.get_input_embeddings().weight.shape[1])
    first, last = result.losses[:3], result.losses[-3:]
    assert sum(last) / 3 < sum(first) / 3, result.losses
    stored = db.store.get_tensor("alice", db.get("alice", "bo").id, TENSOR_NAME)
    assert stored.model == name and stored.fingerprint == manager.fingerprint


def test_reload_into_fresh_model_gives_identical_logits(db, tiny_cache):
    vlm = load_vlm("tiny:qwen2-vl", device="cpu")
    manager = TokenManager(vlm)
    learn_concept(vlm, db, "alice", "bo", config=CONFIG, progress=False, manager=manager)
    trained = probe(vlm)
    fresh = load_vlm("tiny:qwen2-vl", device="cpu")
    fresh_manager = TokenManager(fresh)
    fresh_manager.load(db, "alice", db.get("alice", "bo"))
    assert torch.equal(probe(fresh), trained)


def test_two_concepts_at_once_then_unload_restores_everything(db, tiny_cache):
    vlm = load_vlm("tiny:llava", device="cpu")
    original_logits = probe(vlm, "Is the ball here?")
    original_vocab = len(vlm.processor.tokenizer)
    original_rows = vlm.model.get_input_embeddings().weight.shape[0]
    trainer = TokenManager(vlm)
    for name in ("bo", "mug"):  # each concept is learned on the base model, then unloaded
        learn_concept(vlm, db, "alice", name, config=CONFIG, progress=False, manager=trainer)
        trainer.unload_all()
    assert torch.equal(probe(vlm, "Is the ball here?"), original_logits)
    fresh = load_vlm("tiny:llava", device="cpu")
    manager = TokenManager(fresh)
    pipe = PersonalizedVLMPipeline(db, vlm=fresh, preset="tiny", device="cpu", mode="tokens", max_new_tokens=3)
    pipe._tokens = manager
    chat = pipe.chat("alice", drawn((120, 120, 120)))
    out = chat.ask("Is <bo> next to <mug>?")
    system = out.messages[0]["content"][0]["text"]
    assert "<bo> is <bo|0><bo|1><bo|2><bo|3>." in system and "<mug> is <mug|0>" in system
    assert '"a shiba inu"' not in system  # tokens mode: learned tokens, not the text description
    assert len(manager.loaded) == 2 and len(fresh.processor.tokenizer) == original_vocab + 10
    ids = fresh.processor.tokenizer("Is <bo> next to <mug>?")["input_ids"]
    assert fresh.processor.tokenizer.convert_tokens_to_ids("<bo>") in ids  # the handle is one learned token
    manager.unload_all()
    assert len(fresh.processor.tokenizer) == original_vocab
    assert fresh.model.get_input_embeddings().weight.shape[0] == original_rows
    assert torch.equal(probe(fresh, "Is the ball here?"), original_logits)


def test_hybrid_mode_uses_text_for_concepts_without_tokens(db, tiny_cache):
    vlm = load_vlm("tiny:qwen2-vl", device="cpu")
    learn_concept(vlm, db, "alice", "bo", config=CONFIG, progress=False)
    fresh = load_vlm("tiny:qwen2-vl", device="cpu")
    pipe = PersonalizedVLMPipeline(db, vlm=fresh, preset="tiny", device="cpu", mode="hybrid", max_new_tokens=2)
    out = pipe(drawn((120, 120, 120)), "Is <bo> next to <mug>?", user="alice")
    system = out.messages[0]["content"][0]["text"]
    assert "<bo> is <bo|0>" in system and '"a blue mug"' in system
    pipe.mode = "retrieval"
    plain = pipe(drawn((120, 120, 120)), "Is <bo> next to <mug>?", user="alice")
    assert "<bo|0>" not in plain.messages[0]["content"][0]["text"] and not pipe.tokens.loaded


def test_wrong_model_is_a_clear_error(db, tiny_cache):
    qwen = load_vlm("tiny:qwen2-vl", device="cpu")
    learn_concept(qwen, db, "alice", "bo", config=LearnConfig(tokens=2, steps=2), progress=False)
    llava = load_vlm("tiny:llava", device="cpu")
    with pytest.raises(TokenMismatchError, match="trained for model 'tiny:qwen2-vl'"):
        TokenManager(llava).load(db, "alice", db.get("alice", "bo"))
    bo = db.get("alice", "bo")
    stored = db.store.get_tensor("alice", bo.id, TENSOR_NAME)
    db.store.put_tensor("alice", bo.id, TENSOR_NAME, stored.data, model=stored.model, fingerprint="0" * 32)
    with pytest.raises(TokenMismatchError, match="tokenizer 00000000"):  # same model id, another tokenizer
        TokenManager(load_vlm("tiny:qwen2-vl", device="cpu")).load(db, "alice", bo)
    with pytest.raises(Exception, match="unknown|mode"):
        PersonalizedVLMPipeline(db, vlm=llava, preset="tiny", mode="magic")


def test_learn_cli(db, tiny_cache, tmp_path):
    db.close()
    proc = subprocess.run([sys.executable, "-m", "mmpersona", "--preset", "tiny", "--device", "cpu", "--db",
                           str(tmp_path / "c.db"), "--user", "alice", "--json", "concepts", "learn", "mug",
                           "--tokens", "2", "--steps", "6"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["concept"] == "<mug>" and data["steps"] <= 6 and data["model"] == "tiny:qwen2-vl"
    proc = subprocess.run([sys.executable, "-m", "mmpersona", "--preset", "tiny", "--db", str(tmp_path / "c.db"),
                           "--user", "alice", "concepts", "learn", "ghost"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 2 and "no concept 'ghost'" in proc.stderr
