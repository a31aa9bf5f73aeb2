"""Request types of the server (OpenAI chat-completions format plus safevlm's safety fields),
and the error type every 4xx/5xx answer is built from."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "code", "param"}}`` (OpenAI's shape)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class SafetyOptions(BaseModel):
    """Per-request safety overrides; they can only relax what the deployment's policy lists as
    relaxable (anything else is answered with HTTP 403)."""

    model_config = ConfigDict(extra="forbid")
    allow_types: list[str] = Field(default_factory=list, description="Risk types to switch off for this request.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. OpenAI parameters safevlm does not use are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    safety: SafetyOptions | None = Field(None, description="safevlm extension: per-request safety overrides.")


class ClassifyRequest(BaseModel):
    """``POST /v1/safety/classify``: the safety head and the policy only (the LLM never runs).

    Give ``image`` (a data: URL, or an http(s) URL when the server allows remote images) and/or
    ``prompt``, or ``messages`` in the chat-completions format.
    """

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    image: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    safety: SafetyOptions | None = None


__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "ClassifyRequest",
    "ContentPart",
    "ImagePart",
    "ImageURL",
    "SafetyOptions",
    "StreamOptions",
    "TextPart",
]
