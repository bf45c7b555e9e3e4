import socket
import subprocess
import sys
import threading
import time

import pytest

from mmpersona.errors import ModelUnavailableError, UnknownPresetError
from mmpersona.models import PRESETS, ROLES, ModelSpec, parse_overrides, probe_hub, resolve
from mmpersona.models import hub
from mmpersona.models.registry import source_of


def test_every_preset_covers_every_role():
    for preset, specs in PRESETS.items():
        assert set(specs) == set(ROLES), preset
        for role, spec in specs.items():
            assert spec.role == role
        for role in ("t2i", "t2i_xl"):
            assert specs[role].ip_adapter is not None


def test_resolve_preset_and_explicit_ids(tmp_path):
    assert resolve("vlm", preset="tiny").id == "tiny:qwen2.5-vl"
    assert resolve("vlm").id == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert resolve("vlm", "tiny:llava", preset="tiny").source == "tiny"
    assert resolve("vlm", "tiny", preset="default").id == "tiny:qwen2.5-vl"
    local = resolve("vlm", str(tmp_path))
    assert local.source == "local" and local.local_path == tmp_path
    assert resolve("vlm", "./relative/dir").source == "local"
    assert resolve("vlm", "org/model").source == "hub"
    # an explicit SD model keeps its family's IP-Adapter: real models (hub or a local copy) the real one,
    # tiny models the tiny one
    assert resolve("t2i", "org/my-sd").ip_adapter.id == "h94/IP-Adapter"
    assert resolve("t2i", str(tmp_path)).ip_adapter.id == "h94/IP-Adapter"
    assert resolve("t2i_xl", str(tmp_path)).ip_adapter.weight_name == "ip-adapter_sdxl.safetensors"
    assert resolve("t2i", "tiny:sd").ip_adapter.id == "tiny:ip-adapter"
    assert resolve("t2i", str(tmp_path), preset="tiny").ip_adapter.id == "h94/IP-Adapter"
    assert resolve("t2i_xl", "tiny:sdxl").ip_adapter.weight_name == "ip-adapter_sdxl.safetensors"


def test_env_override(monkeypatch):
    monkeypatch.setenv("MMPERSONA_DETECTOR_MODEL", "google/owlvit-base-patch32")
    assert resolve("detector").id == "google/owlvit-base-patch32"
    assert resolve("detector", "tiny:owlv2").id == "tiny:owlv2"  # an explicit spec wins


def test_unknown_role_preset_and_tiny_name():
    with pytest.raises(UnknownPresetError, match="valid roles: embedder"):
        resolve("painter")
    with pytest.raises(UnknownPresetError, match="valid presets: default, tiny"):
        resolve("vlm", preset="huge")
    with pytest.raises(ModelUnavailableError, match="tiny:qwen2.5-vl, tiny:qwen2-vl, tiny:llava"):
        resolve("vlm", "tiny:gpt")
    with pytest.raises(ModelUnavailableError, match="it is a t2i model"):
        resolve("vlm", "tiny:sd")
    with pytest.raises(UnknownPresetError, match="not 'vlm'"):
        resolve("vlm", ModelSpec("t2i", "tiny:sd"))


def test_parse_overrides():
    assert parse_overrides(["vlm=/a/b", "embedder = tiny:clip"]) == {"vlm": "/a/b", "embedder": "tiny:clip"}
    with pytest.raises(UnknownPresetError, match="ROLE=ID"):
        parse_overrides(["vlm"])
    with pytest.raises(UnknownPresetError, match="unknown role"):
        parse_overrides(["brain=x/y"])


def test_source_detection(tmp_path):
    assert source_of("tiny:clip") == "tiny"
    assert source_of("hf-hub:timm/x") == "hub"
    assert source_of("local-dir:/x") == "local"
    assert source_of("~/models/x") == "local"
    assert source_of(str(tmp_path)) == "local"


# ------------------------------------------------------------------------------------------ failing fast


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_clear(err: ModelUnavailableError, role: str, model_id: str) -> None:
    text = str(err)
    assert role in text and model_id in text
    assert "Fix:" in text and "--preset tiny" in text


@pytest.mark.parametrize("loader,role,model_id", [
    ("load_vlm", "vlm", "Qwen/Qwen2.5-VL-3B-Instruct"),
    ("load_embedder", "embedder", "timm/vit_large_patch14_clip_336.openai"),
    ("load_detector", "detector", "google/owlv2-base-patch16-ensemble"),
    ("load_instance_embedder", "instance", "facebook/dinov2-base"),
])
def test_unavailable_hub_model_offline_mode(monkeypatch, loader, role, model_id):
    import mmpersona.models as models

    import open_clip, transformers  # noqa: F401,E401  (import time is not what this test measures)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        getattr(models, loader)(device="cpu")
    assert time.perf_counter() - start < 3
    _assert_clear(err.value, role, model_id)
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_unavailable_hub_model_hub_unreachable(monkeypatch):
    import diffusers.pipelines  # noqa: F401  (import time is not what this test measures)

    from mmpersona.models import load_t2i

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        load_t2i("someone/not-cached-sd", device="cpu")
    assert time.perf_counter() - start < 5
    _assert_clear(err.value, "t2i", "someone/not-cached-sd")
    assert "cannot be reached" in str(err.value)


