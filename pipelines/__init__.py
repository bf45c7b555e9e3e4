"""Personalized pipelines and their training loops, on the core (`mmpersona`) and the store (`concept_db`):

- VLM answering: `vlm` (the pipeline and chat sessions), `retrieval` (whole image, regions, instance vectors,
  assignment, verification), `prompt` (the concepts rendered into the model's own template), `marks`;
- learned concept tokens (Yo'LLaVA style): `tokens` (learning the rows; the model's token manager is
  `mmpersona.models.tokens`), `negatives` (hard negatives);
- text-to-image: `t2i` (the pipeline and its strategies), `batch` (resumable batch generation under
  `accelerate`), `dpo` (a user's Diffusion-DPO LoRA), `preference_adapter` and `adapter_training` (the adapter
  trained across users);
- evaluation: `calibrate` (a user's threshold), `evaluation` (the protocols), `peers/` (the peers' benchmarks in
  their own layouts and scoring).

Nothing here imports the application layer (`mmpersona.cli`, `mmpersona.server`, `mmpersona.app`;
tests/test_layers.py). Imported lazily: `import pipelines` does not import torch or any model library.
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
    "personalize": "pipelines.personalize",
    "train_adapter": "pipelines.adapter_training",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .adapter_training import train_adapter
    from .personalize import personalize
    from .preference_adapter import PreferenceAdapter
    from .prompt import PromptBudget, PromptBuilder
    from .retrieval import RetrievedConcept, Retriever
    from .t2i import PersonalizedT2IPipeline, T2IResult, register_strategy
    from .vlm import AnswerStream, ChatSession, PersonalizedVLMPipeline, UnknownUserError, VLMAnswer


__getattr__, __dir__ = lazy_exports('pipelines', _EXPORTS, globals())
