"""The pipelines the server serves: each given, or built in the model worker on first use."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from .errors import ApiError

if TYPE_CHECKING:
    from pipelines.vlm import PersonalizedVLMPipeline


class Served:
    """One pipeline the server serves: given, or built (in the model worker) on first use by `make`."""

    def __init__(self, what: str, value: Any):
        self.what = what
        self._value = None if callable(value) and not hasattr(value, "db") else value
        self._make: Callable[[], Any] | None = value if self._value is None else None
        self._variants: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return "loaded" if self._value is not None else "not served" if self._make is None else "not loaded"

    def loaded(self) -> Any:
        """The pipeline if it is built, else None (`get` builds it: in the model worker)."""
        return self._value

    def get(self) -> Any:
        with self._lock:
            if self._value is None:
                if self._make is None:
                    raise ApiError(503, f"this server serves no {self.what} model", "server_error",
                                   "not_served")
                self._value = self._make()
            return self._value

    def variant(self, **options: Any) -> Any:
        """The pipeline with `options` changed (built once), for the VLM's `regions`."""
        base = self.get()
        if not options:
            return base
        key = tuple(sorted(options.items()))
        with self._lock:
            if key not in self._variants:
                self._variants[key] = base.variant(**options)
            return self._variants[key]



def chat_pipeline(pipe: "PersonalizedVLMPipeline") -> "PersonalizedVLMPipeline":
    """The server's own copy: a key's user who has no concepts yet is answered, not refused."""
    out = pipe.variant()
    out.require_concepts = False
    return out
