"""The model registry: one place that resolves each role to a model and loads it.

    from mmpersona.models import load_embedder, load_vlm
    embedder = load_embedder(preset="tiny")                 # built offline on first use
    vlm = load_vlm("Qwen/Qwen2.5-VL-3B-Instruct", device="cuda")
    vlm = load_vlm("/path/to/a/local/checkpoint")

Importing this module is cheap: the model libraries are imported by the loaders that need them.
"""

from .hub import probe_hub
from .loaders import (Detection, Detector, LoadedT2I, LoadedVLM, ModelStatus, load_detector, load_embedder,
                      load_face_model, load_instance_embedder, load_ip_adapter, load_t2i, load_vlm,
                      model_status)
from .registry import PRESETS, ROLES, IPAdapterSpec, ModelSpec, parse_overrides, resolve
from .tiny import TINY_MODELS, build_all as build_tiny, ensure_tiny

__all__ = [
    "PRESETS", "ROLES", "TINY_MODELS", "Detection", "Detector", "IPAdapterSpec", "LoadedT2I", "LoadedVLM",
    "ModelSpec", "ModelStatus", "build_tiny", "ensure_tiny", "load_detector", "load_embedder",
    "load_face_model", "load_instance_embedder", "load_ip_adapter",
    "load_t2i", "load_vlm", "model_status", "parse_overrides", "probe_hub", "resolve",
]
