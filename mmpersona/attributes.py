"""ViPer-style visual attributes: a VLM reads the user's comments and names what they like and dislike.

The answer must be JSON of exactly `{"liked": [str, ...], "disliked": [str, ...]}`. `parse_attributes` is strict:
anything else raises `AttributeParseError` saying why, and nothing is half-parsed. `extract_attributes` asks
again (with the reason) up to `retries` times, then reports the failure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from .errors import MmpersonaError

if TYPE_CHECKING:
    from .models import LoadedVLM

MAX_ITEMS = 20
MAX_CHARS = 80
PROMPT = (
    "Below are a user's comments on images they liked or disliked. List the visual attributes (style, colour, "
    "lighting, composition, subject matter) the user likes and dislikes. Reply with JSON only, exactly in this "
    'form: {"liked": ["attribute", ...], "disliked": ["attribute", ...]}\n\n'
)


class AttributeParseError(MmpersonaError):
    """A model's answer is not the attribute JSON we asked for."""


@dataclass
class Attributes:
    liked: list[str] = field(default_factory=list)
    disliked: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return {"liked": list(self.liked), "disliked": list(self.disliked)}


def clean_list(value: Any, key: str) -> list[str]:
    """A list of short, non-empty attribute strings (trimmed, de-duplicated, order kept), or a clear error."""
    if not isinstance(value, list):
        raise AttributeParseError(f"'{key}' must be a list of strings, got {type(value).__name__}")
    if len(value) > MAX_ITEMS:
        raise AttributeParseError(f"'{key}' has {len(value)} items, at most {MAX_ITEMS} are allowed")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise AttributeParseError(f"'{key}'[{i}] must be a string, got {type(item).__name__}")
        text = " ".join(item.split())
        if not text:
            raise AttributeParseError(f"'{key}'[{i}] is empty")
        if len(text) > MAX_CHARS or any(c in text for c in "{}<>\n"):
            raise AttributeParseError(f"'{key}'[{i}] must be a short phrase (at most {MAX_CHARS} characters)")
        if text.lower() not in (o.lower() for o in out):
            out.append(text)
    return out


def parse_attributes(text: str) -> Attributes:
    """Parse a model answer strictly: one JSON object (optionally in a ``` fence), keys exactly liked/disliked."""
    if not isinstance(text, str) or not text.strip():
        raise AttributeParseError("the answer is empty")
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fence:
        body = fence.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise AttributeParseError(f"the answer is not JSON ({e.msg} at character {e.pos})") from e
    if not isinstance(data, dict):
        raise AttributeParseError(f"the answer must be a JSON object, got {type(data).__name__}")
    if set(data) != {"liked", "disliked"}:
        raise AttributeParseError(f"the object must have exactly the keys 'liked' and 'disliked', got {sorted(data)}")
    return Attributes(clean_list(data["liked"], "liked"), clean_list(data["disliked"], "disliked"))


def extract_attributes(vlm: "LoadedVLM", comments: Sequence[tuple[str, str]], *, retries: int = 2,
                       max_new_tokens: int = 200) -> Attributes:
    """Ask the VLM for attributes from `(kind, comment)` pairs ("like"/"dislike"); retried, then reported."""
    lines = [f"- {'liked' if kind == 'like' else 'disliked'}: {json.dumps(comment)}" for kind, comment in comments
             if comment.strip()]
    if not lines:
        raise MmpersonaError("there are no comments to extract attributes from (add some with "
                             "`mmpersona profile like IMAGE --comment TEXT`)")
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT + "\n".join(lines)}]}]
    errors = []
    for _ in range(retries + 1):
        answer = vlm.generate(messages, max_new_tokens=max_new_tokens)
        try:
            return parse_attributes(answer)
        except AttributeParseError as e:
            errors.append(f"{e} (answer: {answer[:120]!r})")
            messages = messages + [
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                {"role": "user", "content": [{"type": "text", "text": f"That was not valid: {e}. Reply with the "
                                                                      "JSON object only."}]}]
    raise AttributeParseError(f"the model gave no valid attribute JSON in {retries + 1} attempts: "
                              + "; ".join(errors))
