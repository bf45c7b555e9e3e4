"""Learned concept tokens (Yo'LLaVA style), with several concepts active at once.

A concept gets an identifier token (its handle, `<bo>`) and k latent tokens (`<bo|0>` ... `<bo|k-1>`), unique
per concept, so several learned concepts can be loaded into one conversation. Training freezes the whole VLM
and updates only the new rows of the input embeddings and the LM head (a gradient mask keeps every other row
bit-identical; AdamW's weight decay is 0 so frozen rows cannot drift). The rows are stored in the concept
database as safetensors, tagged with the model id and a tokenizer fingerprint; loading them into another model
fails with a clear error. `TokenManager` loads concepts on demand and unloads them cleanly, restoring the
original vocabulary and outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from mmpersona.errors import MmpersonaError

if TYPE_CHECKING:
    from concept_db import Concept
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.images import ImageInput
    from mmpersona.models import LoadedVLM

logger = logging.getLogger(__name__)

TENSOR_NAME = "vlm_tokens"
RECOGNITION = "Is {handle} in this image? Answer yes or no."


class TokenMismatchError(MmpersonaError):
    """Learned tokens were trained for another model or tokenizer."""


@dataclass
class LearnConfig:
    """How to learn one concept's tokens.

    Args:
        tokens: latent tokens per concept (k).
        steps: training steps at most (one example per step).
        lr: AdamW learning rate for the new rows.
        eval_every: steps between early-stopping checks of training recognition accuracy.
        patience: consecutive checks at full accuracy before stopping.
        seed: makes example order and initial rows reproducible.
        mixed_precision: accelerate's "no", "fp16" or "bf16".
    """

    tokens: int = 16
    steps: int = 100
    lr: float = 1e-2
    eval_every: int = 10
    patience: int = 2
    seed: int = 0
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise MmpersonaError("LearnConfig: tokens, steps, eval_every and patience must be at least 1")
        if not self.lr > 0:
            raise MmpersonaError(f"LearnConfig.lr must be positive, got {self.lr}")


@dataclass
class LearnResult:
    concept: str
    steps: int
    losses: list[float] = field(default_factory=list)
    accuracy: float | None = None
    seconds: float = 0.0
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "steps": self.steps, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "accuracy": self.accuracy,
                "seconds": round(self.seconds, 3), "stopped_early": self.stopped_early}


def token_strings(concept: "Concept", k: int) -> list[str]:
    """The identifier token followed by the k latent tokens (joined without spaces in prompts)."""
    return [concept.handle] + [f"<{concept.name}|{i}>" for i in range(k)]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the base vocabulary (added concept tokens excluded): rows only fit the same tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:32]


def latent_definition(tokens: Sequence[str]) -> str:
    """Yo'LLaVA's system line: `<bo> is <bo|0><bo|1>...`."""
    return f"{tokens[0]} is {''.join(tokens[1:])}."


class TokenManager:
    """Adds concepts' tokens to a loaded VLM and takes them away again.

    The original tokenizer is kept untouched; loading works on a copy, and `unload_all` puts the original back
    and truncates the embeddings to the original vocabulary size, so outputs return to what they were.
    """

    def __init__(self, vlm: "LoadedVLM"):
        self.vlm = vlm
        self.base_tokenizer = vlm.processor.tokenizer
        self.base_vocab = self.vlm.model.get_input_embeddings().weight.shape[0]
        self.fingerprint = tokenizer_fingerprint(self.base_tokenizer)
        self.loaded: dict[str, list[str]] = {}  # concept id -> its tokens

    @property
    def tied(self) -> bool:
        model = self.vlm.model
        out = model.get_output_embeddings()
        return out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    def _add(self, tokens: list[str]) -> list[int]:
        taken = [t for t in tokens if t in self.vlm.processor.tokenizer.get_vocab()]
        if taken:
            raise MmpersonaError(f"tokens {taken} are already in the vocabulary (another concept named alike is "
                                 "loaded, or the name clashes with a model token)")
        if self.vlm.processor.tokenizer is self.base_tokenizer:
            self.vlm.processor.tokenizer = copy.deepcopy(self.base_tokenizer)
        tok = self.vlm.processor.tokenizer
        tok.add_tokens(tokens, special_tokens=True)
        self.vlm.model.resize_token_embeddings(len(tok), mean_resizing=False)
        return tok.convert_tokens_to_ids(tokens)

    def add_concept(self, concept: "Concept", k: int, *, seed: int = 0) -> list[int]:
        """New tokens for `concept`, rows initialised from the embedding statistics (seeded)."""
        import torch

        tokens = token_strings(concept, k)
        ids = self._add(tokens)
        emb = self.vlm.model.get_input_embeddings().weight
        g = torch.Generator().manual_seed(seed)
        base = emb[: self.base_vocab].detach().float()
        with torch.no_grad():
            init = base.mean(0) + base.std(0) * torch.randn(len(ids), base.shape[1], generator=g)
            emb[ids] = init.to(emb.dtype)
            if not self.tied:
                out = self.vlm.model.get_output_embeddings().weight
                out_base = out[: self.base_vocab].detach().float()
                out[ids] = (out_base.mean(0) + out_base.std(0) * torch.randn(len(ids), out.shape[1], generator=g)
                            ).to(out.dtype)
        self.loaded[concept.id] = tokens
        return ids

    def rows(self, concept: "Concept") -> dict[str, Any]:
        """The concept's learned rows as CPU float32 tensors."""
        ids = self.vlm.processor.tokenizer.convert_tokens_to_ids(self.loaded[concept.id])
        out = {"input_embeddings": self.vlm.model.get_input_embeddings().weight[ids].detach().float().cpu()}
        if not self.tied:
            out["lm_head"] = self.vlm.model.get_output_embeddings().weight[ids].detach().float().cpu()
        return out

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
        import torch
        from safetensors import safe_open

        if concept.id in self.loaded:
            return self.loaded[concept.id]
        stored = db.store.get_tensor(user, concept.id, TENSOR_NAME)
        if stored.model != self.vlm.spec.id or stored.fingerprint != self.fingerprint:
            raise TokenMismatchError(
                f"the learned tokens of {concept.handle} were trained for model {stored.model!r} (tokenizer "
                f"{stored.fingerprint[:8]}), not {self.vlm.spec.id!r} (tokenizer {self.fingerprint[:8]}); "
                f"learn them again with `mmpersona concepts learn {concept.name}`")
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "t.safetensors"
            path.write_bytes(stored.data)
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                rows = {k: f.get_tensor(k) for k in f.keys()}
        tokens = json.loads(meta["tokens"])
        emb = self.vlm.model.get_input_embeddings().weight
        if rows["input_embeddings"].shape != (len(tokens), emb.shape[1]):
            raise TokenMismatchError(f"the learned rows of {concept.handle} have shape "
                                     f"{tuple(rows['input_embeddings'].shape)}, the model needs (n, {emb.shape[1]})")
        ids = self._add(tokens)
        with torch.no_grad():
            emb = self.vlm.model.get_input_embeddings().weight
            emb[ids] = rows["input_embeddings"].to(emb.device, emb.dtype)
            if not self.tied:
                out = self.vlm.model.get_output_embeddings().weight
                out[ids] = rows["lm_head"].to(out.device, out.dtype)
        self.loaded[concept.id] = tokens
        return tokens

    def unload_all(self) -> None:
        """Remove every added token: original tokenizer back, embeddings truncated to the original vocabulary."""
        if not self.loaded and self.vlm.processor.tokenizer is self.base_tokenizer:
            return
        self.vlm.processor.tokenizer = self.base_tokenizer
        self.vlm.model.resize_token_embeddings(self.base_vocab, mean_resizing=False)
        self.loaded.clear()


