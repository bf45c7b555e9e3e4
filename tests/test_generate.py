"""Batch generation through the real CLI: sidecars, resume, bad input, and 2 CPU processes under accelerate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


def run(*args, check=True, launcher=None):
    cmd = (launcher or [sys.executable, "-m", "mmpersona"]) + list(args)
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture
def setup(tmp_path, tiny_cache):
    img = Image.new("RGB", (48, 48), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((8, 8, 40, 40), fill=(220, 60, 20))
    img.save(tmp_path / "liked.png")
    base = ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "c.db"), "--user", "alice"]
    run(*base, "profile", "like", str(tmp_path / "liked.png"), "--comment", "warm")
    run(*base, "profile", "edit-attributes", "--liked", "warm light", "--disliked", "blue cast")
    return tmp_path, base


def test_generate_sidecars_and_resume(setup):
    tmp, base = setup
    (tmp / "prompts.txt").write_text("a ball\n\n# a comment\na cat\n")
    out = tmp / "out"
    report = json.loads(run(*base, "--json", "generate", "--prompts", str(tmp / "prompts.txt"), "--out", str(out),
                            "-n", "2", "--steps", "2", "--strategies", "attributes,ip_adapter,rerank").stdout)
    assert report["generated"] == 4 and report["skipped"] == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000-00.json", "00000-00.png", "00000-01.json", "00000-01.png",
                     "00001-00.json", "00001-00.png", "00001-01.json", "00001-01.png"]
    meta = json.loads((out / "00001-00.json").read_text())
    assert meta["prompt"] == "a cat" and meta["final_prompt"] == "a cat, warm light"
    assert meta["negative_prompt"] == "blue cast" and meta["model"] == "tiny:sd" and meta["file"] == "00001-00.png"
    assert {"seed", "reward_score", "strategies", "ip_adapter", "embedder", "steps"} <= set(meta)
    assert set(meta["strategies"]) == {"attributes", "ip_adapter", "rerank"}
    assert Image.open(out / "00001-00.png").size == (64, 64)
    (out / "00001-01.json").unlink()  # as if the run had been killed before this image finished
    before = (out / "00000-00.png").stat().st_mtime_ns
    again = json.loads(run(*base, "--json", "generate", "--prompts", str(tmp / "prompts.txt"), "--out", str(out),
                           "-n", "2", "--steps", "2", "--strategies", "attributes,ip_adapter,rerank").stdout)
    assert again["skipped"] == 1 and again["generated"] == 2 and (out / "00001-01.json").is_file()
    assert (out / "00000-00.png").stat().st_mtime_ns == before


def test_generate_bad_input(setup):
    tmp, base = setup
    (tmp / "empty.txt").write_text("\n  \n")
    out = run(*base, "generate", "--prompts", str(tmp / "empty.txt"), "--out", str(tmp / "o"), check=False)
    assert out.returncode == 2 and "has no prompts" in out.stderr
    out = run(*base, "generate", "--prompt", "x", "--out", str(tmp / "o"), "--strategies", "sparkle", check=False)
    assert out.returncode == 2 and "valid: attributes, ip_adapter, lora, preference, rerank, subject, viper" in out.stderr
    out = run(*base, "generate", "--prompt", "<ghost> on a sofa", "--out", str(tmp / "o"), "--strategies", "subject",
              "--steps", "1", check=False)
    assert out.returncode == 2 and "<ghost> is not in 'alice'" in out.stderr
    bad = tmp / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    out = run(*base, "profile", "like", str(bad), check=False)
    assert out.returncode == 2 and "bad.jpg" in out.stderr


def test_two_processes_under_accelerate(setup):
    tmp, base = setup
    (tmp / "p.txt").write_text("a ball\na cat\na dog\na tree\n")
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmpersona"]
    out = run(*base, "--json", "generate", "--prompts", str(tmp / "p.txt"), "--out", str(tmp / "dp"), "--steps", "1",
              "--strategies", "attributes", launcher=launcher)
    reports = [json.loads(chunk) for chunk in out.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert sorted(r["process"] for r in reports) == [0, 1] and all(r["processes"] == 2 for r in reports)
    assert sorted(f for r in reports for f in r["files"]) == [f"0000{i}-00.png" for i in range(4)]
    by_rank = {r["process"]: r["files"] for r in reports}
    assert by_rank[0] == ["00000-00.png", "00002-00.png"] and by_rank[1] == ["00001-00.png", "00003-00.png"]
