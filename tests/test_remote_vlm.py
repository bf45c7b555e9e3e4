"""The remote VLM backend (`openai:URL#MODEL`) against a real OpenAI-compatible server: `transformers serve`,
started here on 127.0.0.1 with the tiny Qwen2.5-VL, and the personalized pipeline answering through it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mmpersona import ConceptDB, MmpersonaError
from mmpersona.errors import ModelUnavailableError
from mmpersona.models import load_vlm
from mmpersona.models.remote import openai_messages, parse

from servers import free_port, in_thread, stop, wait_healthy

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(talkative_qwen):
    model = talkative_qwen
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(exe), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                             "--dtype", "float32"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, f"{url}/health", "transformers serve", timeout=120)
        yield f"{url}/v1", model
    finally:
        stop(proc)


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


def test_evaluation_runs_through_the_server_as_it_does_locally(server, tmp_path, tiny_embedder):
    """`mmpersona eval`'s protocols on a remote VLM: the same questions, the same answers, the same report."""
    from pipelines import PersonalizedVLMPipeline
    from pipelines.evaluation import evaluate, load_dataset, pipeline_answerer, register_concepts

    url, model = server
    root = tmp_path / "ds"
    for rel, color in {"concepts/bo/1.png": (200, 30, 30), "concepts/mam/1.png": (30, 60, 200),
                       "test/bo/a.png": (190, 40, 40), "test/mam/a.png": (40, 70, 190),
                       "test/negatives/n.png": (30, 160, 40)}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (64, 64), (235, 235, 225))
        ImageDraw.Draw(img).ellipse((12, 12, 52, 52), fill=color)
        img.save(root / rel)
    data = load_dataset(root)
    runs = {}
    for name, spec in (("local", model), ("remote", f"openai:{url}#{model}")):
        with ConceptDB(tmp_path / f"{name}.db", embedder=tiny_embedder) as db:
            register_concepts(db, "alice", data)
            pipe = PersonalizedVLMPipeline(db, vlm=load_vlm(spec, device="cpu", dtype="float32"), max_new_tokens=4)
            inner, said = pipeline_answerer(pipe, "alice"), []

            def answer(image, question, history, inner=inner, said=said):
                said.append((question, inner(image, question, history).rstrip("\ufffd")))
                return said[-1][1]

            runs[name] = (evaluate(answer, data, ["recognition", "caption"]), said)
    (local, said_local), (remote, said_remote) = runs["local"], runs["remote"]
    assert len(said_local) == 9 and any(a for _, a in said_local)  # 2 concepts x 3 photos, and 3 captions
    assert said_remote == said_local
    assert {k: v for k, v in remote.items() if k != "dataset"} == {k: v for k, v in local.items() if k != "dataset"}


def test_the_http_api_in_front_of_the_server(server, tmp_path, tiny_embedder):
    """The whole stack: an application's openai client -> `mmpersona serve`'s API (retrieval, the prompt) ->
    `transformers serve` (generation). The answer is the one the pipeline gives with the weights in-process."""
    import base64
    import io

    from openai import OpenAI

    from mmpersona.server import KeyStore, create_app
    from pipelines import PersonalizedVLMPipeline

    url, model = server
    buf = io.BytesIO()
    photo().save(buf, format="PNG")
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}},
        {"type": "text", "text": "Who is this?"}]}]
    with ConceptDB(tmp_path / "c.db", embedder=tiny_embedder) as db:
        db.add("alice", "bo", images=[photo()], category="dog", info="my Shiba Inu")
        local = PersonalizedVLMPipeline(db, vlm=load_vlm(model, device="cpu", dtype="float32"))(
            photo(), "Who is this?", user="alice", max_new_tokens=6)
        keys = KeyStore(tmp_path / "keys.json")
        _, key = keys.create("alice")
        remote = PersonalizedVLMPipeline(db, vlm=load_vlm(f"openai:{url}#{model}"))
        with in_thread(create_app(db, keys, vlm=remote)) as api:
            client = OpenAI(base_url=f"{api}/v1", api_key=key, max_retries=0)
            reply = client.chat.completions.create(model="m", messages=messages, max_tokens=6)
            chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=6, stream=True))
    assert reply.choices[0].message.content.rstrip("\ufffd") == local.answer.rstrip("\ufffd") and local.answer
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip().rstrip("\ufffd") == \
        local.answer.rstrip("\ufffd")
    assert [r["concept"]["handle"] for r in reply.model_extra["mmpersona"]["retrieved"]] == \
        [r.concept.handle for r in local.retrieved]
