"""The server's limits: what one request may ask of the shared models and the server (`mmpersona serve`'s
options set some of them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MmpersonaError

#: a generated image's sides are at most this times the model's native side (and `max_side`)
MAX_SIDE_FACTOR = 2


@dataclass(frozen=True)
class ServeConfig:
    """What one request may ask of the shared models and the server; over a limit is a clear 4xx."""

    max_body_bytes: int = 32 * 2**20
    max_images: int = 4  # images in one chat request (the latest is the photo asked about)
    max_upload_images: int = 16  # images in one concept upload
    max_history: int = 32  # earlier messages in one chat request
    max_message_chars: int = 8_000
    max_history_chars: int = 32_000
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_n: int = 4
    default_steps: int = 30
    max_steps: int = 50
    max_side: int = 1024
    max_prompt_chars: int = 2_000
    max_list: int = 500
    max_image_steps: int = 480  # n x candidates x steps x (pixels / the model's native pixels), per request
    queue_size: int = 32  # local model jobs waiting, in all
    max_user_queue: int = 4  # local model jobs waiting, per user
    max_remote_concurrency: int = 32  # requests in flight to a remote VLM server
    max_batch: int = 8  # chat requests answered in one batched generation (a local VLM)
    batch_window_ms: int = 0  # how long a batch waits for more requests once it could start (besides those on
    # their way: up to worker.ARRIVAL_WAIT for requests already being received)
    max_decode_pixels: int = 2 * 8192 * 8192  # pixels of decoded photos held at once (about 1.5 GB at peak)
    health_detail: bool = False  # /health shows the models' state and the queues (which tell when others are busy)

    def largest_side(self, native: int) -> int:
        """The largest side a generation may ask for from a model of this native side."""
        return min(self.max_side, MAX_SIDE_FACTOR * native)

    def __post_init__(self):
        from dataclasses import fields

        low = [f.name for f in fields(self) if not isinstance(getattr(self, f.name), bool)
               and getattr(self, f.name) < (0 if f.name == "batch_window_ms" else 1)]
        if low:
            raise MmpersonaError(f"server limit {low[0]} must be at least 1, got {getattr(self, low[0])}")
        for default, limit in (("default_max_tokens", "max_tokens"), ("default_steps", "max_steps")):
            if getattr(self, default) > getattr(self, limit):
                raise MmpersonaError(f"{default} ({getattr(self, default)}) is over {limit} ({getattr(self, limit)})")
