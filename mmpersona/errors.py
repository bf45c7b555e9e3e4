"""The project's exception hierarchy: every error a user can cause is a subclass of `MmpersonaError`."""

from __future__ import annotations

# The root is defined in the lowest layer, concept_db, so that the concept database's errors derive from it
# while concept_db imports nothing from mmpersona.
from concept_db.types import MmpersonaError

__all__ = ["ImageLoadError", "MissingDependencyError", "MmpersonaError", "ModelUnavailableError",
           "UnknownPresetError", "default_fix"]


class ImageLoadError(MmpersonaError, ValueError):
    """An image could not be read safely (missing, empty, truncated, not an image, or too large)."""


class ModelUnavailableError(MmpersonaError, OSError):
    """A model could not be had: not cached, hub unreachable, wrong id or wrong local path."""

    def __init__(self, role: str, model_id: str, reason: str, fix: str | None = None):
        self.role = role
        self.model_id = model_id
        self.reason = reason
        self.fix = fix or default_fix(role)
        super().__init__(f"Cannot load the {role} model {model_id!r}: {reason}.\nFix: {self.fix}")


class UnknownPresetError(MmpersonaError, KeyError):
    """A preset or role name that the model registry does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(MmpersonaError, ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


def default_fix(role: str) -> str:
    return (
        f"download it once while online (it is then cached), point the {role} role at a local directory "
        f"(`--model {role}=/path/to/model` on the CLI, `models.resolve('{role}', '/path')` in Python), "
        "or use `--preset tiny` for the small offline test models"
    )
