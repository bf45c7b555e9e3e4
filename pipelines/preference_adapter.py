"""The preference adapter: a user embedding becomes K condition tokens for the UNet's cross-attention (PPD style).

    adapter = PreferenceAdapter.load("runs/adapter")           # a folder, or a hub id (org/name)
    pe, ne, pooled, neg_pooled = adapter.condition(u, pe, ne, pooled, neg_pooled)

A small MLP maps the user embedding (`mmpersona.user_embedding`, the embedder's dimension) to K tokens of the
UNet's cross-attention width; for SDXL it also shifts the pooled text embedding (a zero-initialised head, so an
untrained adapter leaves it as it was). The tokens are appended to the prompt embeddings, and diffusers takes
them through `prompt_embeds` / `negative_prompt_embeds` (plus `pooled_prompt_embeds` for SDXL).

Why appended tokens and not a decoupled cross-attention (IP-Adapter's way):
- no attention processor is replaced, so the adapter composes with an IP-Adapter (which owns the processors),
  with LoRAs (which wrap the same projections) and with the `viper` arithmetic, and SD 1.5 and SDXL take the
  same code; the UNet runs once per step as before, over K more keys (77 + 4 for the default);
- what it learns is an input to the frozen model, so a wrong adapter can be switched off per call (`scale=0`)
  and the model is never changed;
- the cost: the tokens share one softmax with the prompt's 77. The adapter learns to make them heard (its
  output layer norm starts at the statistics of the model's own text tokens, and training scales it), and the
  proof benchmark (`benchmarks/preference_adapter.py`) shows it is enough for a planted preference.

The negative (unconditional) side gets K copies of its own last token, so classifier-free guidance amplifies
the difference the tokens make. `scale` moves the tokens between those copies (0) and the adapter's (1).
Saved as `preference_adapter.safetensors` plus `preference_adapter.json` (no pickle).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpersona.errors import MmpersonaError, ModelUnavailableError
from mmpersona.user_embedding import RULE

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mmpersona.models import LoadedT2I

logger = logging.getLogger(__name__)
WEIGHTS = "preference_adapter.safetensors"
CONFIG = "preference_adapter.json"
ROLE = "preference_adapter"
FORMAT = 1


@dataclass
class AdapterConfig:
    """What the adapter maps and for which model. embed_dim: the user embedding's size (the embedder's);
    cross_attention_dim: the UNet's; tokens: K; pooled_dim: SDXL's pooled text embedding (None for SD 1.5)."""

    embed_dim: int
    cross_attention_dim: int
    tokens: int = 4
    hidden: int = 256
    pooled_dim: int | None = None
    embedder: str = ""
    base_model: str = ""
    rule: str = RULE
    format: int = FORMAT

    def __post_init__(self) -> None:
        for name in ("embed_dim", "cross_attention_dim", "tokens", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65536:
                raise MmpersonaError(f"AdapterConfig.{name} must be an integer in 1..65536, got {value!r}")
        if self.tokens > 64:
            raise MmpersonaError(f"AdapterConfig.tokens must be at most 64, got {self.tokens}")
        if self.pooled_dim is not None and (not isinstance(self.pooled_dim, int) or not 1 <= self.pooled_dim <= 65536):
            raise MmpersonaError(f"AdapterConfig.pooled_dim must be None or an integer in 1..65536, "
                                 f"got {self.pooled_dim!r}")
        if self.format != FORMAT:
            raise MmpersonaError(f"preference adapter format {self.format!r} is not supported (this version reads "
                                 f"{FORMAT})")

    @classmethod
    def from_json(cls, text: "str | bytes") -> "AdapterConfig":
        from mmpersona.safe_io import parse_json

        data = parse_json(text, what=CONFIG)
        if not isinstance(data, dict):
            raise MmpersonaError(f"{CONFIG} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MmpersonaError(f"{CONFIG} has unknown fields {unknown}")
        try:
            return cls(**data)
        except TypeError as e:
            raise MmpersonaError(f"{CONFIG} is incomplete: {e}") from None


def _module(config: AdapterConfig):
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            k, c, h = config.tokens, config.cross_attention_dim, config.hidden
            self.trunk = nn.Sequential(nn.Linear(config.embed_dim, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
            self.to_tokens = nn.Linear(h, k * c)
            self.norm = nn.LayerNorm(c)
            self.to_pooled = nn.Linear(h, config.pooled_dim) if config.pooled_dim else None
            if self.to_pooled is not None:
                nn.init.zeros_(self.to_pooled.weight)
                nn.init.zeros_(self.to_pooled.bias)

        def forward(self, u: "torch.Tensor"):
            hidden = self.trunk(u)
            tokens = self.norm(self.to_tokens(hidden).view(len(u), config.tokens, config.cross_attention_dim))
            return tokens, (self.to_pooled(hidden) if self.to_pooled is not None else None)

    return Net()


class PreferenceAdapter:
    """The trained mapping (a torch module in float32) and its config."""

    def __init__(self, config: AdapterConfig, module: Any = None, source: str = "(in memory)"):
        self.config = config
        self.module = module if module is not None else _module(config)
        self.source = source  # where it was loaded from, for the images' metadata

    # ------------------------------------------------------------------ making, saving, loading

    @classmethod
    def for_pipeline(cls, t2i: "LoadedT2I", embedder: Any, *, tokens: int = 4, hidden: int = 256,
                     seed: int = 0) -> "PreferenceAdapter":
        """A fresh adapter sized for `t2i` and `embedder`, its token norm set to the statistics of the model's own
        prompt tokens (so the first tokens already look like text to the UNet)."""
        import torch

        torch.manual_seed(seed)
        pe, _, pooled, _ = encode(t2i, ["a photo", "a painting of a landscape, soft light"], [""], cfg=False)
        config = AdapterConfig(embed_dim=int(embedder.dim), cross_attention_dim=int(pe.shape[-1]), tokens=tokens,
                               hidden=hidden, pooled_dim=int(pooled.shape[-1]) if pooled is not None else None,
                               embedder=embedder.name, base_model=t2i.spec.id)
        adapter = cls(config)
        body = pe[:, 1:].float().reshape(-1, pe.shape[-1])  # without the start token (CLIP's is an outlier)
        with torch.no_grad():
            adapter.module.norm.weight.copy_(body.std(0).clamp_min(1e-3))
            adapter.module.norm.bias.copy_(body.mean(0))
        adapter.module.to(t2i.device)
        return adapter

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.module.state_dict().items()}
        tmp = folder / (WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata={"format": str(FORMAT)})
        tmp.replace(folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(asdict(self.config), indent=1))
        return folder

    @classmethod
    def load(cls, ref: "str | Path", *, device: Any = "cpu") -> "PreferenceAdapter":
        """From a folder holding the two files, or a hub repository id (org/name) that has them."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = resolve(ref)
        if (folder / CONFIG).stat().st_size > 1 << 20:
            raise MmpersonaError(f"{folder / CONFIG} is over 1 MiB: not an adapter config")
        config = AdapterConfig.from_json((folder / CONFIG).read_bytes())
        adapter = cls(config)
        expected = {k: tuple(v.shape) for k, v in adapter.module.state_dict().items()}
        try:
            state = load_file(str(folder / WEIGHTS))
        except (SafetensorError, OSError) as e:
            raise MmpersonaError(f"{folder / WEIGHTS} is not a readable safetensors file ({e})") from None
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
            raise MmpersonaError(f"{folder / WEIGHTS} does not match {CONFIG} (tensors {wrong[:4]})")
        adapter.module.load_state_dict({k: v.float() for k, v in state.items()})
        adapter.module.eval().to(device)
        adapter.source = str(ref)
        return adapter

    # ------------------------------------------------------------------ using

    def check(self, t2i: "LoadedT2I", embedder_name: str) -> None:
        """Refuse a model or embedder the adapter was not made for, before anything runs."""
        pipe = t2i.pipeline
        width = int(pipe.unet.config.cross_attention_dim)
        xl = bool(t2i.is_xl)
        if width != self.config.cross_attention_dim or xl != (self.config.pooled_dim is not None):
            raise MmpersonaError(f"this preference adapter was trained for {self.config.base_model!r} (cross-attention "
                                 f"width {self.config.cross_attention_dim}), not {t2i.spec.id!r} (width {width})")
        if t2i.spec.id != self.config.base_model:  # a fine-tune of the same family may serve; say so
            logger.warning("the preference adapter was trained for %s and now serves %s", self.config.base_model,
                           t2i.spec.id)
        if embedder_name != self.config.embedder:
            raise MmpersonaError(f"this preference adapter reads {self.config.embedder!r} user embeddings, but the "
                                 f"database embeds with {embedder_name!r}")

    def tokens(self, u: "np.ndarray | torch.Tensor"):
        """(tokens (n, K, width), pooled shift (n, pooled_dim) or None) for user embeddings u (n, dim) or (dim,)."""
        import torch

        p = next(self.module.parameters())
        u = torch.as_tensor(u, dtype=torch.float32, device=p.device)
        if u.ndim == 1:
            u = u[None]
        if u.ndim != 2 or u.shape[1] != self.config.embed_dim:
            raise MmpersonaError(f"a user embedding must have {self.config.embed_dim} values, got shape "
                                 f"{tuple(u.shape)}")
        with torch.no_grad():
            return self.module(u)

    def condition(self, u: Any, prompt_embeds: "torch.Tensor", negative_embeds: "torch.Tensor | None",
                  pooled: "torch.Tensor | None" = None, negative_pooled: "torch.Tensor | None" = None, *,
                  scale: float = 1.0):
        """The prompt embeddings with the user's tokens appended (and the negative side padded to match)."""
        tokens, shift = self.tokens(u)
        return append_tokens(tokens, shift, prompt_embeds, negative_embeds, pooled, negative_pooled, scale=scale)


