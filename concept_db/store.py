"""The protocol every concept database backend implements. Every call takes the owner first: nothing reads
or writes across owners."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from .types import Concept, Match, StoredTensor


@runtime_checkable
class ConceptStore(Protocol):
    def add(self, owner: str, name: str, *, category: str = "", info: str = "", aliases: Sequence[str] = (),
            attributes: dict | None = None, images: Sequence[bytes] = (),
            embeddings: "dict[str, np.ndarray] | None" = None) -> "Concept": ...

    def get(self, owner: str, concept_id: str) -> "Concept": ...

    def find(self, owner: str, name_or_alias: str) -> "Concept | None": ...

    def list(self, owner: str, *, category: str | None = None, limit: int = 100,
             offset: int = 0) -> "list[Concept]": ...

    def count(self, owner: str) -> int: ...

    def update(self, owner: str, concept_id: str, *, name: str | None = None, category: str | None = None,
               info: str | None = None, aliases: Sequence[str] | None = None, attributes: dict | None = None,
               expected_version: int | None = None) -> "Concept": ...

    def delete(self, owner: str, concept_id: str) -> None: ...

    def add_images(self, owner: str, concept_id: str, images: Sequence[bytes],
                   embeddings: "dict[str, np.ndarray] | None" = None) -> "Concept": ...

    def remove_image(self, owner: str, concept_id: str, image_hash: str) -> "Concept": ...

    def image_bytes(self, owner: str, image_hash: str) -> bytes: ...

    def known_vectors(self, embedder: str, hashes: Sequence[str]) -> "dict[str, np.ndarray]": ...

    def search(self, owner: str, vector: Any, *, embedder: str, k: int = 5, category: str | None = None,
               min_score: float | None = None) -> "list[Match]": ...

    def put_tensor(self, owner: str, concept_id: str, name: str, data: bytes, *, model: str,
                   fingerprint: str) -> None: ...

    def get_tensor(self, owner: str, concept_id: str, name: str) -> "StoredTensor": ...

    def erase_owner(self, owner: str) -> int: ...

    def close(self) -> None: ...
