"""Request and response bodies of the OpenAI-compatible API (the subset a chat client uses, plus ``coe``).

Requests ignore fields they do not know (clients send ``user``, ``seed``, penalties, ...), so any OpenAI
client works; fields the CoE cannot honour (``n`` > 1, tools) are refused with 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

COE_MODEL = "coe"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    #: ``developer`` is the newer name of ``system``
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def as_engine_message(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            if any(part.type != "text" for part in self.content):
                raise ValueError("only text content parts are supported")
            return {"role": role, "content": "".join(part.text or "" for part in self.content)}
        return {"role": role, "content": self.content or ""}


class StreamOptions(_Lenient):
    include_usage: bool = Field(False, strict=True)


class ChatCompletionRequest(_Lenient):
    #: ``coe`` routes automatically; an expert id forces that expert
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    # strict, as OpenAI is: "16", true or "yes" are not numbers or booleans (400, not a silent conversion)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    stop: str | list[str] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, strict=True, description="only one choice per request")
    tools: list[Any] | None = Field(None, max_length=0, description="tool calls are not supported")
    #: CoE extension: route to this category instead of asking the router
    category: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return [s for s in stops if s]

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class RouteRequest(_Lenient):
    """Either ``messages`` (a conversation) or ``prompt`` (one user message)."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    #: ``coe`` or an expert id (forces that expert)
    model: str = COE_MODEL
    category: str | None = None


class FeedbackRequest(_Lenient):
    #: an id the log can hold (a 64-bit integer); true or "12" are not ids
    interaction_id: int = Field(ge=1, lt=2**63, strict=True)
    kind: Literal["like", "dislike", "wrong_category", "retracted"]
    corrected_category: str | None = None
    comment: str | None = Field(None, max_length=4000)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    #: the expert that served the turn
    model: str
    choices: list[Choice]
    usage: Usage
    #: the routing decision, swaps, notices, timings and interaction id of the turn
    coe: dict[str, Any]


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    coe: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    coe: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
