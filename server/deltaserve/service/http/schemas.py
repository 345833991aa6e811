"""Request bodies of the OpenAI-compatible API (pydantic models).

Fields follow OpenAI's API reference. Fields OpenAI defines but deltaserve does not
implement are declared so that a non-default value is refused with a clear message
(convert.py) instead of being ignored; fields nobody defines are ignored, as OpenAI's
SDKs and most servers expect. deltaserve's own knobs are extra body fields (`alpha`,
`top_k`, `repetition_penalty`, `ignore_eos`, `return_token_ids`; docs/HTTP.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class DeltaWeight(BaseModel):
    """A further tenant's delta composed into the request, at a strength."""

    model_config = ConfigDict(extra="forbid")
    tenant: str
    alpha: float = 1.0


class _GenerateBody(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # deltaserve's extra parameters
    alpha: float | None = Field(
        None, description="delta strength: 0 = base, 1 = the fine-tune, >1 extrapolates"
    )
    top_k: int | None = Field(None, description="keep the k most likely tokens (0 = off)")
    repetition_penalty: float | None = Field(None, description="> 0; 1 = off")
    ignore_eos: bool | None = Field(False, description="keep generating past end-of-sequence")
    return_token_ids: bool | None = Field(False, description="add the generated token ids to each choice")
    deltas: list[DeltaWeight] | None = Field(
        None, description="more tenants' deltas composed with the model's (sum of alpha_i * delta_i)"
    )


class CompletionBody(_GenerateBody):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionBody(_GenerateBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


Kind = Literal["completion", "chat"]
