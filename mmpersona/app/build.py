"""The Gradio Blocks assembled from the tabs, and how they are launched (with logins: behind the login throttle
and the `SessionGuard`)."""

import functools
from pathlib import Path

from .config import CACHE_SECONDS, MAX_UPLOAD
from .guard import SessionGuard
from .logins import Logins
from .state import App
from .tabs import chat_tab, concepts_tab, generate_tab, profile_tab, taste_tab


def build_app(preset: str = "tiny", db_path: str | Path | None = None, *, multi_user: bool = False,
              device: str = "auto"):
    """The Gradio Blocks; gradio is imported here, with an install hint if it is missing."""
    try:
        import gradio as gr
    except ImportError as e:
        from mmpersona import MissingDependencyError

        raise MissingDependencyError('The app needs Gradio: pip install "mmpersona[app]"') from e
    from mmpersona import MmpersonaError

    app = App(preset, db_path, device, multi_user)

    def guarded(fn):
        """Our errors become a readable message in the page instead of a stack trace."""

        @functools.wraps(fn)  # keeps the signature: Gradio injects gr.Request by annotation
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (MmpersonaError, ValueError, PermissionError) as e:
                raise gr.Error(str(e)) from e

        return wrapper

    with gr.Blocks(title="mmpersona", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        mode = ("Signed in: each user sees only their own concepts and preferences." if multi_user else
                "Single-user mode (no --auth): everything here belongs to one local user.")
        gr.Markdown(f"# mmpersona\nPreset **{preset}**. {mode}")
        # bumped by every change to the profile, in any tab: the profile list renders again
        profile_tick = gr.State(0)

        with gr.Tab("Concepts"):
            concepts_tab(gr, app, guarded, demo)
        with gr.Tab("Chat"):
            chat_tab(gr, app)
        with gr.Tab("Taste"):
            taste_tab(gr, app, guarded, demo, profile_tick)
        with gr.Tab("Generate"):
            generate_tab(gr, app, guarded, preset, profile_tick)
        with gr.Tab("Profile"):
            profile_tab(gr, app, guarded, demo, profile_tick)
    demo.mmpersona_app = app
    return demo


def launch(demo, *, logins: dict[str, str] | None = None, **kwargs):
    """Start the app; with logins, behind the login throttle and the `SessionGuard`."""
    from starlette.middleware import Middleware

    app_kwargs = {"middleware": [Middleware(SessionGuard)]} if logins else None
    return demo.queue(default_concurrency_limit=4).launch(auth=Logins(logins) if logins else None,
                                                          max_file_size=MAX_UPLOAD, app_kwargs=app_kwargs,
                                                          **kwargs)