def test_unavailable_model_in_fresh_process_without_offline_flag(tmp_path):
    """The real situation of a user with no network: nothing set, the hub host unresolvable."""
    code = (
        "import time\n"
        "from mmpersona import ModelUnavailableError, load_vlm\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    load_vlm('Qwen/Qwen2.5-VL-3B-Instruct', device='cpu')\n"
        "except ModelUnavailableError as e:\n"
        "    print(round(time.perf_counter() - t, 2)); print(e)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_ENDPOINT": "https://hub.invalid", "HF_HOME": str(tmp_path / "hf"),
           "MMPERSONA_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = out.stdout.splitlines()
    assert lines, out.stderr
    assert float(lines[0]) < 5
    assert "Cannot load the vlm model 'Qwen/Qwen2.5-VL-3B-Instruct'" in out.stdout and "Fix:" in out.stdout


def test_probe_is_bounded_even_when_connect_hangs(monkeypatch):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    start = time.perf_counter()
    reason = probe_hub(timeout=0.3)
    elapsed = time.perf_counter() - start
    release.set()
    assert reason is not None and "no answer" in reason
    assert elapsed < 2


def test_probe_reachable_endpoint(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert probe_hub(timeout=1) is None


def test_missing_local_path_and_malformed_id(tmp_path):
    from mmpersona.models import load_vlm

    with pytest.raises(ModelUnavailableError, match="does not exist") as err:
        load_vlm(str(tmp_path / "missing-model"), device="cpu")
    assert "missing-model" in str(err.value)
    with pytest.raises(ModelUnavailableError, match="neither an existing local directory nor a hub id"):
        load_vlm("not a model id", device="cpu")


def test_directory_of_wrong_kind(tmp_path, tiny_cache):
    from mmpersona.models import load_embedder, load_t2i, load_vlm
    from mmpersona.models.tiny import tiny_path

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailableError, match="could not be loaded as an image-text-to-text model"):
        load_vlm(str(tmp_path), device="cpu")
    with pytest.raises(ModelUnavailableError, match="no open_clip_config.json"):
        load_embedder(str(tmp_path), device="cpu")
    with pytest.raises(ModelUnavailableError, match="belongs to role t2i_xl"):
        load_t2i(str(tiny_path("sdxl")), role="t2i", device="cpu", ip_adapter=False)


def test_open_clip_directory_without_weights_is_an_error(tmp_path, tiny_cache):
    """open_clip's own local-dir loader would only log a warning and return random weights."""
    import shutil

    from mmpersona.models import load_embedder
    from mmpersona.models.tiny import tiny_path

    shutil.copy(tiny_path("clip") / "open_clip_config.json", tmp_path / "open_clip_config.json")
    with pytest.raises(ModelUnavailableError, match="no open_clip_model.safetensors") as err:
        load_embedder(str(tmp_path), device="cpu")
    assert str(tmp_path) in str(err.value)


def test_local_copy_of_sd_keeps_a_working_default(tmp_path, tiny_cache, monkeypatch):
    """A local copy of a real SD model gets the real IP-Adapter; when that cannot be had (offline here), the
    pipeline loads without it and its default strategies are the ones that work, instead of failing the
    first user who has liked an image."""
    import shutil

    from mmpersona import ConceptDB, MmpersonaError
    from mmpersona.models import load_t2i
    from mmpersona.models.tiny import tiny_path
    from mmpersona.preferences import PreferenceProfile
    from pipelines import PersonalizedT2IPipeline
    from PIL import Image

    copy = tmp_path / "my-sd"
    shutil.copytree(tiny_path("sd"), copy)
    t2i = load_t2i(str(copy), role="t2i", device="cpu")
    assert not t2i.ip_adapter and "h94/IP-Adapter" in t2i.ip_adapter_error
    with ConceptDB(tmp_path / "c.db", preset="tiny", device="cpu") as db:
        PreferenceProfile(db, "alice").like(Image.new("RGB", (32, 32), (200, 30, 30)))
        pipe = PersonalizedT2IPipeline(db, t2i=t2i)
        assert [s.name for s in pipe.default_strategies] == ["attributes", "rerank"]
        assert len(pipe("a ball", user="alice", steps=1).images) == 1
        with pytest.raises(MmpersonaError, match="'ip_adapter' needs an IP-Adapter.*h94/IP-Adapter"):
            pipe("a ball", user="alice", steps=1, strategies=["ip_adapter"])
        with pytest.raises(ModelUnavailableError, match="h94/IP-Adapter"):
            load_t2i(str(copy), role="t2i", device="cpu", ip_adapter=True)


@pytest.mark.parametrize("name", ["tiny:qwen2.5-vl", "tiny:grounding-dino"])
def test_hub_kernels_stay_off_unless_the_user_turns_them_on(tiny_cache, monkeypatch, name):
    """transformers 5.25 swaps layers for kernels fetched from other hub repos by default, and re-kernelizes on
    every train(): the model is loaded with torch's layers, as it was built and checked, and train() on a model
    moved to another device (what token learning does) re-kernelizes nothing. transformers' own
    USE_HUB_KERNELS=yes turns them on."""
    from mmpersona.models import load_detector, load_vlm
    from mmpersona.models.loaders import hub_kernels

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model = (load_vlm if "qwen" in name else load_detector)(name, device="cpu").model
    assert not model.use_kernels
    model.train()
    assert getattr(model, "kernels_mode", None) is None
    model.eval()
    for value, on in (("yes", True), ("1", True), ("no", False), ("", False)):
        monkeypatch.setenv("USE_HUB_KERNELS", value)
        assert hub_kernels() is on
