"""Learned concept tokens (Yo'LLaVA style), with several concepts active at once.

A concept gets an identifier token (its handle, `<bo>`) and k latent tokens (`<bo|0>` ... `<bo|k-1>`), unique
per concept, so several learned concepts can be loaded into one conversation. Training freezes the whole VLM:
the concept's rows (input embedding, and LM head when the model does not tie them) are separate float32
tensors, the only parameters the optimizer sees, spliced into the model's embedding output and logits by
hooks. So no other weight can change, training works the same in bf16 or fp16 models (half-precision rows
would round a 1e-4 update away, and fp16 AdamW state divides 0 by 0), and optimizer state is a few KB
instead of two copies of a 151,936-row matrix. The rows are stored in the concept database as safetensors,
tagged with the model id and a tokenizer fingerprint; loading them into another model fails clearly.

One `TokenManager` belongs to each loaded VLM (`vlm.tokens`): what `learn_concept` leaves loaded is what the
pipeline answers with. The manager, the stored format and `TokenMismatchError` are the model's side and live in
`mmpersona.models.tokens` (re-exported here); this module learns the rows.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from mmpersona.errors import MmpersonaError
from mmpersona.models.tokens import TENSOR_NAME, TokenManager, TokenMismatchError

__all__ = ["RECOGNITION", "TENSOR_NAME", "LearnConfig", "LearnResult", "TokenManager", "TokenMismatchError",
           "latent_definition", "learn_concept", "learn_concepts", "recognition_accuracy"]

if TYPE_CHECKING:
    import torch

    from concept_db import Concept
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.images import ImageInput
    from mmpersona.models import LoadedVLM

logger = logging.getLogger(__name__)

RECOGNITION = "Is {handle} in this image? Answer yes or no."


@dataclass
class LearnConfig:
    """How to learn one concept's tokens.

    Args:
        tokens: latent tokens per concept (k).
        steps: training steps at most (one example per step).
        lr: AdamW learning rate for the new rows (float32 whatever the model's dtype).
        eval_every: steps between early-stopping checks of training recognition accuracy.
        patience: consecutive checks at full accuracy before stopping.
        seed: makes example order and initial rows reproducible.
        mixed_precision: "no", "fp16" or "bf16": autocast the frozen model's forward (the rows stay float32).
        gradient_checkpointing: recompute activations in the backward pass (much less memory on real models).
    """

    tokens: int = 16
    steps: int = 100
    lr: float = 1e-2
    eval_every: int = 10
    patience: int = 2
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise MmpersonaError("LearnConfig: tokens, steps, eval_every and patience must be at least 1")
        if not self.lr > 0:
            raise MmpersonaError(f"LearnConfig.lr must be positive, got {self.lr}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise MmpersonaError(f"LearnConfig.mixed_precision must be 'no', 'fp16' or 'bf16', "
                                 f"got {self.mixed_precision!r}")


@dataclass
class LearnResult:
    """What learning one concept did. `accuracy` is recognition accuracy on the training examples;
    `held_out_before` / `held_out_after` on images held out of training (its own and negatives), with the
    initial rows and with the learned ones: whether the tokens did anything (Yo'LLaVA #13). `together`: the
    concepts learned jointly with it."""

    concept: str
    steps: int
    losses: list[float] = field(default_factory=list)
    accuracy: float | None = None
    seconds: float = 0.0
    stopped_early: bool = False
    held_out_before: float | None = None
    held_out_after: float | None = None
    held_out_items: int = 0
    negatives: int = 0
    together: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "steps": self.steps, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "accuracy": self.accuracy,
                "seconds": round(self.seconds, 3), "stopped_early": self.stopped_early,
                "held_out_before": self.held_out_before, "held_out_after": self.held_out_after,
                "held_out_items": self.held_out_items, "negatives": self.negatives, "together": self.together}


def latent_definition(tokens: Sequence[str]) -> str:
    """Yo'LLaVA's system line: `<bo> is <bo|0><bo|1>...`."""
    return f"{tokens[0]} is {''.join(tokens[1:])}."


# ------------------------------------------------------------------------------------------ training


def _examples(concept: "Concept", positives: list, negatives: list,
              definition: str, *, describe: bool = True) -> list[tuple[list[dict], str]]:
    """(messages, answer) pairs: recognition on positives and negatives, and a description QA. `definition`:
    the system text defining the tokens of every concept learned together."""
    system = [{"role": "system", "content": [{"type": "text", "text": definition}]}]
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
    if concept.info and describe:
        out.append((system + [{"role": "user", "content": [{"type": "text",
                                                            "text": f"What do you know about {concept.handle}?"}]}],
                    f"{concept.handle} is {concept.info[:200]}"))
    return out


@dataclass
class _Encoded:
    """One training example, tokenized once: the full conversation, where the answer starts, and the prompt
    alone (for recognition checks)."""

    inputs: Any
    start: int
    prompt: Any
    answer: str

    @property
    def first_answer_id(self) -> int:
        return int(self.inputs["input_ids"][0, self.start])


def _encode(vlm: "LoadedVLM", messages: list[dict], answer: str) -> _Encoded:
    full = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    prompt = vlm.inputs(messages, add_generation_prompt=True)
    inputs = vlm.inputs(full, add_generation_prompt=False)
    ids, prefix = inputs["input_ids"][0], prompt["input_ids"][0]
    n = min(len(prefix), len(ids))
    same = (ids[:n] == prefix[:n]).int()
    start = int(same.argmin()) if not bool(same.all()) else n  # longest common prefix
    if start >= len(ids):
        raise MmpersonaError("the chat template renders no answer tokens for a training example")
    return _Encoded(inputs, start, prompt, answer)


def _keeps_logits(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def _answer_loss(model: Any, ex: _Encoded) -> "torch.Tensor":
    """Cross-entropy on the answer tokens, computing logits at those positions only (`logits_to_keep`): the
    full-vocabulary logits of a whole Qwen prompt would be ~150k floats per position."""
    import torch.nn.functional as F

    ids = ex.inputs["input_ids"]
    keep = ids.shape[1] - ex.start + 1  # position start-1 predicts the first answer token
    if _keeps_logits(model):
        logits = model(**ex.inputs, logits_to_keep=keep).logits
    else:
        logits = model(**ex.inputs).logits[:, -keep:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, ex.start:].reshape(-1))


def _last_logits(model: Any, inputs: Any) -> "torch.Tensor":
    if _keeps_logits(model):
        return model(**inputs, logits_to_keep=1).logits[0, -1]
    return model(**inputs).logits[0, -1]


def recognition_accuracy(vlm: "LoadedVLM", encoded: list[_Encoded]) -> float | None:
    """Share of recognition examples whose first answer token prefers the right one of Yes / No (the ids are
    the examples' own first answer tokens, so they are right for every tokenizer)."""
    import torch

    yes = next((e.first_answer_id for e in encoded if e.answer.startswith("Yes")), None)
    no = next((e.first_answer_id for e in encoded if e.answer.startswith("No")), None)
    right = total = 0
    for ex in encoded:
        if not ex.answer.startswith(("Yes", "No")):
            continue
        with torch.no_grad():
            logits = _last_logits(vlm.model, ex.prompt)
        if yes is None or no is None:  # only one kind of example: the right token must beat the rest
            wanted = ex.first_answer_id
            right += int(logits.argmax()) == wanted
        else:
            right += (logits[yes] > logits[no]).item() == ex.answer.startswith("Yes")
        total += 1
    return right / total if total else None


def _checkpointing(model: Any, on: bool | None = None) -> bool:
    """Turn activation (gradient) checkpointing on or off, or say whether it is on (transformers 5.24 renamed
    the methods; earlier 5.x releases have only the old names)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if on is None:
        return bool(model.is_activation_checkpointing if new else model.is_gradient_checkpointing)
    if on:  # non-reentrant: the frozen model's inputs need no grad for the rows' gradients to flow
        if new:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    return on


class _RowHooks:
    """Splices float32 trainable rows into a frozen model: the input-embedding output of the concept's ids and
    its logit columns (computed in float32 from the LM head's input)."""

    def __init__(self, manager: TokenManager, ids: list[int], rows: dict[str, "torch.Tensor"]):
        self.lo, self.hi = ids[0], ids[-1] + 1
        self.rows = rows
        model = manager.vlm.model
        self.handles = [model.get_input_embeddings().register_forward_hook(self._embed)]
        head = model.get_output_embeddings()
        self.head_rows = rows["input_embeddings"] if manager.tied else rows["lm_head"]
        self.handles.append(head.register_forward_hook(self._logits))

    def _embed(self, module, args, out):
        import torch

        ids = args[0]
        mask = (ids >= self.lo) & (ids < self.hi)
        if not bool(mask.any()):
            return out
        local = (ids - self.lo).clamp(0, self.hi - self.lo - 1)
        return torch.where(mask[..., None], self.rows["input_embeddings"][local].to(out.dtype), out)

    def _logits(self, module, args, out):
        import torch

        new = args[0].float() @ self.head_rows.t()
        out = out.float()
        return torch.cat([out[..., : self.lo], new, out[..., self.hi :]], dim=-1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def learn_concept(vlm: "LoadedVLM", db: "ConceptDB", user: str, name: str, *,
                  negatives: Sequence["ImageInput"] | None = None, config: LearnConfig | None = None,
                  progress: bool = True, save: bool = True, manager: TokenManager | None = None,
                  hard_negatives: Sequence["ImageInput"] = (), held_out: int = 0) -> LearnResult:
    """Learn `name`'s tokens from its reference images; store them in the database (unless `save=False`).

    Negatives: the given images, else the user's other concepts' images; `hard_negatives` (mined or generated,
    `pipelines.negatives`) are added to them. `held_out`: images of the concept and negatives kept out of
    training, on which recognition accuracy is measured before and after. The model's weights never change;
    the learned concept stays loaded in `vlm.tokens`, ready for `PersonalizedVLMPipeline(mode="tokens")`.
    """
    return learn_concepts(vlm, db, user, [name], negatives=negatives, config=config, progress=progress, save=save,
                          manager=manager, hard_negatives={name: hard_negatives} if hard_negatives else None,
                          held_out=held_out)[0]


def learn_concepts(vlm: "LoadedVLM", db: "ConceptDB", user: str, names: Sequence[str], *,
                   negatives: Sequence["ImageInput"] | None = None, config: LearnConfig | None = None,
                   progress: bool = True, save: bool = True, manager: TokenManager | None = None,
                   hard_negatives: "dict[str, Sequence[ImageInput]] | None" = None,
                   held_out: int = 0) -> list[LearnResult]:
    """Learn several concepts' tokens jointly (MC-LLaVA style): one system turn defines all their tokens, every
    step trains all their rows, and each concept's images are negatives for the others (as are `negatives`, or
    else the user's other concepts' images, and each concept's `hard_negatives`). With more than one concept,
    "which of them is here?" questions teach them apart. `held_out` images per concept (and per concept's
    negatives) are kept out of training and scored before and after. Returns one result per concept."""
    import contextlib

    import torch
    from tqdm.auto import tqdm

    from mmpersona.images import load_image

    config = config or LearnConfig()
    if held_out < 0:
        raise MmpersonaError(f"held_out must not be negative, got {held_out}")
    concepts = list({c.id: c for c in (db.resolve(user, n) for n in names)}.values())
    if not concepts:
        raise MmpersonaError("name at least one concept to learn")
    manager = manager or vlm.tokens
    for c in concepts:
        if not c.images:
            raise MmpersonaError(f"{c.handle} has no reference images to learn from")
        if c.id in manager.loaded:
            raise MmpersonaError(f"{c.handle} is loaded already: unload before learning it again")
    unknown = set(hard_negatives or {}) - {n for n in names}
    if unknown:
        raise MmpersonaError(f"hard negatives for {sorted(unknown)[0]!r}, which is not being learned")

    def split(images: list) -> tuple[list, list]:  # (train, held out): at least one stays in training
        return (images[:-held_out], images[-held_out:]) if held_out and len(images) > held_out else (images, [])

    group = {c.id for c in concepts}
    if negatives is None:
        others = [c for c in db.list(user, limit=1000) if c.id not in group]
        shared = [load_image(db.store.image_bytes(user, c.images[0])) for c in others if c.images][:10]
    else:
        shared = [load_image(n) for n in negatives]
    own = {c.id: split([load_image(db.store.image_bytes(user, h)) for h in c.images]) for c in concepts}
    by_name = {db.resolve(user, n).id: list(v) for n, v in (hard_negatives or {}).items()}
    negs = {}
    for c in concepts:
        mates = [img for o in concepts if o.id != c.id for img in own[o.id][0]]
        hard = [load_image(x) for x in by_name.get(c.id, [])]
        negs[c.id] = split(shared + hard) if held_out else (shared + hard, [])
        negs[c.id] = (negs[c.id][0] + mates, negs[c.id][1])
    for i, c in enumerate(concepts):
        manager.add_concept(c, config.tokens, seed=config.seed + i)
    ids = {c.id: manager.ids(c) for c in concepts}
    definition = "\n".join(latent_definition(manager.loaded[c.id]) for c in concepts)
    examples = []
    for c in concepts:
        examples += _examples(c, own[c.id][0], negs[c.id][0], definition)
    if len(concepts) > 1:  # tell them apart: which of them is in this image
        handles = ", ".join(c.handle for c in concepts)
        system = [{"role": "system", "content": [{"type": "text", "text": definition}]}]
        for c in concepts:
            for img in own[c.id][0]:
                examples.append((system + [{"role": "user", "content": [
                    {"type": "image", "image": img},
                    {"type": "text", "text": f"Which of {handles} is in this image?"}]}], f"{c.handle}."))
    encoded = [_encode(vlm, m, a) for m, a in examples]  # tokenized once, images resized once
    held = {c.id: [_encode(vlm, m, a) for m, a in _examples(c, own[c.id][1], negs[c.id][1], definition,
                                                               describe=False)] for c in concepts}
    results = {c.id: LearnResult(c.handle, 0, negatives=len(negs[c.id][0]),
                                 together=[o.handle for o in concepts if o.id != c.id]) for c in concepts}
    for c in concepts:
        results[c.id].held_out_items = len(held[c.id])
        results[c.id].held_out_before = recognition_accuracy(vlm, held[c.id]) if held[c.id] else None

    model = vlm.model
    rows = {c.id: manager.trained[c.id] for c in concepts}
    params = [p for r in rows.values() for p in r.values()]
    for p in params:
        p.requires_grad_(True)
    model.requires_grad_(False)
    hooks = [_RowHooks(manager, ids[c.id], rows[c.id]) for c in concepts]
    checkpointing = config.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    was_checkpointing = checkpointing and _checkpointing(model)
    if checkpointing and not was_checkpointing:
        _checkpointing(model, True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)  # float32 rows, float32 state
    autocast = (torch.autocast(vlm.device.type, dtype=torch.float16 if config.mixed_precision == "fp16"
                               else torch.bfloat16) if config.mixed_precision != "no" else contextlib.nullcontext())
    order = list(range(len(encoded)))
    rng = random.Random(config.seed)
    label = concepts[0].handle if len(concepts) == 1 else f"{len(concepts)} concepts"
    result = LearnResult(label, 0)
    start = time.perf_counter()
    perfect = 0
    bar = tqdm(range(config.steps), desc=f"learning {label}", disable=not progress, unit="step")
    try:
        model.train()
        for step in bar:
            if step % len(order) == 0:
                rng.shuffle(order)
            with autocast:
                loss = _answer_loss(model, encoded[order[step % len(order)]])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            result.losses.append(value)
            result.steps = step + 1
            if not math.isfinite(value):
                raise MmpersonaError(
                    f"training {label} diverged: the loss became {value} at step {step + 1} with the model "
                    f"in {str(vlm.dtype).removeprefix('torch.')}; the learned rows are float32 already, so try "
                    "`--dtype float32`, fewer --tokens or a smaller --lr")
            bar.set_postfix(loss=f"{value:.3f}")
            if (step + 1) % config.eval_every == 0:
                model.eval()
                result.accuracy = recognition_accuracy(vlm, encoded)
                model.train()
                perfect = perfect + 1 if result.accuracy == 1.0 else 0
                if perfect >= config.patience:
                    result.stopped_early = True
                    break
        model.eval()
        if result.accuracy is None or not result.stopped_early:
            result.accuracy = recognition_accuracy(vlm, encoded)
        for c in concepts:  # with the learned rows, through the hooks
            results[c.id].held_out_after = recognition_accuracy(vlm, held[c.id]) if held[c.id] else None
    except BaseException:
        for h in hooks:
            h.remove()
        manager.unload_all()  # no half-trained rows stay in the model (other loaded concepts go too)
        raise
    finally:
        for h in hooks:
            h.remove()
        if checkpointing and not was_checkpointing:
            _checkpointing(model, False)
        model.eval()
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(False)
    seconds = time.perf_counter() - start
    out = []
    for c in concepts:
        manager.write_rows(c)
        r = results[c.id]
        r.steps, r.losses, r.accuracy = result.steps, result.losses, result.accuracy
        r.seconds, r.stopped_early = seconds, result.stopped_early
        if save:
            manager.save(db, user, c)
        out.append(r)
    return out
