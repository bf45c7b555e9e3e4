"""Stopping work whose caller is gone.

Long model calls take `stop`, a `threading.Event` the caller sets when the answer is no longer wanted (the
server sets it when the client disconnects). The work checks it between steps, tokens or denoising steps, and
raises `Cancelled`, so nothing half-done is returned as if it were whole.
"""

from __future__ import annotations

import threading
from typing import Any

from .errors import MmpersonaError

__all__ = ["Cancelled", "check", "stopping_criteria"]


class Cancelled(MmpersonaError):
    """The work was stopped before it finished: whoever asked for it is gone."""

    def __init__(self, message: str = "stopped: the request was cancelled"):
        super().__init__(message)


def check(stop: threading.Event | None) -> None:
    """Raise `Cancelled` when `stop` is set."""
    if stop is not None and stop.is_set():
        raise Cancelled()


def stopping_criteria(stop: threading.Event, existing: Any = None) -> Any:
    """transformers `stopping_criteria` (`existing` ones kept) that end generation at the next token once `stop`
    is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([*(existing or ()), _Stop()])
