"""A VLM served elsewhere: any OpenAI-compatible chat-completions server (vLLM, SGLang, TGI, Ollama, LM Studio,
`transformers serve`) behind the same interface as a local `LoadedVLM`.

    vlm = load_vlm("openai:http://gpu-box:8000/v1#Qwen/Qwen2.5-VL-7B-Instruct")

The spec is `openai:<base URL>#<model>`: the base URL of the server's OpenAI API (up to `/v1`) and the model
name it serves. The model name is also where the processor comes from (a hub id or a local directory: a few
small files, no weights), so everything that does not generate works as with local weights and gives the same
results: the prompt budget counts tokens with the model's own tokenizer, images are shrunk to the same visual
budget, boxes are written in the model family's convention and the chat template decides where images go. Only
generation crosses the network, as chat completions with images as PNG data URLs (lossless: the server sees the
pixels the local model would), streamed when asked. On dynamic-resolution models (Qwen2/2.5-VL) images are sent
already at the model's input size (`LoadedVLM.sized_image`): the server applies the checkpoint's own pixel limits
and `smart_resize` again, which leaves such an image as it is but would round any other size anew.

The API key comes from `MMPERSONA_VLM_API_KEY` or `OPENAI_API_KEY` (a local server needs none).
`MMPERSONA_VLM_TIMEOUT` (seconds, default 120) bounds one request, `MMPERSONA_VLM_RETRIES` (default 2) the
retries of the official `openai` client (connection errors, 408/409/429/5xx, with back-off). Modes that need the
weights in this process (learned concept tokens) refuse with a clear error.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator
from urllib.parse import urlparse

from ..errors import MissingDependencyError, MmpersonaError, ModelUnavailableError

if TYPE_CHECKING:
    import threading

    from .loaders import LoadedVLM

PREFIX = "openai:"


def is_remote(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip().startswith(PREFIX)


def parse(spec: str) -> tuple[str, str]:
    """(base URL, model name) of `openai:<base URL>#<model>`."""
    body = spec.strip()[len(PREFIX):]
    url, sep, model = body.partition("#")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ModelUnavailableError("vlm", spec, "the server URL must start with http:// or https://",
                                    fix="write it as openai:http://host:8000/v1#org/model")
    if not sep or not model.strip():
        raise ModelUnavailableError("vlm", spec, "it names no model after '#'",
                                    fix="write it as openai:http://host:8000/v1#org/model (the name the server "
                                        "serves, also where the processor comes from)")
    return url.rstrip("/"), model.strip()


class RemoteModelStub:
    """Stands where the local weights would be: the model's config, and a clear refusal for anything else."""

    def __init__(self, config: Any, url: str):
        self.config = config
        self._url = url

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise MmpersonaError(f"this needs the VLM's weights in this process (`{name}`), but the vlm role is served "
                             f"by {self._url}: learned concept tokens and training need a local model "
                             "(`--model vlm=<hub id or folder>`)")


def _data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def openai_messages(messages: list[dict]) -> list[dict]:
    """Transformers chat messages (images inline, already prepared) as chat-completions messages."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": _data_url(p["image"])}})
                elif p.get("type") == "text":
                    parts.append({"type": "text", "text": p.get("text", "")})
                else:
                    raise MmpersonaError(f"a remote VLM cannot take a {p.get('type')!r} content part")
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


def _sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers `generate` options as chat-completions fields; greedy unless sampling is asked for (as the
    local backend decodes with the toolkit's defaults)."""
    kwargs = dict(kwargs)
    out: dict[str, Any] = {}
    if kwargs.pop("do_sample", False):
        out["temperature"] = float(kwargs.pop("temperature", 1.0))
        if "top_p" in kwargs:
            out["top_p"] = float(kwargs.pop("top_p"))
    else:
        kwargs.pop("temperature", None)
        kwargs.pop("top_p", None)
        out["temperature"] = 0.0
    if "seed" in kwargs:
        out["seed"] = int(kwargs.pop("seed"))
    if kwargs:
        raise MmpersonaError(f"a remote VLM does not take the generation options {sorted(kwargs)}")
    return out


