"""Training the preference adapter once, across many users, with a multi-user Diffusion-DPO objective (PPD style).

    rows = read_pickapic(["train-00000.parquet"]) + rows_from_db(db)
    result = train_adapter(t2i, db.embedder, rows, "runs/adapter", AdapterTrainConfig(steps=2000))

Each step takes a batch of training users; for each, `context` of their pairs make the user embedding
(`mmpersona.user_embedding.RULE`, as a new user's pairs will at generation time) and another of their pairs is the
DPO target. The policy is the frozen UNet with the adapter's tokens appended to the prompt; the reference is the
same UNet on the prompt alone (vanilla generation), so only the adapter learns:

    loss = -log sigmoid(-beta / 2 * ((e_w - e_w_ref) - (e_l - e_l_ref)))

Held-out users (a share of users, picked by a hash of their id so that it is the same every run) are never
trained on; `heldout_pair_accuracy` is the DPO implicit preference accuracy on their pairs, their embedding made
from `context` pairs and the rest scored.

What real runs need, and this does: accelerate (several GPUs: each process draws its own users, the adapter is
data-parallel; `mixed_precision`), defaults that fit one GPU (micro-batches of 4 users, gradient accumulation to
32 per step, gradient checkpointing in the UNet), the adapter and its optimizer state in float32 whatever the
UNet's dtype, training noise from DDPM (SDXL samples with Euler), the VAE in float32 a few images at a time, the
prepared data on the CPU and cached on disk (each process prepares its share), SDXL time ids from each image's
own size and crop, the IP-Adapter (if loaded) at 0 as generation without liked images has it, a progress bar,
and checkpoints every `checkpoint_every` steps (safetensors + JSON) from which a run resumes and continues
exactly as if it had not stopped (each micro-batch's randomness comes from (seed, step, micro-batch)).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from mmpersona.errors import MmpersonaError

from .preference_adapter import PreferenceAdapter, append_tokens, encode

if TYPE_CHECKING:
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.models import LoadedT2I

logger = logging.getLogger(__name__)
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "user_id")
CHECKPOINT = "checkpoint"
PREPARED = "prepared"  # the prepared training data, by its digest (read again on resume)


@dataclass(frozen=True)
class PairRow:
    """One pairwise choice: for `prompt`, `user` preferred the image `chosen` to `rejected` (encoded bytes)."""

    user: str
    prompt: str
    chosen: bytes
    rejected: bytes


def read_pickapic(paths: Iterable["str | Path"], *, limit: int | None = None) -> list[PairRow]:
    """Rows of Pick-a-Pic's parquet layout (`caption`, `jpg_0`, `jpg_1`, `label_0`, `user_id`); ties
    (label_0 = 0.5) carry no preference and are skipped. Users are prefixed `pickapic:` to stay apart from ours."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        from mmpersona.errors import MissingDependencyError

        raise MissingDependencyError("reading Pick-a-Pic parquet files needs pyarrow: "
                                     "pip install 'mmpersona[eval]'") from None
    rows: list[PairRow] = []
    for path in paths:
        path = Path(path)
        try:
            table = pq.ParquetFile(str(path))
        except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
            raise MmpersonaError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
        missing = [c for c in PICKAPIC_COLUMNS if c not in table.schema_arrow.names]
        if missing:
            raise MmpersonaError(f"{path} lacks Pick-a-Pic's columns {missing} (it has {table.schema_arrow.names})")
        for batch in table.iter_batches(columns=list(PICKAPIC_COLUMNS), batch_size=256):
            data = batch.to_pydict()
            for i, (caption, a, b, label, user) in enumerate(zip(*(data[c] for c in PICKAPIC_COLUMNS), strict=True)):
                if label is None or a is None or b is None or user is None or float(label) == 0.5:
                    continue
                if not isinstance(a, bytes) or not isinstance(b, bytes):
                    raise MmpersonaError(f"{path}: jpg_0 / jpg_1 must hold image bytes (row {len(rows) + i})")
                chosen, rejected = (a, b) if float(label) > 0.5 else (b, a)
                rows.append(PairRow(f"pickapic:{user}", str(caption or ""), chosen, rejected))
                if limit is not None and len(rows) >= limit:
                    return rows
    return rows


