"""Personalized pipelines: VLM answering (retrieval-augmented and learned concept tokens) and text-to-image.

The pipelines arrive with their issues; this package is importable now so that the distribution's layout is
fixed from the start.
"""

__all__: list[str] = []
