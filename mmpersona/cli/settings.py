"""What every command sees: the global options (`Settings`), how it prints (`emit`) and the database they name."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import typer


@dataclass
class Settings:
    """Global options, shared by every command."""

    db: str
    user: str
    preset: str
    device: str
    dtype: Optional[str]
    json: bool
    overrides: dict[str, str] = field(default_factory=dict)
    max_visual_tokens: Optional[int] = 1024

    def vlm(self):
        """The `vlm` role's model as these options ask."""
        from ..models import load_vlm

        return load_vlm(self.overrides.get("vlm"), preset=self.preset, device=self.device, dtype=self.dtype,
                        max_visual_tokens=self.max_visual_tokens)


def settings(ctx: typer.Context) -> Settings:
    return ctx.find_root().obj


def emit(s: Settings, data: Any, text: str) -> None:
    """Print `data` as one JSON document with `--json`, else the human `text`."""
    if s.json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(text)


def open_db(s: Settings):
    from ..conceptdb import ConceptDB

    return ConceptDB(s.db, embedder=s.overrides.get("embedder"), preset=s.preset, device=s.device, dtype=s.dtype)
