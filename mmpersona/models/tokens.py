"""Learned concept tokens in a loaded VLM: one `TokenManager` per model (`vlm.tokens`) adds concepts' tokens to
it and takes them away again, and reads and writes their rows in the concept database.

A concept gets an identifier token (its handle, `<bo>`) and k latent tokens (`<bo|0>` ... `<bo|k-1>`), unique
per concept, so several learned concepts can be loaded into one conversation. The rows are stored in the
concept database as safetensors, tagged with the model id and a tokenizer fingerprint; loading them into
another model fails clearly. Real checkpoints have more embedding rows than tokens (Qwen2.5-VL: 151,936 rows
for 151,665 tokens); new tokens take those unused rows first, the matrix only ever grows, and `unload_all` puts
back every original row and the original size, so outputs are exactly what they were.

This is the model's side (its vocabulary and rows), so it lives with the loaded model; learning the rows is a
training loop, in `pipelines.tokens`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..errors import MmpersonaError

if TYPE_CHECKING:
    import torch

    from concept_db import Concept

    from ..conceptdb import ConceptDB
    from .loaders import LoadedVLM

TENSOR_NAME = "vlm_tokens"
#: working tokenizers (base + one set of concept tokens) kept per model, so switching back and forth between
#: the same concepts does not copy the tokenizer again
TOKENIZER_CACHE = 8


class TokenMismatchError(MmpersonaError):
    """Learned tokens were trained for another model or tokenizer."""


def token_strings(concept: "Concept", k: int) -> list[str]:
    """The identifier token followed by the k latent tokens (joined without spaces in prompts)."""
    return [concept.handle] + [f"<{concept.name}|{i}>" for i in range(k)]


def tokenizer_fingerprint(tokenizer: Any, vocab: dict[str, int] | None = None) -> str:
    """A hash of the base vocabulary (added concept tokens excluded): rows only fit the same tokenizer.
    `vocab`: the tokenizer's `get_vocab()` when the caller has it already (151k entries for Qwen)."""
    items = sorted((vocab if vocab is not None else tokenizer.get_vocab()).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:32]