def append_tokens(tokens, shift, prompt_embeds, negative_embeds, pooled=None, negative_pooled=None, *,
                  scale: float = 1.0):
    """Append `tokens` (1 or n, K, width) to `prompt_embeds` (n, L, width); the negative side gets K copies of its
    own last token. `scale` blends each token from that copy (0) to the adapter's (1); at 0 the inputs come back
    unchanged (K appended copies would still move the attention a little). Differentiable."""
    if scale == 0:
        return prompt_embeds, negative_embeds, pooled, negative_pooled
    n = prompt_embeds.shape[0]
    tokens = tokens.to(prompt_embeds.dtype).to(prompt_embeds.device).expand(n, -1, -1)
    k = tokens.shape[1]
    pad = (negative_embeds if negative_embeds is not None else prompt_embeds)[:, -1:].expand(-1, k, -1)
    if scale != 1.0:
        tokens = pad[:1].expand_as(tokens) + scale * (tokens - pad[:1].expand_as(tokens))
    import torch

    pe = torch.cat([prompt_embeds, tokens], 1)
    ne = torch.cat([negative_embeds, pad], 1) if negative_embeds is not None else None
    if shift is not None and pooled is not None:
        pooled = pooled + scale * shift.to(pooled.dtype).to(pooled.device).expand_as(pooled)
    return pe, ne, pooled, negative_pooled


