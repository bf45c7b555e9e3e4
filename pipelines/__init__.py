"""Personalized pipelines: VLM answering (retrieval-augmented) and, later, learned concept tokens and
text-to-image.

Imported lazily: `import pipelines` does not import torch or any model library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PersonalizedVLMPipeline": "pipelines.vlm",
    "VLMAnswer": "pipelines.vlm",
    "ChatSession": "pipelines.vlm",
    "AnswerStream": "pipelines.vlm",
    "UnknownUserError": "pipelines.vlm",
    "PromptBudget": "pipelines.prompt",
    "PromptBuilder": "pipelines.prompt",
    "RetrievedConcept": "pipelines.retrieval",
    "Retriever": "pipelines.retrieval",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .prompt import PromptBudget, PromptBuilder
    from .retrieval import RetrievedConcept, Retriever
    from .vlm import AnswerStream, ChatSession, PersonalizedVLMPipeline, UnknownUserError, VLMAnswer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