def rows_from_db(db: "ConceptDB", users: Sequence[str] | None = None) -> list[PairRow]:
    """The pairwise choices in our own profiles (every user's, or `users`')."""
    store = db.store
    rows = []
    for user in users if users is not None else store.owners():
        for e in store.profile_events(user, "pair"):
            rows.append(PairRow(user, e.prompt, store.image_bytes(user, e.image), store.image_bytes(user, e.other)))
    return rows


@dataclass
class AdapterTrainConfig:
    """tokens / hidden: the adapter's size; steps: optimizer steps; batch_size: users per micro-batch per process
    (what memory holds at once: each is a chosen and a rejected sample kept for backward, plus the reference's
    two); gradient_accumulation: micro-batches per optimizer step (a step sees batch_size x
    gradient_accumulation x processes users); lr; beta: DPO strength; context: pairs per user embedding;
    heldout_users: share of users never trained on; resolution: training image size (None: the UNet's own);
    checkpoint_every: steps between checkpoints; eval_draws: noise draws per held-out pair; eval_batch_size:
    held-out pairs per UNet call; encode_batch_size: training images per VAE call when preparing.

    The defaults fit one 24 GB GPU for SD 1.5 at 512 px and one 80 GB GPU for SDXL at 1024 px (README, "What the
    defaults need"), as diffusers' and the Diffusion-DPO authors' scripts do: a few samples per GPU, gradient
    checkpointing, and gradient accumulation for a large step (32 users, as PPD's)."""

    tokens: int = 4
    hidden: int = 256
    steps: int = 1000
    batch_size: int = 4
    gradient_accumulation: int = 8
    lr: float = 1e-3
    beta: float = 1000.0
    context: int = 4
    heldout_users: float = 0.1
    resolution: int | None = None
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = True
    checkpoint_every: int = 200
    eval_draws: int = 16
    eval_batch_size: int = 4
    encode_batch_size: int = 2

    def __post_init__(self) -> None:
        for name in ("tokens", "hidden", "steps", "batch_size", "gradient_accumulation", "context",
                     "checkpoint_every", "eval_draws", "eval_batch_size", "encode_batch_size"):
            if getattr(self, name) < 1:
                raise MmpersonaError(f"AdapterTrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.heldout_users < 1.0:
            raise MmpersonaError(f"AdapterTrainConfig.heldout_users must be in [0, 1), got {self.heldout_users}")
        if not self.beta > 0 or not self.lr > 0:
            raise MmpersonaError("AdapterTrainConfig: beta and lr must be positive")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise MmpersonaError(f"AdapterTrainConfig.resolution must be a multiple of 8, got {self.resolution}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise MmpersonaError(f"AdapterTrainConfig.mixed_precision must be no, fp16 or bf16, "
                                 f"got {self.mixed_precision!r}")


#: fields that change neither the adapter a run trains nor its data (so a checkpoint resumes under other values)
NOT_THE_RUN = ("steps", "checkpoint_every", "eval_draws", "eval_batch_size", "encode_batch_size")


@dataclass
class AdapterTrainResult:
    path: str
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    train_users: int = 0
    heldout_users: list[str] = field(default_factory=list)
    heldout_pair_accuracy: float | None = None
    resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        tail = self.losses[-50:]
        return {"path": self.path, "steps": self.steps, "resumed_from": self.resumed_from,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": sum(tail) / len(tail) if tail else None, "seconds": round(self.seconds, 3),
                "train_users": self.train_users, "heldout_users": len(self.heldout_users),
                "heldout_pair_accuracy": self.heldout_pair_accuracy}


def split_users(users: Iterable[str], share: float) -> tuple[list[str], list[str]]:
    """(train, held out): the held-out users are those first by a hash of their id; the same every run."""
    ordered = sorted(set(users), key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    n = math.ceil(share * len(ordered)) if share > 0 and len(ordered) > 1 else 0
    return sorted(ordered[n:]), sorted(ordered[:n])


# ------------------------------------------------------------------------------------------ data, prepared once


PREPARED_FORMAT = 1


def square_crop(image: Any, size: int) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """`image` with its short side resized to `size` and the middle `size` x `size` cropped (the aspect ratio
    kept, as diffusers' DPO scripts do); returns it with the original size (h, w) and the crop's top-left
    (top, left): SDXL's micro-conditioning (`time_ids`) takes both."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image.crop((left, top, left + size, top + size)), (h, w), (top, left)


class Prepared:
    """Everything the loss needs, computed once: per image its latent, embedder vector and (SDXL) time ids; per
    prompt its conditioning; per user the indices of their pairs.

    At real sizes this is the heavy part of a run: the VAE encodes `encode_batch_size` images at a time (in float32,
    about 2.6 GiB per 1024 px image), and everything it makes is kept on the CPU (each step moves only its batch
    to the device: the latents of 100,000 SDXL images are about 25 GiB). With `cache` (a folder), it is written
    there by the data's digest, so a resumed run reads it back; with several processes (`state`), each prepares
    its share (every N-th image and prompt), and all read every share."""

    def __init__(self, t2i: "LoadedT2I", embedder: Any, rows: Sequence[PairRow], resolution: int | None,
                 progress: bool, *, cache: "str | Path | None" = None, state: Any = None, encode_batch_size: int = 2):

        pipe = t2i.pipeline
        self.t2i = t2i
        self.size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        index: dict[str, int] = {}
        blobs: list[bytes] = []
        self.pairs: list[tuple[int, int, int]] = []  # (chosen image, rejected image, prompt)
        prompts: dict[str, int] = {}
        self.by_user: dict[str, list[int]] = {}
        digest = hashlib.sha256()  # of the data itself: a checkpoint resumes only the run that made it
        for row in rows:
            ids = []
            for data in (row.chosen, row.rejected):
                h = hashlib.sha256(data).hexdigest()
                digest.update(f"{row.user}\0{row.prompt}\0{h}\0".encode())
                if h not in index:
                    index[h] = len(blobs)
                    blobs.append(data)
                ids.append(index[h])
            if ids[0] == ids[1]:
                continue
            p = prompts.setdefault(row.prompt, len(prompts))
            self.by_user.setdefault(row.user, []).append(len(self.pairs))
            self.pairs.append((ids[0], ids[1], p))
        self.digest = digest.hexdigest()
        self.texts = list(prompts)
        rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
        dtype = pipe.unet.dtype
        key = hashlib.sha256(json.dumps([PREPARED_FORMAT, self.digest, t2i.spec.id, embedder.name, self.size,
                                         str(dtype)]).encode()).hexdigest()[:32]
        folder = Path(cache) / key if cache is not None else None
        mine = None
        if folder is None or _complete_parts(folder) is None:
            if world > 1 and folder is None:
                rank, world = 0, 1  # nowhere to share through: each process prepares everything
            mine = self._prepare(embedder, blobs, range(rank, len(blobs), world), range(rank, len(self.texts), world),
                                 progress, encode_batch_size)
            if folder is not None:
                _write_part(folder, rank, world, mine)
        if state is not None and state.num_processes > 1:
            state.wait_for_everyone()  # every process, whichever way it went: the others may be writing
        if folder is None:
            self._assemble([mine], len(blobs))
            return
        files = _complete_parts(folder)
        if files is None:
            raise MmpersonaError(f"the prepared training data in {folder} is incomplete after every process "
                                 "wrote its share (is the folder shared by all processes?)")
        self._assemble([_read_part(f) for f in files], len(blobs))

    def _prepare(self, embedder: Any, blobs: list[bytes], images: range, texts: range, progress: bool,
                 encode_batch_size: int) -> dict:
        """This process's share, on the CPU: image indices, latents, vectors and time ids; prompt indices and
        their embeddings."""
        import numpy as np
        import torch
        from tqdm.auto import tqdm

        from mmpersona.images import load_image

        from .dpo import vae_in_float32

        t2i, pipe = self.t2i, self.t2i.pipeline
        vae, dtype, device = pipe.vae, pipe.unet.dtype, t2i.device
        ids = list(images)
        vectors = (np.asarray(embedder.embed_images([blobs[i] for i in ids], progress=progress), np.float32)
                   if ids else np.zeros((0, int(embedder.dim)), np.float32))
        latents, time_ids = [], []
        with vae_in_float32(vae), torch.no_grad():
            for start in tqdm(range(0, len(ids), encode_batch_size), desc="encoding training images",
                              disable=not progress):
                crops = [square_crop(load_image(blobs[i]), self.size) for i in ids[start:start + encode_batch_size]]
                x = pipe.image_processor.preprocess([c[0] for c in crops], height=self.size, width=self.size)
                z = vae.encode(x.to(device, torch.float32)).latent_dist.mean * vae.config.scaling_factor
                if not bool(torch.isfinite(z).all()):
                    raise MmpersonaError("the VAE gave non-finite latents for a training image")
                latents.append(z.to(dtype).cpu())
                if t2i.is_xl:  # each image's true original size and crop, as SDXL was trained
                    for _, original, corner in crops:
                        time_ids.append(pipe._get_add_time_ids(
                            original, corner, (self.size, self.size), dtype=torch.float32,
                            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim))
        shape = (0, vae.config.latent_channels, self.size // pipe.vae_scale_factor,
                 self.size // pipe.vae_scale_factor)
        out = {"images": torch.tensor(ids, dtype=torch.int64),
               "latents": torch.cat(latents) if latents else torch.zeros(shape, dtype=dtype),
               "vectors": torch.from_numpy(vectors.reshape(len(ids), -1))}
        if t2i.is_xl:
            out["time_ids"] = torch.cat(time_ids) if time_ids else torch.zeros(0, 6)
        prompt_ids = list(texts)
        embeds, pooled = [], []
        for start in range(0, len(prompt_ids), 32):
            pe, _, pool, _ = encode(t2i, [self.texts[i] for i in prompt_ids[start:start + 32]], None, cfg=False)
            embeds.append(pe.to(dtype).cpu())
            if pool is not None:
                pooled.append(pool.to(dtype).cpu())
        out["prompts"] = torch.tensor(prompt_ids, dtype=torch.int64)
        if embeds:
            out["embeds"] = torch.cat(embeds)
            if pooled:
                out["pooled"] = torch.cat(pooled)
        return out

    def _assemble(self, parts: list[dict], n_images: int) -> None:
        """The shares put back in the global order of images and prompts."""
        import torch

        def gather(name: str, order: str, n: int):
            have = [p for p in parts if name in p and len(p[order])]
            if not have:
                return None
            index = torch.cat([p[order] for p in have])
            values = torch.cat([p[name] for p in have])
            if sorted(index.tolist()) != list(range(n)):
                raise MmpersonaError(f"the prepared training data does not cover every {order[:-1]}")
            out = torch.empty_like(values)
            out[index] = values
            return out

        n_texts = len(self.texts)
        self.latents = gather("latents", "images", n_images)
        self.vectors = gather("vectors", "images", n_images).numpy()
        self.time_ids = gather("time_ids", "images", n_images) if self.t2i.is_xl else None
        self.embeds = gather("embeds", "prompts", n_texts)
        self.pooled = gather("pooled", "prompts", n_texts)

    def embedding(self, pair_ids: Sequence[int]):
        """The user embedding (`RULE`) of these pairs."""
        from mmpersona.user_embedding import user_embedding

        c = self.vectors[[self.pairs[i][0] for i in pair_ids]]
        r = self.vectors[[self.pairs[i][1] for i in pair_ids]]
        u = user_embedding(c, r)
        return u if u is not None else (c[0] * 0)


def _write_part(folder: Path, rank: int, world: int, part: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{rank}-of-{world}.safetensors"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in part.items()}, str(tmp))
    os.replace(tmp, path)  # whole or absent


def _read_part(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _complete_parts(folder: Path) -> list[Path] | None:
    """The files of one complete set of shares in `folder` (from a run with any number of processes), or None."""
    if not folder.is_dir():
        return None
    sets: dict[int, dict[int, Path]] = {}
    for f in folder.glob("part-*-of-*.safetensors"):
        try:
            rank, world = (int(x) for x in f.name[len("part-"):-len(".safetensors")].split("-of-"))
        except ValueError:
            continue
        sets.setdefault(world, {})[rank] = f
    for world, have in sorted(sets.items()):
        if set(have) == set(range(world)):
            return [have[r] for r in range(world)]
    return None


def dpo_terms(prep: Prepared, adapter_module: Any, users_u: Any, targets: Sequence[int], timesteps: Any, noise: Any,
              scheduler: Any):
    """Per target pair: (e_w - e_w_ref) - (e_l - e_l_ref), the policy being the UNet with the adapter's tokens."""
    import torch
    import torch.nn.functional as F

    from .dpo import neutral_image_embeds

    pipe = prep.t2i.pipeline
    unet = pipe.unet
    device = prep.t2i.device
    b = len(targets)
    w = torch.tensor([prep.pairs[i][0] for i in targets])
    l_ = torch.tensor([prep.pairs[i][1] for i in targets])
    p = torch.tensor([prep.pairs[i][2] for i in targets])
    latents = torch.cat([prep.latents[w], prep.latents[l_]]).to(device)  # kept on the CPU: only the batch moves
    noise2 = torch.cat([noise, noise]).to(latents.dtype)
    t = torch.cat([timesteps, timesteps])
    noisy = scheduler.add_noise(latents, noise2, t)
    target = noise2 if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise2, t)
    text = prep.embeds[p].to(device)
    text_pooled = prep.pooled[p].to(device) if prep.pooled is not None else None
    time_ids = torch.cat([prep.time_ids[w], prep.time_ids[l_]]).to(device) if prep.time_ids is not None else None
    tokens, shift = adapter_module(users_u)
    pe, _, pooled, _ = append_tokens(tokens, shift, text, None, text_pooled)
    pe, pooled = torch.cat([pe, pe]), (torch.cat([pooled, pooled]) if pooled is not None else None)
    ref_pooled = torch.cat([text_pooled] * 2) if text_pooled is not None else None

    def added(pool):
        out = {}
        if pool is not None:
            out = {"text_embeds": pool, "time_ids": time_ids.to(pool.dtype)}
        neutral = neutral_image_embeds(pipe, len(noisy), noisy.device, noisy.dtype)
        if neutral is not None:
            out["image_embeds"] = neutral
        return out or None

    pred = unet(noisy, t, encoder_hidden_states=pe, added_cond_kwargs=added(pooled)).sample
    with torch.no_grad():
        ref = unet(noisy, t, encoder_hidden_states=torch.cat([text, text]), added_cond_kwargs=added(ref_pooled)).sample
    err = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    err_ref = F.mse_loss(ref.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (err[:b] - err_ref[:b]) - (err[b:] - err_ref[b:])


def _step_rng(seed: int, step: int, micro: int):
    """The randomness of one micro-batch: a function of (seed, step, micro-batch) alone, where micro-batch j of a
    step is process j // gradient_accumulation's (j % gradient_accumulation)-th. So a run resumes exactly, and N
    processes train the adapter that one process with N times the accumulation trains."""
    import torch

    key = int.from_bytes(hashlib.sha256(f"{seed}/{step}/{micro}".encode()).digest()[:8], "little")
    return random.Random(key), torch.Generator("cpu").manual_seed(key % (2**63))


def sample_batch(prep: Prepared, users: Sequence[str], config: AdapterTrainConfig, rng: random.Random):
    """Per drawn user (`batch_size` of them): the embedding of `context` of their pairs and another pair as the
    target."""
    import numpy as np

    us, targets = [], []
    for _ in range(config.batch_size):
        pairs = prep.by_user[users[rng.randrange(len(users))]]
        picked = rng.sample(pairs, min(len(pairs), config.context + 1))
        us.append(prep.embedding(picked[:-1]))
        targets.append(picked[-1])
    return np.stack(us), targets


# ------------------------------------------------------------------------------------------ checkpoints


def _save_checkpoint(folder: Path, adapter: PreferenceAdapter, optimizer: Any, state: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    adapter.save(folder)
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    save_file(tensors, str(folder / "optimizer.safetensors.tmp"))
    (folder / "optimizer.safetensors.tmp").replace(folder / "optimizer.safetensors")
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps({**state, "param_groups": groups}, indent=1))
    tmp.replace(folder / "state.json")  # written last: a checkpoint without it is ignored


def _load_checkpoint(folder: Path, optimizer: Any, device: Any) -> tuple[PreferenceAdapter, dict[str, Any]]:
    from safetensors.torch import load_file

    from mmpersona.safe_io import parse_json

    state = parse_json((folder / "state.json").read_bytes(), what="state.json")
    adapter = PreferenceAdapter.load(folder, device=device)
    tensors = load_file(str(folder / "optimizer.safetensors"))
    per: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        per.setdefault(int(i), {})[name] = value.to(device)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state.pop("param_groups")]
    optimizer_state = {"state": per, "param_groups": groups}
    return adapter, {**state, "optimizer": optimizer_state}


# ------------------------------------------------------------------------------------------ training


def train_adapter(t2i: "LoadedT2I", embedder: Any, rows: Sequence[PairRow], out_dir: "str | Path",
                  config: AdapterTrainConfig | None = None, *, heldout: Sequence[str] | None = None,
                  resume: bool = True, progress: bool = True) -> AdapterTrainResult:
    """Train (or resume training) the preference adapter on `rows`; saves it in `out_dir` and returns the result
    with the held-out users' implicit preference accuracy. `heldout`: these users instead of
    `config.heldout_users`' share."""
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .dpo import ip_adapter_scale, noise_scheduler

    config = config or AdapterTrainConfig()
    out = Path(out_dir)
    users_all = {}
    for row in rows:
        users_all[row.user] = users_all.get(row.user, 0) + 1
    usable = [u for u, n in users_all.items() if n >= config.context + 1]
    if len(usable) < 2:
        raise MmpersonaError(f"training the preference adapter needs at least 2 users with {config.context + 1} or "
                             f"more pairs each; these rows have {len(usable)}")
    if heldout is not None:
        heldout = sorted(set(heldout) & set(usable))
        train_users = sorted(set(usable) - set(heldout))
    else:
        train_users, heldout = split_users(usable, config.heldout_users)
    if not train_users:
        raise MmpersonaError("every user is held out: lower heldout_users")
    accelerator = Accelerator(cpu=t2i.device.type == "cpu", mixed_precision=config.mixed_precision,
                              device_placement=False)
    if accelerator.num_processes > 1 and t2i.device.type != "cpu" and t2i.device != accelerator.device:
        raise MmpersonaError(f"process {accelerator.process_index} has the pipeline on {t2i.device}, but its "
                             f"accelerator is {accelerator.device}: under `accelerate launch` load the models on "
                             "`mmpersona.devices.process_device()`'s device (the CLI does)")
    pipe = t2i.pipeline
    prep = Prepared(t2i, embedder, [r for r in rows if r.user in set(usable)], config.resolution,
                    progress and accelerator.is_main_process, cache=out / PREPARED, state=accelerator,
                    encode_batch_size=config.encode_batch_size)
    same_run = {k: v for k, v in asdict(config).items() if k not in NOT_THE_RUN}
    fingerprint = hashlib.sha256(json.dumps([same_run, t2i.spec.id, embedder.name, sorted(train_users),
                                             prep.digest]).encode()).hexdigest()
    adapter = PreferenceAdapter.for_pipeline(t2i, embedder, tokens=config.tokens, hidden=config.hidden,
                                             seed=config.seed)
    optimizer = torch.optim.AdamW(adapter.module.parameters(), lr=config.lr)
    result = AdapterTrainResult(str(out), 0, train_users=len(train_users), heldout_users=heldout)
    ckpt = out / CHECKPOINT
    if resume and (ckpt / "state.json").is_file():
        adapter, state = _load_checkpoint(ckpt, optimizer, t2i.device)
        if state.get("fingerprint") != fingerprint:
            raise MmpersonaError(f"{ckpt} was made by a different run (config, model, embedder or data differ): "
                                 "pass another --out, or --no-resume to start over")
        optimizer = torch.optim.AdamW(adapter.module.parameters(), lr=config.lr)
        optimizer.load_state_dict(state["optimizer"])
        result.steps = result.resumed_from = int(state["step"])
        result.losses = [float(x) for x in state["losses"]]
    module, optimizer = accelerator.prepare(adapter.module, optimizer)
    scheduler = noise_scheduler(pipe)
    unet = pipe.unet
    unet.requires_grad_(False)
    checkpointing = config.gradient_checkpointing and not unet.is_gradient_checkpointing
    if checkpointing:
        unet.enable_gradient_checkpointing()
    accumulation = config.gradient_accumulation
    start = time.perf_counter()
    # generation with `preference` and no liked images runs with the IP-Adapter at 0: train (and evaluate) there
    with ip_adapter_scale(pipe, 0.0):
        try:
            module.train()
            bar = tqdm(range(result.steps, config.steps), desc="preference adapter", unit="step",
                       disable=not progress or not accelerator.is_main_process, initial=result.steps,
                       total=config.steps)
            for step in bar:
                total = 0.0
                for k in range(accumulation):
                    rng, gen = _step_rng(config.seed, step, accelerator.process_index * accumulation + k)
                    u, targets = sample_batch(prep, train_users, config, rng)
                    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(targets),), generator=gen)
                    noise = torch.randn((len(targets), *prep.latents.shape[1:]), generator=gen)
                    sync = contextlib.nullcontext() if k == accumulation - 1 else accelerator.no_sync(module)
                    with sync:
                        with accelerator.autocast():
                            diff = dpo_terms(prep, module, torch.from_numpy(u).to(t2i.device), targets,
                                             t.to(t2i.device), noise.to(t2i.device), scheduler)
                            loss = -torch.nn.functional.logsigmoid(-0.5 * config.beta * diff).mean()
                        accelerator.backward(loss / accumulation)
                    total += float(loss.detach()) / accumulation
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not math.isfinite(total):
                    raise MmpersonaError(f"adapter training diverged: the loss became {total} at step {step + 1}; "
                                         "try a smaller --beta or --lr, or --mixed-precision no")
                result.losses.append(total)
                result.steps = step + 1
                if progress:
                    bar.set_postfix(loss=f"{sum(result.losses[-20:]) / len(result.losses[-20:]):.3f}")
                if accelerator.is_main_process and (result.steps % config.checkpoint_every == 0
                                                    or result.steps == config.steps):
                    _save_checkpoint(ckpt, _unwrapped(accelerator, module, adapter), optimizer,
                                     {"step": result.steps, "losses": result.losses, "fingerprint": fingerprint,
                                      "config": asdict(config)})
            module.eval()
        finally:
            if checkpointing:
                unet.disable_gradient_checkpointing()
            unet.eval()
        result.seconds = time.perf_counter() - start
        accelerator.wait_for_everyone()
        final = _unwrapped(accelerator, module, adapter)
        if accelerator.is_main_process:
            final.save(out)
            if heldout:
                result.heldout_pair_accuracy = heldout_accuracy(prep, final, heldout, config)
            (out / "training.json").write_text(json.dumps({**result.to_dict(), "config": asdict(config),
                                                           "heldout": heldout, "model": t2i.spec.id,
                                                           "embedder": embedder.name,
                                                           "processes": accelerator.num_processes}, indent=1))
    return result