def encode(t2i: "LoadedT2I", prompts: list[str], negatives: list[str] | None, *, cfg: bool):
    """(prompt_embeds, negative_embeds or None, pooled or None, negative_pooled or None) as the diffusers
    pipeline itself would compute them (SDXL: both text encoders, the pooled output)."""
    import torch

    pipe = t2i.pipeline
    negatives = negatives if negatives is not None else [""] * len(prompts)
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    with torch.no_grad():
        if t2i.is_xl:
            # SDXL's config sets `force_zeros_for_empty_prompt`: an empty negative is zeros (embeddings and pooled),
            # not the encoding of "", as vanilla generation has it
            zeros = cfg and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
            empty = [not str(n).strip() for n in negatives]
            pe, ne, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, device=t2i.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                negative_prompt=None if not cfg or (zeros and all(empty)) else negatives)
            if zeros and any(empty) and not all(empty):
                rows = torch.tensor(empty, device=ne.device)
                ne = torch.where(rows[:, None, None], torch.zeros_like(ne), ne)
                neg_pooled = torch.where(rows[:, None], torch.zeros_like(neg_pooled), neg_pooled)
            return pe, ne, pooled, neg_pooled
        pe, ne = pipe.encode_prompt(prompts, t2i.device, 1, cfg, negative_prompt=negatives if cfg else None)
        return pe, ne, None, None


def resolve(ref: "str | Path") -> Path:
    """The local folder of an adapter reference: an existing folder, or a hub id fetched (once) into the cache."""
    from mmpersona.models import hub

    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
            raise ModelUnavailableError(ROLE, text, f"the folder has no {WEIGHTS} and {CONFIG}",
                                        fix="train one with `mmpersona adapter train --out DIR`, or give a hub id")
        return path
    if path.suffix == ".safetensors" and path.is_file():
        return resolve(path.parent)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or any(not p.strip() for p in text.split("/")):
        raise ModelUnavailableError(ROLE, text, "it is neither an existing folder nor a hub id of the form org/name",
                                    fix="train one with `mmpersona adapter train --out DIR` and pass that folder")
    folder = hub.snapshot(ROLE, text, allow_patterns=[WEIGHTS, CONFIG])
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise ModelUnavailableError(ROLE, text, f"the repository has no {WEIGHTS} and {CONFIG}")
    return folder
