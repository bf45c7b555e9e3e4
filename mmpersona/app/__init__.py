"""The Gradio app (`python gradio_app.py`): your concepts, personalized chat, your taste, personalized generation.

Built only on the public Python API; Gradio is imported when the app is built (the `app` extra), not here.

- `state`: `App`, the shared state and every action of the tabs, each scoped to the calling user;
- `tabs/`: one module per tab (concepts, chat, taste, generate, profile), building its components and events;
- `build`: the Blocks assembled from the tabs, and `launch`;
- `render`: the HTML helpers (inline images, never cached files);
- `logins` and `guard`: the app with several users (logins from a file, throttled; `SessionGuard`);
- `config`: the limits of one request and the tabs' defaults.
"""

from .build import build_app, launch
from .config import (CACHE_SECONDS, MAX_HISTORY_CHARS, MAX_HISTORY_TURNS, MAX_IMAGES, MAX_IMAGES_PER_ADD,
                     MAX_MESSAGE_CHARS, MAX_PROMPT_CHARS, MAX_QUESTION_CHARS, MAX_UPLOAD, PROFILE_SHOWN, SINGLE_USER,
                     STRATEGY_CHOICES, TASTE_GOAL, TASTE_PROMPTS, THUMB_SIZE, TRAIN_EVERY)
from .guard import SessionGuard
from .logins import Logins, read_logins
from .state import App, bounded_history

__all__ = ["App", "CACHE_SECONDS", "Logins", "MAX_HISTORY_CHARS", "MAX_HISTORY_TURNS", "MAX_IMAGES",
           "MAX_IMAGES_PER_ADD", "MAX_MESSAGE_CHARS", "MAX_PROMPT_CHARS", "MAX_QUESTION_CHARS", "MAX_UPLOAD",
           "PROFILE_SHOWN", "SINGLE_USER", "STRATEGY_CHOICES", "SessionGuard", "TASTE_GOAL", "TASTE_PROMPTS",
           "THUMB_SIZE", "TRAIN_EVERY", "bounded_history", "build_app", "launch", "read_logins"]