def _unwrapped(accelerator: Any, module: Any, adapter: PreferenceAdapter) -> PreferenceAdapter:
    return PreferenceAdapter(adapter.config, accelerator.unwrap_model(module))


def heldout_accuracy(prep: Prepared, adapter: PreferenceAdapter, users: Sequence[str],
                     config: AdapterTrainConfig) -> float | None:
    """DPO implicit preference accuracy: per held-out user, the embedding of their first `context` pairs, then on
    each of their other pairs whether the adapter lowers the chosen image's denoising error more than the
    rejected one's (the mean over `eval_draws` shared noise draws). A user's pairs go to the UNet
    `eval_batch_size` at a time (a Pick-a-Pic user may have hundreds); the draws do not depend on it."""
    import torch

    from .dpo import noise_scheduler

    scheduler = noise_scheduler(prep.t2i.pipeline)
    device = prep.t2i.device
    right = total = 0
    gen = torch.Generator("cpu").manual_seed(config.seed + 1)
    chunk = config.eval_batch_size
    with torch.no_grad():
        for user in users:
            pairs = prep.by_user[user]
            u = torch.from_numpy(prep.embedding(pairs[:config.context])).to(device)
            rest = pairs[config.context:]
            if not rest:
                continue
            score = torch.zeros(len(rest))
            for _ in range(config.eval_draws):
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rest),), generator=gen)
                noise = torch.randn((len(rest), *prep.latents.shape[1:]), generator=gen)
                for i in range(0, len(rest), chunk):
                    part = rest[i:i + chunk]
                    diff = dpo_terms(prep, adapter.module, u[None].expand(len(part), -1), part,
                                     t[i:i + chunk].to(device), noise[i:i + chunk].to(device), scheduler)
                    score[i:i + chunk] += diff.float().cpu()
            right += int((score < 0).sum())
            total += len(rest)
    return right / total if total else None