def row_stats(weight: "torch.Tensor", n: int, chunk: int = 16384) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Float32 mean and std of the first `n` rows, in chunks (no float32 copy of a whole bf16 matrix)."""
    import torch

    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    squares = torch.zeros_like(total)
    with torch.no_grad():
        for start in range(0, n, chunk):
            rows = weight[start : min(n, start + chunk)].float()
            total += rows.sum(0)
            squares += (rows * rows).sum(0)
    mean = total / n
    return mean, (squares / n - mean * mean).clamp_min(0).sqrt()


class TokenManager:
    """Adds concepts' tokens to a loaded VLM and takes them away again; one per `LoadedVLM` (`vlm.tokens`).

    The original tokenizer is never changed: concepts are added to a copy made for that set of concepts
    (cached), and `unload_all` puts the original back. Original embedding rows that new tokens occupy are kept
    and restored, and a matrix that had to grow is cut back to its original size.
    """

    def __new__(cls, vlm: "LoadedVLM"):
        existing = getattr(vlm, "_token_manager", None)
        if isinstance(existing, cls):  # one manager per model: a second one would fight over its rows
            return existing
        return super().__new__(cls)

    def __init__(self, vlm: "LoadedVLM"):
        if getattr(self, "vlm", None) is vlm:
            return
        self.vlm = vlm
        self.base_tokenizer = vlm.processor.tokenizer
        emb = vlm.model.get_input_embeddings().weight
        self.base_rows = emb.shape[0]
        self.base_vocab = len(self.base_tokenizer)  # the first id new tokens get
        self._base_vocab = self.base_tokenizer.get_vocab()  # read once: the base tokenizer never changes
        self.fingerprint = tokenizer_fingerprint(self.base_tokenizer, self._base_vocab)
        self.loaded: dict[str, list[str]] = {}  # concept id -> its tokens, in load order
        self.trained: dict[str, dict[str, "torch.Tensor"]] = {}  # float32 rows learned in this process
        self._saved: dict[str, "torch.Tensor"] = {}  # original rows from base_vocab on, per matrix
        self._tokenizers: "OrderedDict[tuple[str, ...], Any]" = OrderedDict()
        vlm._token_manager = self

    @property
    def tied(self) -> bool:
        """Whether the LM head is the input embedding (one Parameter: Qwen) or a matrix of its own (LLaVA).
        Compared by identity, not by storage address (tensor subclasses and sharded weights have none)."""
        model = self.vlm.model
        out = model.get_output_embeddings()
        return out is None or out.weight is model.get_input_embeddings().weight

    def _matrices(self) -> dict[str, "torch.Tensor"]:
        model = self.vlm.model
        out = {"input_embeddings": model.get_input_embeddings().weight}
        if not self.tied:
            out["lm_head"] = model.get_output_embeddings().weight
        return out

    def _tokenizer_for(self, tokens: tuple[str, ...]) -> Any:
        tok = self._tokenizers.get(tokens)
        if tok is None:
            tok = copy.deepcopy(self.base_tokenizer)
            # not special: answers are decoded without the model's special tokens, and a handle must stay
            tok.add_tokens(list(tokens), special_tokens=False)
            self._tokenizers[tokens] = tok
            while len(self._tokenizers) > TOKENIZER_CACHE:
                self._tokenizers.popitem(last=False)
        self._tokenizers.move_to_end(tokens)
        return tok

    def _add(self, tokens: list[str]) -> list[int]:
        taken = [t for t in tokens if t in self._base_vocab or any(t in ts for ts in self.loaded.values())]
        if taken:
            raise MmpersonaError(f"tokens {taken} are already in the vocabulary (another concept named alike is "
                                 "loaded, or the name clashes with a model token)")
        if not self._saved:
            for name, weight in self._matrices().items():
                self._saved[name] = weight[self.base_vocab:].detach().clone()
        everything = tuple(t for ts in self.loaded.values() for t in ts) + tuple(tokens)
        tok = self._tokenizer_for(everything)
        rows = self.vlm.model.get_input_embeddings().weight.shape[0]
        if len(tok) > rows:  # past the unused rows: grow (never shrink: that would drop rows the model uses)
            self.vlm.model.resize_token_embeddings(len(tok), mean_resizing=False)
        self.vlm.processor.tokenizer = tok
        ids = tok.convert_tokens_to_ids(tokens)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise MmpersonaError(f"the tokens of one concept did not get consecutive ids: {ids}")
        return ids

    def add_concept(self, concept: "Concept", k: int, *, seed: int = 0) -> list[int]:
        """New tokens for `concept`, rows drawn from the embedding statistics (seeded) as float32 tensors on
        the model's device, kept in `trained` and written into the model."""
        import torch

        tokens = token_strings(concept, k)
        ids = self._add(tokens)
        g = torch.Generator().manual_seed(seed)
        rows = {}
        for name, weight in self._matrices().items():
            mean, std = row_stats(weight, self.base_vocab)
            noise = torch.randn(len(ids), weight.shape[1], generator=g).to(weight.device)
            rows[name] = mean + std * noise
        self.loaded[concept.id] = tokens
        self.trained[concept.id] = rows
        self.write_rows(concept)
        return ids

    def ids(self, concept: "Concept") -> list[int]:
        return self.vlm.processor.tokenizer.convert_tokens_to_ids(self.loaded[concept.id])

    def write_rows(self, concept: "Concept", rows: dict[str, "torch.Tensor"] | None = None) -> None:
        """Write float32 `rows` (default: the trained ones) into the model's matrices, in the model's dtype."""
        import torch

        rows = rows if rows is not None else self.trained[concept.id]
        ids = self.ids(concept)
        with torch.no_grad():
            for name, weight in self._matrices().items():
                weight[ids] = rows[name].to(weight.device, weight.dtype)

    def rows(self, concept: "Concept") -> dict[str, "torch.Tensor"]:
        """The concept's rows as CPU float32 tensors (the float32 training values when learned here)."""
        if concept.id in self.trained:
            return {k: v.detach().float().cpu() for k, v in self.trained[concept.id].items()}
        ids = self.ids(concept)
        return {name: weight[ids].detach().float().cpu() for name, weight in self._matrices().items()}

    def save(self, db: "ConceptDB", user: str, concept: "Concept") -> None:
        """Store the concept's rows as safetensors in the concept database."""
        from safetensors.torch import save

        tokens = self.loaded[concept.id]
        data = save({k: v.contiguous() for k, v in self.rows(concept).items()},
                    metadata={"tokens": json.dumps(tokens), "model": self.vlm.spec.id,
                              "fingerprint": self.fingerprint, "tied": str(self.tied)})
        db.store.put_tensor(user, concept.id, TENSOR_NAME, data, model=self.vlm.spec.id, fingerprint=self.fingerprint)

    def load(self, db: "ConceptDB", user: str, concept: "Concept") -> list[str]:
        """Load a concept's stored tokens into the model (no-op if loaded); checks model and tokenizer."""
        from safetensors.torch import load as load_tensors
        from safetensors import SafetensorError

        if concept.id in self.loaded:
            return self.loaded[concept.id]
        stored = db.store.get_tensor(user, concept.id, TENSOR_NAME)
        if stored.model != self.vlm.spec.id or stored.fingerprint != self.fingerprint:
            raise TokenMismatchError(
                f"the learned tokens of {concept.handle} were trained for model {stored.model!r} (tokenizer "
                f"{stored.fingerprint[:8]}), not {self.vlm.spec.id!r} (tokenizer {self.fingerprint[:8]}); "
                f"learn them again with `mmpersona concepts learn {concept.name}`")
        try:
            rows = load_tensors(stored.data)
            meta = _safetensors_metadata(stored.data)
            tokens = json.loads(meta["tokens"])
        except (SafetensorError, KeyError, ValueError) as e:
            raise TokenMismatchError(f"the learned tokens of {concept.handle} are unreadable ({e}); learn them "
                                     f"again with `mmpersona concepts learn {concept.name}`") from e
        for name, weight in self._matrices().items():
            if name not in rows or tuple(rows[name].shape) != (len(tokens), weight.shape[1]):
                got = tuple(rows[name].shape) if name in rows else "missing"
                raise TokenMismatchError(f"the learned rows {name!r} of {concept.handle} have shape {got}, the "
                                         f"model needs ({len(tokens)}, {weight.shape[1]})")
        self._add(tokens)
        self.loaded[concept.id] = tokens
        self.write_rows(concept, rows)
        return tokens

    def unload_all(self) -> None:
        """Remove every added token: original tokenizer, rows and matrix size back."""
        import torch

        if not self.loaded and self.vlm.processor.tokenizer is self.base_tokenizer:
            return
        self.vlm.processor.tokenizer = self.base_tokenizer
        if self.vlm.model.get_input_embeddings().weight.shape[0] != self.base_rows:
            self.vlm.model.resize_token_embeddings(self.base_rows, mean_resizing=False)
        with torch.no_grad():
            for name, weight in self._matrices().items():
                weight[self.base_vocab:] = self._saved[name]
        self.loaded.clear()
        self.trained.clear()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (its JSON header), without writing it to a file."""
    if len(data) < 8:
        raise ValueError("too short for safetensors")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header longer than the data")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
