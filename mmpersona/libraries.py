"""How much the model libraries (transformers, diffusers) may print.

The CLI's output is its own: it calls `quiet_libraries()` unless `-v` is given, and every model loader calls
`apply()` once the libraries are needed, which turns their progress bars ("Loading weights", "Loading pipeline
components") and warnings off. Download progress from huggingface_hub stays: a first download of a real model
takes minutes and should not look like a hang. Library code never prints; this only decides what the
libraries themselves do. Nothing here imports a library until `apply()` runs.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

_quiet = False


def quiet_libraries() -> None:
    """From now on, model libraries keep their progress bars and warnings to themselves."""
    global _quiet
    _quiet = True
    # read by the libraries when they are imported; an explicit setting of the user's wins
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        if not os.environ.get(name):
            os.environ[name] = "error"
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="mmpersona")
    warnings.filterwarnings("default", module="pipelines")
    warnings.filterwarnings("default", module="concept_db")


def is_quiet() -> bool:
    return _quiet


def _mute() -> list:
    """Errors only and no progress bars in transformers and diffusers; returns their logging modules."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    logs = [tlog, dlog]
    for log in logs:
        log.set_verbosity_error()
        log.disable_progress_bar()
    return logs


def apply() -> None:
    """Apply the quiet setting to the libraries (imports them: call it only where a model is loaded)."""
    if _quiet:
        _mute()


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Libraries quiet for the duration (building the tiny models: their chatter is never of use), then as
    they were."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in (tlog, dlog)]
    _mute()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level, bars in saved:
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()
