"""Request bodies of the OpenAI-compatible API (plus Niyama's ``qos`` and vLLM's extensions).

Unknown fields are ignored, as OpenAI-compatible servers do. Field ranges are checked in ``app.py`` so
that errors name the field in OpenAI's error shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(default=0, description="vLLM extension; 0 = no limit")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="vLLM extension: always generate max_tokens")
    service_tier: str | None = Field(default=None, description="auto | default | flex | priority, mapped to "
                                     "QoS classes by the server's configuration")
    priority: int = Field(default=0, description="vLLM extension: lower is served first (priority scheduler)")
    qos: str | dict[str, Any] | None = Field(
        default=None, description="Niyama: a QoS class name, or {class, ttft, tbt, ttlt, importance} (seconds; "
        "importance: critical | standard | sheddable) overriding the class's fields")
    user: str | None = None


class ContentPart(BaseModel):
    """One part of a multi-part message; only text parts are read (others, e.g. images, are ignored)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message text (text parts of a multi-part content joined)."""
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]
