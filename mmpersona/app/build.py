"""The Gradio Blocks assembled from the tabs, and how they are launched (with logins: behind the login throttle
and the `SessionGuard`)."""

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

from .config import CACHE_SECONDS, MAX_UPLOAD
from .guard import SessionGuard, parse_proxies
from .logins import Logins
from .state import App, Refused
from .tabs import chat_tab, concepts_tab, generate_tab, memory_tab, profile_tab, taste_tab

logger = logging.getLogger("mmpersona.app")


def build_app(preset: str = "tiny", db_path: str | Path | None = None, *, multi_user: bool = False,
              device: str = "auto", face: bool = False):
    """The Gradio Blocks; gradio is imported here, with an install hint if it is missing."""
    try:
        import gradio as gr
    except ImportError as e:
        from mmpersona import MissingDependencyError

        raise MissingDependencyError('The app needs Gradio: pip install "mmpersona[app]"') from e
    from mmpersona import MmpersonaError

    app = App(preset, db_path, device, multi_user, face=face)

    def guarded(fn):
        """Our errors become a readable message in the page instead of a stack trace; an expected refusal
        (`Refused`: a pair answered already) logs one line, not Gradio's traceback."""

        @functools.wraps(fn)  # keeps the signature: Gradio injects gr.Request by annotation
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Refused as e:
                logger.info("refused %s: %s", fn.__name__, e)
                raise gr.Error(str(e), print_exception=False) from e
            except (MmpersonaError, ValueError, PermissionError) as e:
                raise gr.Error(str(e)) from e

        return wrapper

    with gr.Blocks(title="mmpersona", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        mode = ("Signed in: each user sees only their own concepts and preferences." if multi_user else
                "Single-user mode (no --auth): everything here belongs to one local user.")
        gr.Markdown(f"# mmpersona\nPreset **{preset}**. {mode}")
        # bumped by every change to the profile, in any tab: the profile list renders again
        profile_tick = gr.State(0)
        memory_tick = gr.State(0)  # bumped by every change to the memory: its list renders again

        with gr.Tab("Concepts"):
            concepts_tab(gr, app, guarded, demo)
        with gr.Tab("Chat"):
            chat_tab(gr, app, guarded, demo, memory_tick)
        with gr.Tab("Taste"):
            taste_tab(gr, app, guarded, demo, profile_tick)
        with gr.Tab("Generate"):
            generate_tab(gr, app, guarded, preset, profile_tick)
        with gr.Tab("Profile"):
            profile_tab(gr, app, guarded, demo, profile_tick)
        with gr.Tab("Memory"):
            memory_tab(gr, app, guarded, memory_tick)
    demo.mmpersona_app = app
    return demo


def launch(demo, *, logins: dict[str, str] | Logins | None = None, trusted_proxies: Iterable[str] | str = (),
           **kwargs):
    """Start the app; with logins, behind the login throttle and the `SessionGuard`.

    Args:
        logins: user -> password, or a `Logins` (its throttle's settings); none: the app runs single-user.
        trusted_proxies: the reverse proxies (addresses or networks) whose X-Forwarded-For names the client;
            from any other peer the client is the socket's address. The login throttle counts per client.
    """
    import os

    from starlette.middleware import Middleware

    proxies = [str(p) for p in parse_proxies(trusted_proxies)]  # a wrong one fails here, naming it
    app_kwargs = None
    if logins:
        app_kwargs = {"middleware": [Middleware(SessionGuard, trusted_proxies=proxies)]}
        logins = logins if isinstance(logins, Logins) else Logins(logins)
    # uvicorn, as Gradio starts it, believes X-Forwarded-For from 127.0.0.1 unless told otherwise (its
    # FORWARDED_ALLOW_IPS), and would hand the guard a client address that any local process can write: it is
    # told to believe the guard's proxies alone, while the server is made (the rest of the process keeps its own)
    before = os.environ.get("FORWARDED_ALLOW_IPS")
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(proxies)
    try:
        return demo.queue(default_concurrency_limit=4).launch(auth=logins.check if logins else None,
                                                              max_file_size=MAX_UPLOAD, app_kwargs=app_kwargs,
                                                              **kwargs)
    finally:
        if before is None:
            os.environ.pop("FORWARDED_ALLOW_IPS", None)
        else:
            os.environ["FORWARDED_ALLOW_IPS"] = before
