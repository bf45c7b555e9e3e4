"""The CLI through its real entry point (the installed console script's module), on the tiny preset."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict | None = None, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "mmpersona", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=300, cwd=cwd)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_models_list_json(tiny_cache):
    data = json.loads(run_cli("--preset", "tiny", "--json", "models", "list").stdout)
    rows = {r["role"]: r for r in data["roles"]}
    assert set(rows) == {"embedder", "vlm", "detector", "instance", "face", "t2i", "t2i_xl", "scorer"}
    assert all(r["available"] for role, r in rows.items() if role != "face")  # built by tiny_cache
    assert rows["face"]["source"] == "pypi" and rows["face"]["id"] == "pypi:dlib-face"  # fetched on first use
    assert rows["vlm"]["id"] == "tiny:qwen2.5-vl"


def test_models_list_default_preset_offline():
    data = json.loads(run_cli("--json", "--model", "vlm=tiny:llava", "models", "list").stdout)
    rows = {r["role"]: r for r in data["roles"]}
    assert rows["embedder"]["source"] == "hub" and rows["embedder"]["available"] is False
    assert rows["vlm"]["id"] == "tiny:llava"


def test_build_tiny_json(tiny_cache):
    data = json.loads(run_cli("--json", "models", "build-tiny").stdout)
    assert {m["id"] for m in data["models"]} >= {"tiny:clip", "tiny:qwen2.5-vl", "tiny:qwen2-vl", "tiny:llava",
                                                 "tiny:sd"}
    assert 0 < data["total_bytes"] < 20e6


def test_demo_end_to_end(tiny_cache, tmp_path):
    data = json.loads(run_cli("--preset", "tiny", "--device", "cpu", "--json", "demo", "--out", str(tmp_path),
                              "--steps", "2", "--no-real").stdout)
    assert data["retrieved"][0]["concept"] == "<red-ball>"  # the rotated red ball finds itself first
    assert data["abstained"] is False and isinstance(data["answer"], str)
    assert os.path.getsize(data["image_path"]) > 0
    from PIL import Image

    assert Image.open(data["image_path"]).size == (64, 64)
    assert set(data["timings_s"]) == {"register", "answer", "t2i"}
    again = json.loads(run_cli("--preset", "tiny", "--device", "cpu", "--json", "demo", "--out", str(tmp_path),
                               "--steps", "2", "--no-real").stdout)
    assert again["retrieved"] == data["retrieved"]  # a re-run starts from the same state


def test_demo_output_is_the_clis_own(tmp_path):
    """A newcomer's first command, from an empty cache (so the tiny models are built too): its own lines on
    stdout, nothing on stderr (no "Writing model shards", "Loading weights", dtype warnings); the library
    output comes back under -v."""
    env = {"MMPERSONA_CACHE_DIR": str(tmp_path / "cache")}
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        env[name] = ""  # as on a fresh machine
    out = run_cli("--preset", "tiny", "--device", "cpu", "demo", "--out", str(tmp_path / "demo"), "--steps", "2",
                  env=env, cwd=tmp_path)
    assert out.stderr == ""
    assert [line.split(":")[0] for line in out.stdout.splitlines()] == [
        "preset tiny", "question", "retrieved", "answer", "image", "timings", "real recognition"]
    assert "demo --real" in out.stdout  # how to see the real part (nothing real is cached in a fresh cache)
    verbose = run_cli("--preset", "tiny", "--device", "cpu", "-v", "demo", "--out", str(tmp_path / "demo"),
                      "--steps", "2", env=env, cwd=tmp_path)
    assert "Loading weights" in verbose.stderr or "it/s" in verbose.stderr


@pytest.mark.parametrize("args,needle", [
    (["--preset", "huge", "models", "list"], "unknown preset 'huge'"),
    (["--model", "vlm", "models", "list"], "ROLE=ID"),
    (["--preset", "tiny", "--model", "vlm=/no/such/dir", "demo"], "'/no/such/dir' does not exist"),
    (["demo"], "Cannot load the embedder model"),
])
def test_errors_are_one_clear_line(args, needle, tmp_path):
    out = run_cli(*args, check=False, env={"HF_HUB_OFFLINE": "1"}, cwd=tmp_path)  # the demo writes to ./
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_usage_error_exit_code():
    out = run_cli("models", "nonsense", check=False)
    assert out.returncode == 2 and "No such command" in out.stderr


def test_concepts_commands_end_to_end(tiny_cache, tmp_path):
    from PIL import Image, ImageDraw

    paths = []
    for name, color in (("red", (210, 30, 30)), ("blue", (30, 60, 200))):
        img = Image.new("RGB", (64, 64), (240, 240, 240))
        ImageDraw.Draw(img).ellipse((10, 10, 54, 54), fill=color)
        img.save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    base = ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "c.db"), "--user", "alice", "--json"]

    def cli(*args, check=True):
        out = run_cli(*base, *args, check=check)
        return json.loads(out.stdout) if check else out

    added = cli("concepts", "add", "<bo>", "--image", paths[0], "--category", "dog", "--info", "my shiba",
                "--alias", "shiba")
    assert added["name"] == "bo" and added["aliases"] == ["shiba"] and len(added["images"]) == 1
    cli("concepts", "add", "mam", "--image", paths[1], "--category", "cat")
    listing = cli("concepts", "list", "--category", "dog")
    assert [c["name"] for c in listing["concepts"]] == ["bo"] and listing["total"] == 2
    hits = cli("concepts", "search", "--image", paths[0], "-k", "2")["matches"]
    assert hits[0]["concept"]["name"] == "bo" and len(hits) == 2
    assert cli("concepts", "edit", "shiba", "--info", "older now")["info"] == "older now"
    assert cli("concepts", "show", "<bo>")["info"] == "older now"
    archive = tmp_path / "alice.zip"
    assert cli("concepts", "export", str(archive))["exported"] == 2
    assert cli("concepts", "rm", "bo")["deleted"]["name"] == "bo"
    assert [c["name"] for c in cli("concepts", "list")["concepts"]] == ["mam"]
    report = json.loads(run_cli(*base[:-3], "--user", "bob", "--json", "concepts", "import", str(archive),
                                "--format", "archive").stdout)
    assert sorted(report["added"]) == ["bo", "mam"] and report["skipped"] == []
    # errors: one line, exit code 2, nothing written
    out = cli("concepts", "add", "a/b", "--image", paths[0], check=False)
    assert out.returncode == 2 and "path separators" in out.stderr
    out = cli("concepts", "show", "ghost", check=False)
    assert out.returncode == 2 and "no concept 'ghost'" in out.stderr
    out = cli("concepts", "search", check=False)
    assert out.returncode == 2 and "exactly one of --image or --text" in out.stderr
    assert cli("concepts", "list")["total"] == 1


def test_chat_one_shot_interactive_and_calibrate(tiny_cache, tmp_path):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((10, 10, 54, 54), fill=(210, 30, 30))
    photo = tmp_path / "bo.png"
    img.save(photo)
    base = ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "c.db"), "--user", "alice"]
    run_cli(*base, "concepts", "add", "bo", "--image", str(photo), "--info", "my shiba")
    answer = json.loads(run_cli(*base, "--json", "chat", "--image", str(photo), "What is <bo> doing?",
                                "--max-new-tokens", "3").stdout)
    assert answer["retrieved"][0]["concept"]["name"] == "bo" and answer["abstained"] is False
    assert isinstance(answer["answer"], str) and answer["messages"][0]["role"] == "system"

    proc = subprocess.run([sys.executable, "-m", "mmpersona", *base, "chat", "--image", str(photo),
                           "--max-new-tokens", "2"], input="is <bo> here?\n/image /no/such.png\nand now?\n/quit\n",
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2  # the bad /image line did not end the chat
    assert "used <bo> mention" in proc.stderr and "error: image '/no/such.png'" in proc.stderr

    (tmp_path / "pos" / "bo").mkdir(parents=True)
    (tmp_path / "neg").mkdir()
    img.rotate(5).save(tmp_path / "pos" / "bo" / "1.png")
    Image.new("RGB", (64, 64), (0, 90, 0)).save(tmp_path / "neg" / "1.png")
    result = json.loads(run_cli(*base, "--json", "concepts", "calibrate", "--positives", str(tmp_path / "pos"),
                                "--negatives", str(tmp_path / "neg"), "--precision", "0.9").stdout)
    assert result["positives"] == 1 and result["negatives"] == 1 and 0 < result["threshold"] <= 1.01
    out = run_cli(*base, "chat", "--image", "/no/such.png", "hi", check=False)
    assert out.returncode == 2 and "file not found" in out.stderr


def test_memory_from_chat_to_the_prompt_through_the_cli(tiny_cache, tmp_path):
    """What the user says in a chat is proposed, accepted with `memory accept`, and in the next answer's prompt;
    a newer state replaces the older in the prompt; `memory rm` forgets; errors are one line."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((10, 10, 54, 54), fill=(210, 30, 30))
    photo = tmp_path / "bo.png"
    img.save(photo)
    base = ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "c.db"), "--user", "alice", "--json"]
    run_cli(*base, "concepts", "add", "bo", "--image", str(photo))
    said = json.loads(run_cli(*base, "chat", "--image", str(photo), "Bo turned four last week. Is <bo> happy?",
                              "--max-new-tokens", "2").stdout)
    assert [(e["text"], e["status"], e["topic"]) for e in said["proposed"]] == [
        ("Bo turned four last week.", "proposed", "age")]
    assert said["memory"] == []  # a proposal is not used before it is accepted
    entry = said["proposed"][0]["id"]
    assert json.loads(run_cli(*base, "memory", "list", "--proposed").stdout)["entries"][0]["id"] == entry
    run_cli(*base, "memory", "accept", entry)
    newer = json.loads(run_cli(*base, "memory", "add", "Bo is five now.", "--concept", "bo", "--state", "age").stdout)
    answer = json.loads(run_cli(*base, "chat", "--image", str(photo), "How old is <bo>?", "--max-new-tokens", "2",
                                "--no-remember").stdout)
    assert [e["id"] for e in answer["memory"]] == [newer["id"]] and "proposed" in answer and not answer["proposed"]
    system = answer["messages"][0]["content"][0]["text"]
    assert "Bo is five now." in system and "turned four" not in system  # history is not presented as current
    listing = json.loads(run_cli(*base, "memory", "list", "--concept", "bo").stdout)["entries"]
    assert [(e["id"], e["current"]) for e in listing] == [(newer["id"], True), (entry, False)]
    run_cli(*base, "memory", "rm", newer["id"])
    assert [e["id"] for e in json.loads(run_cli(*base, "memory", "list", "--current").stdout)["entries"]] == [entry]
    out = run_cli(*base, "memory", "rm", "nope", check=False)
    assert out.returncode == 2 and "no memory entry 'nope'" in out.stderr
    out = run_cli(*base, "memory", "add", "x", "--concept", "ghost", check=False)
    assert out.returncode == 2 and "ghost" in out.stderr
