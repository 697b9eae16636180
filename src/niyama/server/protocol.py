"""Request bodies of the OpenAI-compatible API (plus Niyama's ``qos`` and vLLM's extensions).

Unknown fields are ignored, as OpenAI-compatible servers do; OpenAI fields this server does not implement
are refused when set to anything but their neutral value (``unsupported``), rather than silently ignored.
Number, integer and boolean fields take JSON numbers, integers and booleans only (not ``"0.5"``, ``"5"``,
``true`` for a number, or ``"yes"`` or ``1`` for a boolean), as OpenAI's API does. An explicit ``null``
means the field's default, as in OpenAI's API. Field ranges are checked in ``app.py`` so that errors name
the field in OpenAI's error shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False

    @field_validator("include_usage", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        return False if value is None else value


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = None
    temperature: StrictFloat = 1.0
    top_p: StrictFloat = 1.0
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
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None

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
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_is_there(cls, value: Any, info: ValidationInfo) -> Any:
        """Only an assistant turn (one that called tools) may come without content, as in OpenAI's API; a
        text or refusal part needs its text."""
        if (value is None or value == []) and info.data.get("role", "assistant") != "assistant":
            raise ValueError("content is required")
        for j, part in enumerate(value if isinstance(value, list) else ()):
            if part.type in ("text", "refusal") and getattr(part, part.type) is None:
                raise ValueError(f"part {j} is of type {part.type!r} but has no {part.type!r} field")
        return value

    def text(self) -> str:
        """The message text (text parts of a multi-part content joined)."""
        if isinstance(self.content, list):
            return "".join((p.text if p.type == "text" else p.refusal) or "" for p in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # OpenAI's older form of tools
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None

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
        if self.response_format and self.response_format.type != "text":
            return "response_format"
        for name in ("tools", "functions", "audio"):
            if getattr(self, name):
                return name
        for name in ("tool_choice", "function_call"):  # "none" is the neutral choice, without tools too
            if getattr(self, name) not in (None, "none"):
                return name
        if self.modalities and self.modalities != ["text"]:
            return "modalities"
        return super().unsupported()


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
