"""The CLI through its real entry point (the installed console script's module), on the tiny preset."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "mmpersona", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_models_list_json(tiny_cache):
    data = json.loads(run_cli("--preset", "tiny", "--json", "models", "list").stdout)
    rows = {r["role"]: r for r in data["roles"]}
    assert set(rows) == {"embedder", "vlm", "detector", "t2i", "t2i_xl"}
    assert all(r["available"] for r in rows.values())
    assert rows["vlm"]["id"] == "tiny:qwen2-vl"


def test_models_list_default_preset_offline():
    data = json.loads(run_cli("--json", "--model", "vlm=tiny:llava", "models", "list").stdout)
    rows = {r["role"]: r for r in data["roles"]}
    assert rows["embedder"]["source"] == "hub" and rows["embedder"]["available"] is False
    assert rows["vlm"]["id"] == "tiny:llava"


def test_build_tiny_json(tiny_cache):
    data = json.loads(run_cli("--json", "models", "build-tiny").stdout)
    assert {m["id"] for m in data["models"]} >= {"tiny:clip", "tiny:qwen2-vl", "tiny:llava", "tiny:sd"}
    assert 0 < data["total_bytes"] < 20e6


def test_demo_end_to_end(tiny_cache, tmp_path):
    data = json.loads(run_cli("--preset", "tiny", "--device", "cpu", "--json", "demo", "--out", str(tmp_path),
                              "--steps", "2").stdout)
    assert data["retrieval"][0]["concept"] == "<red-ball>"  # the rotated red ball finds itself first
    assert os.path.getsize(data["image_path"]) > 0
    from PIL import Image

    assert Image.open(data["image_path"]).size == (64, 64)
    assert set(data["timings_s"]) == {"embedder", "detector", "vlm", "t2i"}


@pytest.mark.parametrize("args,needle", [
    (["--preset", "huge", "models", "list"], "unknown preset 'huge'"),
    (["--model", "vlm", "models", "list"], "ROLE=ID"),
    (["--preset", "tiny", "--model", "vlm=/no/such/dir", "demo"], "'/no/such/dir' does not exist"),
    (["demo"], "Cannot load the embedder model"),
])
def test_errors_are_one_clear_line(args, needle, tmp_path):
    out = run_cli(*args, check=False, env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_usage_error_exit_code():
    out = run_cli("models", "nonsense", check=False)
    assert out.returncode == 2 and "No such command" in out.stderr
