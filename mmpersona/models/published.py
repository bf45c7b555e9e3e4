"""The published configuration files of the default checkpoints, kept as data (see `published/SOURCES.md`).

They let the tiny models copy what matters of the real ones (chat templates, processor limits, schedulers,
padded vocabularies) and let `benchmarks/real_shapes.py` build each default architecture at its real widths
without downloading anything. Nothing here imports a model library.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent / "published"

#: hub id -> folder under `published/`
REPOS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL-3B-Instruct",
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b-hf",
    "google/owlv2-base-patch16-ensemble": "owlv2-base-patch16-ensemble",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-xl-base-1.0": "stable-diffusion-xl-base-1.0",
    "h94/IP-Adapter": "IP-Adapter",
    "open_clip/ViT-L-14-336": "open_clip",
}


@lru_cache(maxsize=None)
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def config(repo: str, file: str = "config.json") -> dict[str, Any]:
    """One published JSON file of `repo` (a hub id from `REPOS`), e.g. `config("h94/IP-Adapter",
    "models/image_encoder/config.json")`. A fresh dict on every call."""
    if repo not in REPOS:
        raise KeyError(f"no published files of {repo!r}; known: {', '.join(REPOS)}")
    return json.loads(_read(ROOT / REPOS[repo] / file))


def chat_template(repo: str) -> str:
    return config(repo, "chat_template.json")["chat_template"]


def facts(repo: str) -> dict[str, Any]:
    """Facts that no config file holds (tokenizer length, fp16 variants, ...)."""
    return json.loads(_read(ROOT / "facts.json"))[repo]