@dataclass
class RemoteClient:
    """The chat-completions calls, with errors that name the server."""

    url: str
    model: str
    timeout: float = field(default_factory=lambda: float(os.environ.get("MMPERSONA_VLM_TIMEOUT", "120")))
    retries: int = field(default_factory=lambda: int(os.environ.get("MMPERSONA_VLM_RETRIES", "2")))
    _client: Any = field(default=None, repr=False)
    _aclients: dict = field(default_factory=dict, repr=False)  # the async client and the loop it belongs to

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._make(_openai().OpenAI)
        return self._client

    def aclient(self) -> Any:
        """The async client of the running event loop (an httpx async client belongs to the loop it runs on)."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._aclients.get("loop") is not loop:
            self._aclients.update(loop=loop, client=self._make(_openai().AsyncOpenAI))
        return self._aclients["client"]

    def _make(self, kind: Any) -> Any:
        key = os.environ.get("MMPERSONA_VLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "not-needed"
        return kind(base_url=self.url, api_key=key, timeout=self.timeout, max_retries=self.retries)

    def _error(self, e: Exception) -> MmpersonaError:
        import openai

        where = f"the VLM server {self.url} (model {self.model!r})"
        if isinstance(e, openai.APITimeoutError):
            return MmpersonaError(f"{where} did not answer within {self.timeout:g} s "
                                  f"(MMPERSONA_VLM_TIMEOUT raises the limit)")
        if isinstance(e, openai.APIConnectionError):
            return MmpersonaError(f"cannot reach {where}: {e.__cause__ or e}")
        if isinstance(e, openai.APIStatusError):
            detail = ""
            try:
                body = e.response.json()
                detail = body.get("detail") or body.get("error", {}).get("message") or body
            except Exception:  # a body that is not JSON: its text
                detail = e.response.text[:300]
            return MmpersonaError(f"{where} answered HTTP {e.status_code}: {detail}")
        return MmpersonaError(f"{where} failed: {type(e).__name__}: {e}")

    def _text(self, out: Any) -> str:
        if not out.choices:
            raise MmpersonaError(f"the VLM server {self.url} returned no choices")
        return (out.choices[0].message.content or "").strip()

    def complete(self, messages: list[dict], max_tokens: int, *, stop: "threading.Event | None" = None,
                 **kwargs: Any) -> str:
        """The answer. With `stop`, streamed, so that setting it ends the server's work at the next piece."""
        import openai

        if stop is not None:
            return "".join(self.stream(messages, max_tokens, stop=stop, **kwargs)).strip()
        try:
            out = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                      **_sampling(kwargs))
        except openai.OpenAIError as e:
            raise self._error(e) from None
        return self._text(out)

    def stream(self, messages: list[dict], max_tokens: int, *, stop: "threading.Event | None" = None,
               **kwargs: Any) -> Iterator[str]:
        """The answer's pieces as they arrive; setting `stop` closes the connection (the server stops) and raises
        `Cancelled`."""
        import openai

        from ..cancel import check

        try:
            chunks = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                         stream=True, **_sampling(kwargs))
            with chunks:
                for chunk in chunks:
                    check(stop)
                    yield from _pieces(chunk)
        except openai.OpenAIError as e:
            raise self._error(e) from None

    async def acomplete(self, messages: list[dict], max_tokens: int, **kwargs: Any) -> str:
        """`complete` for an event loop: many run at once; cancelling the task closes the request."""
        import openai

        try:
            out = await self.aclient().chat.completions.create(model=self.model, messages=messages,
                                                               max_tokens=max_tokens, **_sampling(kwargs))
        except openai.OpenAIError as e:
            raise self._error(e) from None
        return self._text(out)

    async def astream(self, messages: list[dict], max_tokens: int, **kwargs: Any) -> AsyncIterator[str]:
        """`stream` for an event loop; closing the iterator (or cancelling its task) closes the request."""
        import openai

        try:
            chunks = await self.aclient().chat.completions.create(model=self.model, messages=messages,
                                                                  max_tokens=max_tokens, stream=True,
                                                                  **_sampling(kwargs))
            async with chunks:
                async for chunk in chunks:
                    for piece in _pieces(chunk):
                        yield piece
        except openai.OpenAIError as e:
            raise self._error(e) from None


def _pieces(chunk: Any) -> Iterator[str]:
    """The text a streamed chat-completions chunk adds."""
    for choice in chunk.choices or ():
        if choice.delta is not None and choice.delta.content:
            yield choice.delta.content


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise MissingDependencyError("a remote VLM needs the openai client: pip install 'mmpersona[remote]'") from None
    return openai


def load_remote_vlm(spec: str, *, max_visual_tokens: Any) -> "LoadedVLM":
    """A `LoadedVLM` whose generation runs on the server `spec` names; the processor and config load locally."""
    import transformers

    from .hub import TRANSFORMERS_PATTERNS, snapshot
    from .loaders import LoadedVLM
    from .registry import ModelSpec

    url, model = parse(spec)
    source = model
    if not os.path.isdir(os.path.expanduser(source)):
        if source.count("/") != 1:
            raise ModelUnavailableError("vlm", spec, f"the model name {model!r} is neither a local folder nor a hub "
                                        "id, so its processor cannot be loaded",
                                        fix="serve the model under its hub id (org/name) or its folder's path")
        patterns = [p for p in TRANSFORMERS_PATTERNS if p != "*.safetensors"]  # processor and config: no weights
        source = str(snapshot("vlm", model, allow_patterns=patterns))
    try:
        processor = transformers.AutoProcessor.from_pretrained(os.path.expanduser(source))
        config = transformers.AutoConfig.from_pretrained(os.path.expanduser(source))
    except Exception as e:  # any library error while reading the files
        raise ModelUnavailableError("vlm", spec, f"its processor could not be loaded from {source!r} "
                                    f"({type(e).__name__}: {e})") from None
    if getattr(processor, "chat_template", None) is None:
        raise ModelUnavailableError("vlm", spec, "its processor has no chat template",
                                    fix="serve an instruction-tuned (chat) checkpoint")
    import torch

    return LoadedVLM(RemoteModelStub(config, url), processor, ModelSpec("vlm", spec.strip()), torch.device("cpu"),
                     torch.float32, max_visual_tokens, remote=RemoteClient(url, model))
