"""The remote VLM backend (`openai:URL#MODEL`) against a real OpenAI-compatible server: `transformers serve`,
started here on 127.0.0.1 with the tiny Qwen2.5-VL, and the personalized pipeline answering through it."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from mmpersona import ConceptDB, MmpersonaError
from mmpersona.errors import ModelUnavailableError
from mmpersona.models import load_vlm
from mmpersona.models.remote import openai_messages, parse

pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def talkative_copy(folder: Path) -> str:
    """The tiny Qwen2.5-VL with its language model's norms drawn at random: the tiny model as built answers only
    newlines (empty after stripping), which would make "both backends answer alike" hold trivially."""
    import shutil

    import torch
    import transformers

    from mmpersona.models.tiny import tiny_path

    src = tiny_path("qwen2.5-vl")
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(src), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and "visual" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 2)
    model.save_pretrained(str(folder))
    transformers.AutoProcessor.from_pretrained(str(src)).save_pretrained(str(folder))
    shutil.copy(src / "generation_config.json", folder / "generation_config.json")  # Qwen's, as published
    return str(folder)


@pytest.fixture(scope="module")
def server(tiny_cache, tmp_path_factory):
    model = talkative_copy(tmp_path_factory.mktemp("qwen"))
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(exe), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                             "--dtype", "float32"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {proc.stdout.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("transformers serve did not come up within 120 s")
            time.sleep(0.5)
        yield f"{url}/v1", model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def photo():
    img = Image.new("RGB", (96, 64), (200, 220, 240))
    ImageDraw.Draw(img).ellipse((20, 10, 70, 60), fill=(180, 90, 30))
    return img


def test_specs_are_checked_before_anything_connects():
    assert parse("openai:http://h:8000/v1/#org/model") == ("http://h:8000/v1", "org/model")
    with pytest.raises(ModelUnavailableError, match="names no model"):
        parse("openai:http://h:8000/v1")
    with pytest.raises(ModelUnavailableError, match="http:// or https://"):
        parse("openai:h:8000/v1#org/model")


def test_the_pipeline_answers_through_the_server_as_it_does_locally(server, tmp_path, tiny_embedder):
    from openai import OpenAI

    from pipelines import PersonalizedVLMPipeline

    url, model = server
    local = load_vlm(model, device="cpu", dtype="float32")
    remote = load_vlm(f"openai:{url}#{model}")
    assert remote.remote is not None and remote.interleaves_images == local.interleaves_images
    assert remote.model_tokens() == local.model_tokens() and remote.box_convention == local.box_convention
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        db.add("alice", "bo", images=[photo()], category="dog", info="my Shiba Inu")
        answers = {}
        for name, vlm in (("local", local), ("remote", remote)):
            pipe = PersonalizedVLMPipeline(db, vlm=vlm, max_new_tokens=8)
            answers[name] = pipe(photo(), "Who is this?", user="alice")
            stream = pipe.stream(photo(), "Who is this?", user="alice")
            answers[name + "-stream"] = ("".join(stream), stream.result)
    a, b = answers["local"], answers["remote"]
    assert a.messages == b.messages  # the same conversation on both backends
    assert [r.concept.id for r in a.retrieved] == [r.concept.id for r in b.retrieved] and a.retrieved
    # the same tokens; cut at max_tokens inside a UTF-8 sequence, the server drops the incomplete character
    # where the local decoder writes U+FFFD
    def same(x, y):
        return x.strip().rstrip("\ufffd") == y.strip().rstrip("\ufffd")

    assert same(a.answer, b.answer) and len(a.answer) >= 4, (a.answer, b.answer)  # the tiny copy talks
    assert same(answers["remote-stream"][0], answers["local-stream"][0])
    assert same(answers["remote-stream"][1].answer, answers["local-stream"][1].answer)
    # the server tokenizes the rendered conversation to exactly what the local processor does
    pipe = PersonalizedVLMPipeline(ConceptDB(tmp_path / "c.db", embedder=tiny_embedder), vlm=local)
    prompt = pipe.prepare(photo(), "Who is this?", user="alice")[0]
    n_local = local.inputs(prompt.messages)["input_ids"].shape[1]
    usage = OpenAI(base_url=url, api_key="x").chat.completions.create(
        model=model, messages=openai_messages(local._prepared(prompt.messages)), max_tokens=1, temperature=0).usage
    assert usage.prompt_tokens == n_local


def test_server_failures_are_clear_errors_that_name_the_server(server, monkeypatch):
    url, model = server
    monkeypatch.setenv("MMPERSONA_VLM_RETRIES", "0")
    wrong = load_vlm(f"openai:{url}#{model}")
    wrong.remote.model = "someone/else"  # the server is pinned to the tiny model
    with pytest.raises(MmpersonaError, match=f"VLM server {url}.*HTTP 400"):
        wrong.generate([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_new_tokens=2)
    dead = load_vlm(f"openai:http://127.0.0.1:{free_port()}/v1#{model}")
    start = time.monotonic()
    with pytest.raises(MmpersonaError, match="cannot reach the VLM server http://127.0.0.1"):
        dead.generate([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_new_tokens=2)
    assert time.monotonic() - start < 10
    with pytest.raises(MmpersonaError, match="does not take the generation options"):
        dead.generate([{"role": "user", "content": "hi"}], max_new_tokens=2, num_beams=3)
    with pytest.raises(MmpersonaError, match=f"served by {url}.*learned concept tokens"):
        _ = load_vlm(f"openai:{url}#{model}").tokens  # learning tokens needs the weights here
    with pytest.raises(ModelUnavailableError, match="neither a local folder nor a hub id"):
        load_vlm(f"openai:{url}#just-a-name")


def test_attribute_extraction_asks_the_server_as_it_asks_the_local_model(server):
    from mmpersona.attributes import extract_attributes

    url, model = server
    outcomes = []
    for vlm in (load_vlm(model, device="cpu", dtype="float32"), load_vlm(f"openai:{url}#{model}")):
        with pytest.raises(MmpersonaError, match="no valid attribute JSON") as err:  # random weights write no JSON
            extract_attributes(vlm, [("like", "warm light, film grain")], retries=0, max_new_tokens=12)
        outcomes.append(str(err.value).replace("\ufffd", ""))
    assert outcomes[0] == outcomes[1]  # the same answer, so the same report