# ------------------------------------------------------------------------------------------ training


def _examples(concept: "Concept", positives: list, negatives: list,
              tokens: list[str]) -> list[tuple[list[dict], str]]:
    """(messages, answer) pairs: recognition on positives and negatives, and a description QA."""
    system = [{"role": "system", "content": [{"type": "text", "text": latent_definition(tokens)}]}]
    q = RECOGNITION.format(handle=concept.handle)
    out = []
    for img in positives:
        out.append((system + [{"role": "user", "content": [{"type": "image", "image": img},
                                                           {"type": "text", "text": q}]}],
                    f"Yes, {concept.handle} is in this image."))
    for img in negatives:
        out.append((system + [{"role": "user", "content": [{"type": "image", "image": img},
                                                           {"type": "text", "text": q}]}],
                    f"No, {concept.handle} is not in this image."))
    if concept.info:
        out.append((system + [{"role": "user", "content": [{"type": "text",
                                                            "text": f"What do you know about {concept.handle}?"}]}],
                    f"{concept.handle} is {concept.info[:200]}"))
    return out


def _encode(vlm: "LoadedVLM", messages: list[dict], answer: str) -> dict:
    """Inputs for one example with labels on the answer tokens only."""
    full = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    proc = vlm.processor
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    inputs = proc.apply_chat_template(full, tokenize=True, return_dict=True, return_tensors="pt")
    ids, prefix = inputs["input_ids"][0], prompt["input_ids"][0]
    n = min(len(prefix), len(ids))
    same = (ids[:n] == prefix[:n]).int()
    start = int(same.argmin()) if not bool(same.all()) else n  # longest common prefix
    labels = inputs["input_ids"].clone()
    labels[:, :start] = -100
    inputs["labels"] = labels
    return inputs.to(vlm.device)


