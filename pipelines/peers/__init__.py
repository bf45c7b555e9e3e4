"""The field's own benchmarks: the peers' dataset formats and scoring rules (RAP-MLLM, Yo'LLaVA, RePIC, ...),
reproduced exactly so that a number computed here is the number the peer's script prints. Sources and the
formats themselves: FORMATS.md in this folder."""

from .scoring import SCORERS, PredictionFormatError, score_file

__all__ = ["SCORERS", "PredictionFormatError", "score_file"]
