"""mmpersona: teach general vision-language and text-to-image models about one person.

The public API is re-exported here and imported lazily, so `import mmpersona` stays fast and does not import
torch or any model library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "ClipEmbedder": "mmpersona.embedder",
    "ConceptDB": "mmpersona.conceptdb",
    "load_image": "mmpersona.images",
    "MmpersonaError": "mmpersona.errors",
    "ImageLoadError": "mmpersona.errors",
    "ModelUnavailableError": "mmpersona.errors",
    "UnknownPresetError": "mmpersona.errors",
    "MissingDependencyError": "mmpersona.errors",
    "ModelSpec": "mmpersona.models",
    "resolve": "mmpersona.models",
    "load_embedder": "mmpersona.models",
    "load_vlm": "mmpersona.models",
    "load_detector": "mmpersona.models",
    "load_t2i": "mmpersona.models",
    "build_tiny": "mmpersona.models",
    "PersonalizedVLMPipeline": "pipelines.vlm",
    "VLMAnswer": "pipelines.vlm",
    "PromptBudget": "pipelines.prompt",
    "PersonalizedT2IPipeline": "pipelines.t2i",
    "T2IResult": "pipelines.t2i",
    "personalize": "pipelines.personalize",
    "PreferenceProfile": "mmpersona.preferences",
    "RewardModel": "mmpersona.reward",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from .conceptdb import ConceptDB
    from .embedder import ClipEmbedder
    from .errors import (ImageLoadError, MissingDependencyError, MmpersonaError, ModelUnavailableError,
                         UnknownPresetError)
    from .images import load_image
    from pipelines.prompt import PromptBudget
    from pipelines.personalize import personalize
    from pipelines.t2i import PersonalizedT2IPipeline, T2IResult

    from .preferences import PreferenceProfile
    from .reward import RewardModel
    from pipelines.vlm import PersonalizedVLMPipeline, VLMAnswer

    from .models import (ModelSpec, build_tiny, load_detector, load_embedder, load_t2i, load_vlm, resolve)


__getattr__, __dir__ = lazy_exports('mmpersona', _EXPORTS, globals())
