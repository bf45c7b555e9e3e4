"""The app's settings: what one request may ask of the shared models, and the defaults of its tabs."""

from pipelines.taste import TASTE_PROMPTS as _TASTE_PROMPTS

SINGLE_USER = "default"
STRATEGY_CHOICES = ["attributes", "ip_adapter", "subject", "rerank", "lora"]

# What one request may ask of the shared models (one client must not stall everyone).
MAX_QUESTION_CHARS = 2_000
MAX_MESSAGE_CHARS = 4_000  # one earlier message of the chat history
MAX_HISTORY_TURNS = 20  # earlier messages sent to the model (the oldest are dropped)
MAX_HISTORY_CHARS = 12_000
MAX_PROMPT_CHARS = 1_000  # a generation prompt
MAX_IMAGES_PER_ADD = 32
MAX_UPLOAD = "64mb"  # Gradio refuses larger uploads before they are stored
CACHE_SECONDS = 3600  # Gradio deletes its cached uploads and outputs older than this, every this often
THUMB_SIZE = 160
MAX_IMAGES = 4  # images per generation, each with its own feedback buttons
# Taste onboarding: pairs generated from these prompts (or the user's own), the user picks one of each pair.
TASTE_PROMPTS = list(_TASTE_PROMPTS)
TASTE_GOAL = 8  # choices the progress counts towards (PPD personalizes from as few as four)
TRAIN_EVERY = 4  # choices between two background trainings of the reward model
PROFILE_SHOWN = 100  # profile entries listed (the newest), each with its thumbnails and remove button
OPEN_PAIRS = 32  # taste pairs a user has been shown and not answered, remembered (each is answered once)
