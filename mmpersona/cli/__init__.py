"""The `mmpersona` command line. Library code logs; only this package prints.

Global options come before the command: `mmpersona --preset tiny --json models list`.

This module holds the Typer app, the global options and the console entry point, and assembles the commands:
each command group is a module of its own (`concepts`, `profile`, ...) with its Typer sub-app; the top-level
commands (`demo`, `chat`, ...) are registered here, in the order `mmpersona --help` lists them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import typer

from ..errors import MmpersonaError
from . import adapter, chat, chats, concepts, demo, evaluate, generate, keys, memory, models, profile, serve
from .settings import Settings, emit, settings

__all__ = ["Settings", "app", "emit", "main", "settings"]

app = typer.Typer(
    name="mmpersona",
    help="Multimodal personalization: concept databases for VLMs, preference profiles for text-to-image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options(
    ctx: typer.Context,
    db: Optional[str] = typer.Option(None, "--db", envvar="MMPERSONA_DB",
                                     help="Concept database: a file path, or postgresql://user:password@host/dbname "
                                          "(default: a file in the user data dir; env MMPERSONA_DB)."),
    user: str = typer.Option(os.environ.get("MMPERSONA_USER", "default"), "--user",
                             help="Whose data to use (env MMPERSONA_USER)."),
    preset: str = typer.Option(os.environ.get("MMPERSONA_PRESET", "default"), "--preset",
                               help="Model preset: 'default' (real models) or 'tiny' (offline test models)."),
    model: Optional[list[str]] = typer.Option(None, "--model", metavar="ROLE=ID",
                                              help="Use a hub id or local directory for one role (repeatable)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
                                        help="float32, float16 or bfloat16 (default: float32 on CPU, bf16/fp16 on GPU)."),
    max_visual_tokens: int = typer.Option(1024, "--max-visual-tokens", min=0,
                                          help="Visual tokens one image may cost on dynamic-resolution VLMs "
                                               "(Qwen2/2.5-VL); 0: the checkpoint's own limit."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details and library output to stderr."),
) -> None:
    from ..models import parse_overrides
    from ..models.registry import check_preset
    from ..paths import default_db_path

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # the CLI's output is its own; library progress bars and warnings only under -v
        from ..libraries import quiet_libraries

        quiet_libraries()
    check_preset(preset)
    ctx.obj = Settings(db=db or str(default_db_path()), user=user, preset=preset, device=device, dtype=dtype,
                       json=as_json, overrides=parse_overrides(model), max_visual_tokens=max_visual_tokens or None)


# top-level commands first, then the groups: `mmpersona --help` lists them in this order
app.command("demo")(demo.demo)
app.command("erase-user")(concepts.erase_user)
app.command("chat")(chat.chat)
app.command("generate")(generate.generate)
app.command("serve")(serve.serve)
app.add_typer(models.app, name="models")
app.add_typer(profile.app, name="profile")
app.add_typer(concepts.app, name="concepts")
app.add_typer(memory.app, name="memory")
app.add_typer(chats.app, name="chats")
app.add_typer(adapter.app, name="adapter")
app.add_typer(keys.app, name="keys")
app.add_typer(evaluate.app, name="eval")


def main() -> None:
    """Console entry point: our own errors become one clear line on stderr and exit code 2.

    Usage errors, `--help` and exit codes stay click's (standalone mode)."""
    for arg in sys.argv[1:]:
        if any("\udc80" <= ch <= "\udcff" for ch in arg):  # undecodable bytes, kept by surrogateescape
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            typer.echo(f"error: argument {shown!r} is not valid UTF-8 text", err=True)
            sys.exit(2)
    try:
        app()
    except MmpersonaError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
