"""The request bodies of the API's routes (pydantic): OpenAI's shapes for chat and generation, ours for the
rest."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from concept_db.types import MAX_ALIASES

from ..models.sampling import SEED_MAX

INT_MAX = 2**63 - 1  # every integer a client sends fits a signed 64-bit integer (the database's, torch's)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat completions request; fields it has that a personalized answer cannot honour are refused."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field("mmpersona", description="Ignored: the server serves one chat model (see /v1/models).")
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    temperature: float | None = Field(None, ge=0, le=2, description="Absent or 0: greedy decoding.")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Sampling's seed (absent: fresh entropy).")
    n: int = Field(1, ge=1, le=1, description="One answer per request.")
    regions: bool = Field(False, description="mmpersona: also retrieve per detected region of the photo.")
    remember: bool = Field(True, description="mmpersona: propose memory entries from the question (returned in "
                                             "`mmpersona.proposed`, used once accepted).")
    conversation: str | None = Field(None, max_length=64,
                                     description="mmpersona: keep this exchange in a conversation of yours: 'new' "
                                                 "starts one (its id comes back in `mmpersona.conversation`); an id "
                                                 "continues it: its kept turns come before `messages` (send only the "
                                                 "new ones) and its last photo is asked about when none is sent.")


class ImageRequest(BaseModel):
    """The shape of OpenAI's `/v1/images/generations`, plus mmpersona's own fields."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(..., min_length=1)
    model: str | None = Field(None, description="Ignored: the server serves one image model.")
    n: int = Field(1, ge=1, le=INT_MAX)
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's).")
    response_format: Literal["b64_json", "url"] = "b64_json"
    strategies: list[str] | None = Field(None, description="mmpersona: the personalization strategies "
                                                           "(default: the server's).")
    steps: int | None = Field(None, ge=1, le=INT_MAX,
                              description="mmpersona: denoising steps (default: the server's).")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="The first image's seed; the next ones count up from it.")
    guidance_scale: float = Field(7.5, ge=0, le=50)


class ConceptPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    category: str | None = None
    info: str | None = None
    aliases: list[str] | None = Field(None, max_length=MAX_ALIASES)
    attributes: dict[str, Any] | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="A data URL (data:image/png;base64,...).")
    k: int = Field(5, ge=1, le=50)
    category: str | None = None
    min_score: float | None = Field(None, allow_inf_nan=False)


class ProposedConcept(BaseModel):
    """A concept proposed in a chat response (`mmpersona.proposed_concepts`), as proposed or edited."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=66)
    category: str = ""
    info: str = ""
    box: list[int] | None = Field(None, min_length=4, max_length=4,
                                  description="[x0, y0, x1, y1] in the photo's pixels (null: the whole photo).")
    image: str = Field(..., description="The photo: the content hash of one of your stored images (a kept "
                                        "conversation's turn) or a data URL.")


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["like", "dislike", "pair", "prompt"]
    image: str | None = Field(None, description="like / dislike: the image, a data URL.")
    comment: str = ""
    prompt: str = Field("", description="pair / prompt: the prompt.")
    chosen: str | None = Field(None, description="pair: the preferred image, a data URL.")
    rejected: str | None = Field(None, description="pair: the other image, a data URL.")


class AttributesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    liked: list[str] | None = None
    disliked: list[str] | None = None



class MemoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., description="What to remember.")
    concept: str | None = Field(None, description="The concept it is about (name, alias or id); none: about you.")
    topic: str | None = Field(None, description="A state of this topic (e.g. bed, age): it replaces the concept's "
                                                "earlier state of the topic. None: a lasting fact.")


class ConversationPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(..., max_length=200)


class MemoryPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    status: Literal["accepted"] | None = Field(None, description="accepted: a proposal is used from now on.")
    concept: str | None = Field(None, description="Move it to this concept ('' : about you).")
    topic: str | None = Field(None, description="Make it a state of this topic ('' : a fact).")
