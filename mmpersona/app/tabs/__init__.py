"""The app's tabs, one module each; each function builds its tab's components and wires their events."""

from .chat import chat_tab
from .concepts import concepts_tab
from .generate import generate_tab
from .memory import memory_tab
from .profile import profile_tab
from .taste import taste_tab

__all__ = ["chat_tab", "concepts_tab", "generate_tab", "memory_tab", "profile_tab", "taste_tab"]
