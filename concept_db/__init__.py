"""The concept database: concepts, reference images, embeddings and learned tensors, scoped by owner.

The store and its backends arrive with the concept-database issue; this package is importable now so that the
distribution's layout is fixed from the start.
"""

__all__: list[str] = []