def _yes_no_ids(tokenizer: Any) -> tuple[int, int]:
    return tokenizer.encode("Yes", add_special_tokens=False)[0], tokenizer.encode("No", add_special_tokens=False)[0]


def recognition_accuracy(vlm: "LoadedVLM", examples: list[tuple[list[dict], str]]) -> float | None:
    """Share of recognition examples whose first answer token prefers the right one of Yes / No."""
    import torch

    yes, no = _yes_no_ids(vlm.processor.tokenizer)
    right = total = 0
    for messages, answer in examples:
        if not answer.startswith(("Yes", "No")):
            continue
        inputs = vlm.inputs(messages)
        with torch.inference_mode():
            logits = vlm.model(**inputs).logits[0, -1]
        right += (logits[yes] > logits[no]).item() == answer.startswith("Yes")
        total += 1
    return right / total if total else None


def learn_concept(vlm: "LoadedVLM", db: "ConceptDB", user: str, name: str, *,
                  negatives: Sequence["ImageInput"] | None = None, config: LearnConfig | None = None,
                  progress: bool = True, save: bool = True, manager: TokenManager | None = None) -> LearnResult:
    """Learn `name`'s tokens from its reference images; store them in the database (unless `save=False`).

    Negatives: the given images, else the user's other concepts' images. The model's other weights never change.
    """
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from mmpersona.images import load_image

    config = config or LearnConfig()
    concept = db.resolve(user, name)
    if not concept.images:
        raise MmpersonaError(f"{concept.handle} has no reference images to learn from")
    positives = [load_image(db.store.image_bytes(user, h)) for h in concept.images]
    if negatives is None:
        others = [c for c in db.list(user, limit=1000) if c.id != concept.id]
        negatives_imgs = [load_image(db.store.image_bytes(user, c.images[0])) for c in others if c.images][:10]
    else:
        negatives_imgs = [load_image(n) for n in negatives]
    manager = manager or TokenManager(vlm)
    if concept.id in manager.loaded:
        raise MmpersonaError(f"{concept.handle} is loaded already: unload before learning it again")
    ids = manager.add_concept(concept, config.tokens, seed=config.seed)
    tokens = manager.loaded[concept.id]
    examples = _examples(concept, positives, negatives_imgs, tokens)
    encoded = [_encode(vlm, m, a) for m, a in examples]

    model = vlm.model
    model.requires_grad_(False)
    params = [model.get_input_embeddings().weight]
    if not manager.tied:
        params.append(model.get_output_embeddings().weight)
    mask = torch.zeros(params[0].shape[0], 1, device=params[0].device, dtype=params[0].dtype)
    mask[ids] = 1
    hooks = []
    for p in params:
        p.requires_grad_(True)
        hooks.append(p.register_hook(lambda grad: grad * mask.to(grad.dtype)))
    accelerator = Accelerator(cpu=vlm.device.type == "cpu", mixed_precision=config.mixed_precision)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)  # decay would move frozen rows
    model, optimizer = accelerator.prepare(model, optimizer)
    order = list(range(len(encoded)))
    rng = random.Random(config.seed)
    result = LearnResult(concept.handle, 0)
    start = time.perf_counter()
    perfect = 0
    bar = tqdm(range(config.steps), desc=f"learning {concept.handle}", disable=not progress, unit="step")
    try:
        model.train()
        for step in bar:
            if step % len(order) == 0:
                rng.shuffle(order)
            batch = encoded[order[step % len(order)]]
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(loss.detach()))
            result.steps = step + 1
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
            if (step + 1) % config.eval_every == 0:
                model.eval()
                result.accuracy = recognition_accuracy(vlm, examples)
                model.train()
                perfect = perfect + 1 if result.accuracy == 1.0 else 0
                if perfect >= config.patience:
                    result.stopped_early = True
                    break
    finally:
        for h in hooks:
            h.remove()
        model.eval()
        model.requires_grad_(False)
    if result.accuracy is None or not result.stopped_early:
        result.accuracy = recognition_accuracy(vlm, examples)
    result.seconds = time.perf_counter() - start
    if not all(math.isfinite(x) for x in result.losses):
        raise MmpersonaError(f"training {concept.handle} diverged (non-finite loss); try a smaller --lr")
    if save:
        manager.save(db, user, concept)
    return result
