"""Personalized pipelines: VLM answering (retrieval-augmented) and, later, learned concept tokens and
text-to-image.

Imported lazily: `import pipelines` does not import torch or any model library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmpersona._lazy import lazy_exports

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
    "PersonalizedT2IPipeline": "pipelines.t2i",
    "T2IResult": "pipelines.t2i",
    "register_strategy": "pipelines.t2i",
    "PreferenceAdapter": "pipelines.preference_adapter",
    "train_adapter": "pipelines.adapter_training",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .adapter_training import train_adapter
    from .preference_adapter import PreferenceAdapter
    from .prompt import PromptBudget, PromptBuilder
    from .retrieval import RetrievedConcept, Retriever
    from .t2i import PersonalizedT2IPipeline, T2IResult, register_strategy
    from .vlm import AnswerStream, ChatSession, PersonalizedVLMPipeline, UnknownUserError, VLMAnswer


__getattr__, __dir__ = lazy_exports('pipelines', _EXPORTS, globals())
