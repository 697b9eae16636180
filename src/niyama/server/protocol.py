"""Request bodies of the OpenAI-compatible API (plus Niyama's ``qos`` and vLLM's extensions).

Unknown fields are ignored, as OpenAI-compatible servers do; OpenAI fields this server does not implement
are refused when set to anything but their neutral value (``unsupported``), rather than silently ignored.
Integer and boolean fields take JSON integers and booleans only (not ``"5"``, ``true`` for a number, or
``"yes"`` or ``1`` for a boolean), as OpenAI's API does. An explicit ``null`` means the field's
default, as in OpenAI's API. Field ranges are checked in ``app.py`` so that errors name the field in
OpenAI's error shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, field_validator


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = Field(default=0, description="vLLM extension; 0 (or -1) = no limit")
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = Field(default=False, description="vLLM extension: always generate max_tokens")
    service_tier: str | None = Field(default=None, description="auto | default | flex | priority, mapped to "
                                     "QoS classes by the server's configuration")
    priority: StrictInt = Field(default=0,
                                description="vLLM extension: lower is served first (priority scheduler)")
    qos: str | dict[str, Any] | None = Field(
        default=None, description="Niyama: a QoS class name, or {class, ttft, tbt, ttlt, importance} (seconds; "
        "importance: critical | standard | sheddable) overriding the class's fields")
    user: str | None = None
    # OpenAI fields without an implementation here, each with its neutral value.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("max_tokens", "temperature", "top_p", "top_k", "n", "stream", "ignore_eos", "priority",
                     mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value  # type: ignore[index]

    def unsupported(self) -> str | None:
        """The first field set to a value whose feature this server does not implement, if any."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        return "logit_bias" if self.logit_bias else None


class ContentPart(BaseModel):
    """One part of a multi-part message: text, or an assistant's refusal in the history (other kinds, e.g.
    images, are refused)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None
    refusal: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message text (text parts of a multi-part content joined)."""
        if isinstance(self.content, list):
            return "".join((p.text if p.type == "text" else p.refusal) or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    def unsupported_part(self) -> tuple[str, str] | None:
        """The path and type of the first content part that is neither text nor an assistant's refusal."""
        for i, message in enumerate(self.messages):
            for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
                if part.type not in ("text", "refusal"):
                    return f"messages.{i}.content.{j}.type", part.type
        return None

    def unsupported(self) -> str | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs" if self.logprobs else "top_logprobs"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        return "tools" if self.tools else super().unsupported()


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's (and vLLM's) default for legacy completions
    logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None

    def unsupported(self) -> str | None:
        if self.logprobs is not None:  # 0 asks for the sampled tokens' logprobs
            return "logprobs"
        for name in ("echo", "suffix"):
            if getattr(self, name):
                return name
        return "best_of" if self.best_of not in (None, 1) else super().unsupported()
